"""bench/profile_step.py's CPU dry run on a tiny random Llama: every path is profiled on the CPU,
and its operators' self times, split into classes, account for its step (they do not nest, so they
cannot add up to more than the wall time, and the ops of a training step must show up in their
classes). Timings mean nothing at this size."""
from __future__ import annotations

import json
import sys

import pytest

from conftest import ROOT, SHARED

sys.path.insert(0, str(ROOT / "bench"))

STEPS = 2


@pytest.fixture(scope="module")
def result(run_bench, llama_dir, tmp_path_factory) -> dict:
    pytest.importorskip("peft")
    if not (SHARED / "sst2" / "train.tsv").is_file():
        pytest.skip(f"no {SHARED / 'sst2'}")
    out = tmp_path_factory.mktemp("profile_step") / "r.json"
    proc = run_bench("profile_step.py", "--model", f"random:{llama_dir}", "--device", "cpu", "--task", "sst2", "lm128",
                     "--steps", str(STEPS), "--batch-size", "4", "--virtual-tokens", "4", "--limit", "64",
                     "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sst2 softprompt wall" in proc.stdout and "self CPU ms: loss" in proc.stdout
    return json.loads(out.read_text())


def test_every_path_is_split_into_operator_classes(result):
    assert result["device"] == "cpu" and result["method"] == "prompt" and result["commit"]
    assert all(t["steps"] == STEPS for t in result["tasks"])
    assert [t["task"] for t in result["tasks"]] == ["sst2", "lm128"]  # a labelled task and LM rows
    for task, name in ((t, n) for t in result["tasks"] for n in ("peft", "peft_best", "softprompt")):
        r, where = task[name], (task["task"], name)
        assert set(r["self_cpu_ms"]) == {"attention", "loss", "matmul", "optimizer", "other"}, where
        assert r["self_cpu_ms_total"] == pytest.approx(sum(r["self_cpu_ms"].values()))
        # Self times do not nest: together at most the step's wall time (profiler overhead aside)
        assert 0 < r["self_cpu_ms_total"] <= 1.05 * r["wall_ms"], where
        # A training step multiplies matrices, attends and takes a loss: each class has time
        for c in ("matmul", "attention", "loss"):
            assert r["self_cpu_ms"][c] > 0, (where, c)
        ms = [o["ms_per_step"] for o in r["ops"]]
        assert ms == sorted(ms, reverse=True) and ms[-1] > 0, where
        assert sum(ms) == pytest.approx(r["self_cpu_ms_total"]), where  # the classes split every operator
        assert "kernel_ms" not in r  # no CUDA events on a CPU


def test_op_classes():
    from profile_step import op_class

    assert op_class("aten::addmm") == op_class("aten::mm") == "matmul"
    assert op_class("aten::_scaled_dot_product_flash_attention_for_cpu_backward") == "attention"
    assert op_class("aten::_log_softmax_backward_data") == op_class("aten::nll_loss_forward") == "loss"
    assert op_class("aten::logsumexp") == op_class("aten::exp") == "loss"  # softprompt's chunked cross-entropy
    assert op_class("aten::_foreach_mul_") == "optimizer"
    assert op_class("aten::copy_") == "other"
