"""bench/linear_kernels.py's dry run on a tiny Llama's shapes: a row per layer shape and row count, both
kernels timed and checked against float64, and the rule `auto` applies on this CPU recorded.
Timings mean nothing at this size."""
from __future__ import annotations

import json

import pytest
import torch



@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")
def test_every_shape_is_timed_and_checked_with_both_kernels(run_bench, llama_dir, tmp_path):
    from transformers import AutoConfig

    out = tmp_path / "k.json"
    proc = run_bench("linear_kernels.py", "--model", str(llama_dir), "--rows", "3", "17", "--repeats", "1",
                     "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["command"] and r["commit"] and r["machine"]["cpu_model"]
    c = AutoConfig.from_pretrained(llama_dir)
    shapes = {tuple(row["shape"]) for row in r["rows"]}
    assert (c.vocab_size, c.hidden_size) in shapes and (c.intermediate_size, c.hidden_size) in shapes
    assert len(r["rows"]) == 2 * len(shapes) == 10
    for row in r["rows"]:
        for k in ("default", "onednn"):
            assert row[k]["forward_gflops"] > 0 and row[k]["input_grad_gflops"] > 0
            assert row[k]["rel_error_vs_float64"] < 1e-5  # both are float32 kernels
    assert r["summary"]["auto_picks"] in ("onednn", "default") and r["summary"]["auto_reason"].startswith("auto")
    assert "median oneDNN/torch" in proc.stdout
