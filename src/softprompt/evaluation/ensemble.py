"""Prompt ensembling (Lester et al. 2021, section 6): K soft prompts (or prefixes) for one task,
scored together over the frozen model, combined by majority vote or by mean log-probability.

Each prompt scores the rows in batches of its own, as `eval` scores them (classify.label_scores):
its keys and values are computed once and every row attends to them as a cache. Batches that mixed
the rows of several soft prompts ([prompt_k ; input_i], padded) had to run every prompt's tokens
through the model again in each row, and were ~1.3x slower than K scorings alone (hunt 13). The
model is stored once, which is the paper's point against an ensemble of K fine-tuned models.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..base.families import check_positions
from ..base.models import load_model
from ..core.config import DataConfig, ModelConfig, from_args
from ..core.utils import SoftpromptError
from ..data.batching import Example
from ..data.formatting import Formatter, load_splits
from ..forward.classify import row_candidates
from ..prompts.prompt import load_prompt
from .evaluate import example_scores, longest_row

MAX_ROWS = 64  # rows per forward pass (measured: 64 scored 200 SST-2 rows ~10% faster than eval's 16)


def ensemble_scores(model, prompts: list, fmt: Formatter, examples: list[Example],
                    progress: bool = False) -> torch.Tensor:
    """Log-probability [K, N, C] of every label word after every example under every prompt (each a
    Prompt, or a soft prompt's [P, H] embeddings), each prompt in batches of its own."""
    cands = row_candidates(fmt, examples)
    return torch.stack([example_scores(model, fmt.tok, p, fmt, examples, MAX_ROWS, progress=progress, cands=cands)
                        for p in prompts])


def combine(scores: torch.Tensor) -> dict[str, torch.Tensor]:
    """Predictions [N] from scores [K, N, C]: each prompt alone, majority vote, mean log-probability.
    A vote tie goes to the tied class with the highest mean log-probability."""
    K, N, C = scores.shape
    single = scores.argmax(-1)  # [K, N]
    votes = torch.nn.functional.one_hot(single, C).sum(0).float()  # [N, C]
    mean = scores.mean(0)  # [N, C]
    tied = votes == votes.max(-1, keepdim=True).values
    vote = torch.where(tied, mean, torch.full_like(mean, -torch.inf)).argmax(-1)
    return {"single": single, "vote": vote, "mean_logprob": mean.argmax(-1)}


def ensemble_report(scores: torch.Tensor, gold: torch.Tensor, names: list[str]) -> dict[str, Any]:
    preds = combine(scores)
    n = max(int(gold.numel()), 1)
    # From counts, as eval's: 147 of 200 is 0.735, not float32's 0.7350000143051147.
    correct = lambda p: int((p == gold).sum())
    acc = lambda p: correct(p) / n
    singles = [{"prompt": name, "accuracy": c / n, "correct": c}
               for name, c in zip(names, map(correct, preds["single"]))]
    best = max(singles, key=lambda s: s["accuracy"])
    return {"n": int(gold.numel()), "prompts": singles, "best_single": best,
            "mean_single_accuracy": sum(s["accuracy"] for s in singles) / len(singles),
            "majority_vote_accuracy": acc(preds["vote"]), "mean_logprob_accuracy": acc(preds["mean_logprob"])}


def ensemble_cmd(mcfg: ModelConfig, dcfg: DataConfig, prompt_dirs: list[str], model=None, tok=None,
                 progress: bool = True) -> dict[str, Any]:
    """Score every row of `dcfg.data` with each prompt alone and with the ensemble of all of them."""
    if len(prompt_dirs) < 2:
        raise SoftpromptError("ensemble needs at least two prompt folders")
    if model is None:
        model, tok = load_model(mcfg)
    loaded = [load_prompt(d, model) for d in prompt_dirs]
    fmt, rows, _ = load_splits(replace(dcfg, eval_fraction=0.0, eval_data="", eval_split=""), tok, shuffle=False)
    check_positions(model, max(p.length for p in loaded), longest_row(fmt, rows), scoring=True)
    if fmt.task != "classify":
        raise SoftpromptError("ensemble scores classification data: give --labels (and --template)")
    scores = ensemble_scores(model, loaded, fmt, rows, progress=progress)
    gold = torch.tensor([e.label for e in rows])
    return {"model": mcfg.model, "data": dcfg.data, **ensemble_report(scores, gold, [str(Path(d)) for d in prompt_dirs])}


def format_report(r: dict[str, Any]) -> str:
    lines = [f"| prompt | accuracy on {r['n']} rows |", "| --- | --- |"]
    lines += [f"| {s['prompt']} | {100 * s['accuracy']:.2f}% |" for s in r["prompts"]]
    lines += [f"| best single prompt | {100 * r['best_single']['accuracy']:.2f}% |",
              f"| mean of single prompts | {100 * r['mean_single_accuracy']:.2f}% |",
              f"| ensemble: majority vote | {100 * r['majority_vote_accuracy']:.2f}% |",
              f"| ensemble: mean log-probability | {100 * r['mean_logprob_accuracy']:.2f}% |"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the `ensemble` command

def run(args: argparse.Namespace) -> int:
    from ..prompts.recorded import data_config

    # The first prompt's recorded template and labels are the defaults (an ensemble shares one task).
    r = ensemble_cmd(from_args(ModelConfig, args), data_config(args, args.prompts[0]), args.prompts)
    print(json.dumps(r)) if args.json else print(format_report(r), end="")
    return 0
