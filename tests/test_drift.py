"""Drift check (as torchtune's recipe tests): the built-in model's first training steps, with a fixed
seed and the repo's own example data, log the same losses as when they were measured. A change to
the loop, the forward path, the data pipeline or the init that moves the numbers fails here, while
the tiny-model tests only compare paths with each other.

The expected values were measured once on CPU (torch 2.13, 2 threads) with the code this test was
written against; float32 reductions may reorder across machines or thread counts, hence the
relative tolerance of 1e-4 (the per-step changes a real regression causes are 1e-2 and larger).
"""
import json

import pytest

from softprompt.base.models import load_model
from softprompt.core.config import DataConfig, ModelConfig, PromptConfig, TrainConfig
from softprompt.training.train import train

from conftest import EXAMPLES

pytestmark = pytest.mark.slow

# Measured on the code before issue 15's refactor of train.py (identical with 1 and 2 threads).
EXPECTED_TRAIN_LOSS = [2.8201656341552734, 2.7364816665649414, 3.009481906890869, 2.0703773498535156,
                       1.6916569471359253, 1.5453526973724365]  # steps 1..6
RTOL = 1e-4


def test_first_steps_of_the_builtin_model_match_the_recorded_losses(tmp_path):
    mcfg = ModelConfig(device="cpu")
    model, tok = load_model(mcfg)
    d = DataConfig(data=str(EXAMPLES), template="Country: {country}\\nFacts:",
                   target=" capital={capital}; continent={continent}", eval_fraction=0.0, max_length=48)
    p = PromptConfig(virtual_tokens=8, init="text", init_text="Give the country's capital and continent.")
    t = TrainConfig(out=str(tmp_path / "run"), method="prompt", lr=3e-2, batch_size=4, max_steps=6, warmup_steps=2,
                    log_every=1, eval_every=0, save_every=0, eval_untuned=False, seed=0)
    train(mcfg, d, p, t, model=model, tok=tok, quiet=True)
    recs = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if r["split"] == "train"]
    assert len(losses) == len(EXPECTED_TRAIN_LOSS)
    for step, (got, want) in enumerate(zip(losses, EXPECTED_TRAIN_LOSS), 1):
        assert abs(got - want) <= RTOL * abs(want), f"step {step}: loss {got!r}, recorded {want!r}"
