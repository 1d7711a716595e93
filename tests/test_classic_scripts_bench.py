"""bench/classic_scripts.py's work count: the tokens and FLOPs per step behind the twin's speed ratio."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import classic_scripts  # noqa: E402
from common import ACTS  # noqa: E402


@pytest.mark.slow
def test_work_per_step_counts_padding_for_peft_and_real_tokens_for_the_twin(tmp_path, monkeypatch):
    """On the built-in model and the recipe's data, as the first decoder layer sees them: PEFT runs
    every padded position behind 4 virtual tokens per row; the twin's packed path runs the prompt
    once and each row's real tokens but its last. Both see the same batches, and their matmul FLOPs
    follow the tokens."""
    pytest.importorskip("peft")
    if not Path(ACTS["data"]).is_file():
        pytest.skip(f"no {ACTS['data']}")
    seen = []
    draw = classic_scripts.recipe_batches
    monkeypatch.setattr(classic_scripts, "recipe_batches", lambda *a: seen.append(draw(*a)) or seen[-1])
    work = classic_scripts.work_per_step(argparse.Namespace(rows=4, max_steps=1), tmp_path)  # one batch of 4

    peft_batches, ours = seen
    assert len(peft_batches) == len(ours) == 1 and len(ours[0]["input_ids"]) == 4
    for a, b in zip(peft_batches, ours):
        assert all(a[k].equal(b[k]) for k in ("input_ids", "attention_mask", "labels"))
    padded = sum(b["input_ids"].numel() + 4 * len(b["input_ids"]) for b in ours)
    packed = sum(int(b["attention_mask"].sum()) - len(b["input_ids"]) + 4 for b in ours)
    assert work["peft"]["decoder_tokens_per_step"] == padded
    assert work["softprompt"]["decoder_tokens_per_step"] == packed < padded
    assert work["softprompt"]["route"] == "packed"
    assert all(work[k]["forward_backward_s_per_step"] > 0 for k in ("peft", "softprompt"))
    # Timed with each kernel too; PEFT as shipped runs torch's, the twin what softprompt's auto picks.
    # The FLOPs below are counted under torch's kernel: under oneDNN's the matmuls would be missed.
    assert work["peft"]["linear_kernel"] == "default" and work["softprompt"]["linear_kernel"] in ("onednn", "default")
    assert all(work[k][f"forward_backward_s_per_step_{kern}"] > 0 for k in ("peft", "softprompt")
               for kern in ("onednn", "default"))
    token_ratio = padded / packed
    flop_ratio = work["peft"]["gflop_per_step"] / work["softprompt"]["gflop_per_step"]
    assert abs(flop_ratio / token_ratio - 1) < 0.05, (flop_ratio, token_ratio)
