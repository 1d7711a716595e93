"""bench/transfer.py's dry run on the tiny random Llama: every (method, rows, init, seed) row is
written, and a rerun skips the rows its result file holds (the lead runs the real sizes)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_bench(llama_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
    argv = [sys.executable, str(ROOT / "bench" / "transfer.py"), "--model", f"random:{llama_dir}", "--device", "cpu",
            "--methods", "prompt", "--steps", "1", "--source-steps", "1", "--source-limit", "16", "--sizes", "8",
            "--eval-limit", "4", "--seeds", "0", "--max-length", "48", "--virtual-tokens", "2", "--batch-size", "4",
            "--out", str(tmp_path / "t.json"), "--workdir", str(tmp_path / "w")]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)


def test_dry_run_writes_every_row_and_resumes(llama_dir, tmp_path):
    first = run_bench(llama_dir, tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    rows = json.loads((tmp_path / "t.json").read_text())["rows"]
    assert [(r["method"], r["rows"], r["init"], r["seed"]) for r in rows] == \
        [("prompt", 8, init, 0) for init in ("fresh", "sst2", "mixture")]
    assert all(r["train_examples"] == 8 and 0 <= r["accuracy"] <= 1 for r in rows)
    mix = json.loads((tmp_path / "w" / "source_mixture_prompt" / "run_config.json").read_text())
    assert len(mix["DataConfig"]["mix"]) == 1 and mix["train_examples"] == 32  # each task capped at 16 rows
    again = run_bench(llama_dir, tmp_path)
    assert again.returncode == 0 and '"init": "fresh"' not in again.stdout  # nothing measured twice
    assert json.loads((tmp_path / "t.json").read_text())["rows"] == rows
    assert "prompt         8   mixture" in again.stdout
