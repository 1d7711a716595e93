"""Evaluation: the classification loss read off the label scores equals the separate loss pass."""
import torch

from softprompt.config import DataConfig
from softprompt.data import load_splits
from softprompt.evaluate import accuracy, eval_loss, evaluate
from conftest import EXAMPLES


def test_classification_loss_from_scores_equals_loss_pass(tiny):
    model, tok = tiny
    # Continent names span one to several tokens here, so both scoring paths are exercised.
    cfg = DataConfig(data=str(EXAMPLES), template="Country: {country}\\nContinent:",
                     labels="Europe,Asia,Africa,Oceania,North America,South America", label_col="continent",
                     eval_fraction=0)
    fmt, ex, _ = load_splits(cfg, tok)
    p = torch.randn(3, model.config.hidden_size) * 0.1
    prompt = lambda: p
    got, ref = evaluate(model, tok, prompt, fmt, ex), eval_loss(model, tok, prompt, ex)
    assert got["tokens"] == ref["tokens"]
    assert abs(got["loss"] - ref["loss"]) / ref["loss"] < 1e-6
    assert got["accuracy"] == accuracy(model, tok, prompt, fmt, ex)["accuracy"]
