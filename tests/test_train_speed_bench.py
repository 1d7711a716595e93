"""bench/train_speed.py --method prefix's dry run on a tiny random Llama: every path (PEFT's
PrefixTuning as its recipe runs, PEFT at its best, softprompt's prefix step) is warmed then timed,
the ratios are against the fastest PEFT variant, and the two sides compute the same loss from the
same keys and values (float64 trajectories, float32 one-batch parity). Its timings mean nothing at
this size; the CPU memory children and torch.compile are left out (a fresh process, or a minute of
compiling, each)."""
from __future__ import annotations

import json
import sys
import warnings

import pytest
import torch

from conftest import ROOT, SHARED
from families import LAYERS

sys.path.insert(0, str(ROOT / "bench"))

STEPS, CHECK_STEPS, BATCH = 3, 2, 4


@pytest.fixture(scope="module")
def result(run_bench, llama_dir, tmp_path_factory) -> dict:
    pytest.importorskip("peft")
    if not (SHARED / "sst2" / "train.tsv").is_file():
        pytest.skip(f"no {SHARED / 'sst2'}")
    out = tmp_path_factory.mktemp("train_speed") / "r.json"
    proc = run_bench("train_speed.py", "--method", "prefix", "--model", f"random:{llama_dir}", "--device", "cpu",
                     "--task", "sst2", "--steps", str(STEPS), "--check-steps", str(CHECK_STEPS),
                     "--batch-size", str(BATCH), "--virtual-tokens", "4", "--limit", "64", "--flop-samples", "1",
                     "--no-memory", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "float32 loss from the same start" in proc.stdout
    assert f"step 1/{STEPS}, mean step so far: peft " in proc.stdout  # an hour-long CPU run says how far it is
    return json.loads(out.read_text())


def test_every_path_is_warmed_then_timed(result):
    assert result["method"] == "prefix" and result["warmup"] and result["attn_implementation"]
    (task,) = result["tasks"]
    assert (task["task"], task["method"]) == ("sst2", "prefix")
    for name in ("peft", "peft_best", "softprompt"):
        p = task[name]
        assert p["warmup_shapes"] >= 1 and len(p["losses"]) == STEPS, name
        assert p["whole_run_s"] == pytest.approx(p["warmup_s"] + p["total_s"]), name
        assert p["gflop_per_step"] > 0, name
        # softprompt's step keeps each grouped key/value head once, as train runs; PEFT's, transformers' copies
        assert p["gqa_attention_modules"] == (LAYERS if name == "softprompt" else 0), name
    # A prefix is the layers' cache: no path runs its positions through the decoder, and softprompt
    # runs fewer text positions than PEFT's padded [B, T] (it drops each row's last target)
    assert task["softprompt"]["decoder_tokens_per_step"] < task["peft_best"]["decoder_tokens_per_step"]
    assert task["peft"]["decoder_tokens_per_step"] <= BATCH * 128


def test_ratios_are_against_the_fastest_peft_variant(result):
    (t,) = result["tasks"]
    best = min(("peft", "peft_best"), key=lambda n: t[n]["whole_run_s"])
    assert t["best_peft"] == best
    assert t["speedup"] == pytest.approx(t[best]["total_s"] / t["softprompt"]["total_s"])
    assert t["speedup_whole_run"] == pytest.approx(t[best]["whole_run_s"] / t["softprompt"]["whole_run_s"])
    assert t["speedup_plain"] == pytest.approx(t["peft"]["total_s"] / t["softprompt"]["total_s"])


def test_peft_and_softprompt_compute_the_same_loss(result):
    (t,) = result["tasks"]
    s = t["same_batches"]
    assert len(s["peft_losses"]) == len(s["softprompt_losses"]) == CHECK_STEPS
    # From the same keys and values (PEFT's flat layout), float64: equal up to summation order
    assert s["loss_rel_diff_step1"] < 1e-12 and s["loss_rel_diff_max"] < 1e-9
    assert s["peft_best_rel_diff_max"] < 1e-12  # logits kept only where read change no value
    q = t["fp32_parity"]
    assert q["equal"] and q["abs_diff"] <= q["tolerance"] == 1e-5
    assert q["peft_loss"] == pytest.approx(s["peft_losses"][0], rel=1e-5)  # the float64 check's first batch


def test_warm_up_meets_every_guard_a_timed_step_meets():
    """A compiled PEFT must not compile inside the timed steps: the warm-up keys a single supervised
    position apart (compile specialises a `logits_to_keep` of size 1), and softprompt warms first,
    because its first packed pass renames the attention every path is then timed under."""
    from types import SimpleNamespace

    from train_speed import warm_all, warm_key

    def batch(label_cols):  # [2, 6] ids; targets -100 except in label_cols
        targets = torch.full((2, 6), -100)
        targets[:, label_cols] = 1
        return SimpleNamespace(input_ids=torch.zeros(2, 6, dtype=torch.long), targets=targets)

    one, two = batch([4]), batch([3, 5])
    assert warm_key(one) != warm_key(two) and warm_key(one) == warm_key(batch([2]))
    # column 0 predicts nothing without a prompt in front (a prefix), and the last virtual token's
    # logits predict it with one: the key counts the positions the loss keeps, as the loss does
    assert warm_key(batch([0, 4]), logit_offset=0) == warm_key(one)
    assert warm_key(batch([0, 4]), logit_offset=2) == warm_key(two)
    order = []

    class Path:
        def __init__(self, name):
            self.name = name

        def step(self, b, record):
            assert record is False
            order.append(self.name)

    paths = [Path("peft"), Path("peft_compiled"), Path("softprompt")]
    warm = warm_all(paths, [[one, batch([2])], [one, two, two], [two]])
    assert [w["warmup_shapes"] for w in warm] == [1, 2, 1]  # aligned with the paths, not the order run
    assert order == ["softprompt", "peft", "peft_compiled", "peft_compiled"]


def test_the_compiled_path_counts_its_flops_eagerly_and_keeps_its_compiled_forward(llama_dir):
    """FlopCounterMode hangs global hooks on every module, under which torch.compile would compile
    PEFT's forward again (and warn); the count is of the same math on the eager forward."""
    pytest.importorskip("peft")
    from common import load_bench_model
    from train_speed import Example, Path_, collate, initial_prompt

    model, _ = load_bench_model(f"random:{llama_dir}", torch.device("cpu"), torch.float32)
    init = initial_prompt(model, 4, 0)
    batch = collate([Example(ids=list(range(5, 17)), loss_start=8), Example(ids=list(range(5, 12)), loss_start=4)], 0)
    compiled = Path_("peft_compiled", model, init, 1e-3, torch.device("cpu"))
    timed = compiled.forward
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        n = compiled.flops(batch)
    assert not [w for w in seen if "global hooks" in str(w.message)]  # the compiled module was not called
    assert compiled.forward is timed and timed is not compiled.peft
    assert n == Path_("peft_best", model, init, 1e-3, torch.device("cpu")).flops(batch) > 0


def test_a_memory_child_killed_keeps_the_timings(monkeypatch):
    """A memory child killed (the kernel's OOM killer at batch 64 on 24 GiB) must not lose the timed
    steps of the same task: memory_phase leaves them as they are and records why its figures are missing."""
    import subprocess
    from types import SimpleNamespace

    import train_speed

    def killed(cmd, **kw):
        return SimpleNamespace(returncode=-9, stdout="", stderr="warnings only")
    monkeypatch.setattr(subprocess, "run", killed)
    args = SimpleNamespace(memory=True, method="prompt", model="m", device="cpu", dtype="float32", batch_size=64,
                           virtual_tokens=20, limit=10, seed=0, linear_kernel="auto", peft_kernel="default")
    with pytest.raises(RuntimeError, match="memory child for peft exited with -9 \\(killed: out of memory\\?\\)"):
        train_speed.measure_memory(args, "lm128", "peft")
    res = {name: {"median_step_s": 1.0} for name in ("peft", "peft_best", "softprompt")}
    train_speed.memory_phase(args, "lm128", res, None, None, None, {}, [], torch.device("cpu"))
    assert res.pop("memory_error").startswith("memory child for peft exited with -9")
    assert res == {name: {"median_step_s": 1.0} for name in ("peft", "peft_best", "softprompt")}  # no ratio half-made
