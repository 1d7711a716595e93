"""Evaluation: held-out loss and perplexity, and rank-classification accuracy over label words;
also the `eval` command, which scores a prompt folder on every row of a data file.

The untuned model (`prompt=None`) and a tuned one are scored by exactly the same code, so the
numbers compare. Accuracy is rank classification over the label words (classify.py).
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, replace
from typing import Any

import torch
from tqdm.auto import tqdm

from ..base.families import check_positions
from ..base.models import load_model
from ..core.config import DataConfig, ModelConfig, from_args
from ..core.prompt_protocol import forward_input, is_prompt
from ..core.utils import SoftpromptError, dtype_name, live_output, round_floats, same_model, warn
from ..data.batching import Example, collate, eval_batches, pad_id
from ..data.formatting import Formatter, load_splits
from ..forward.classify import label_scores, row_candidates
from ..forward.hidden import row_logprobs
from ..prompts.prompt import load_prompt
from ..prompts.recorded import data_config, prompt_given, read_meta, recorded_section, with_recorded


def prompt_input(prompt):
    """What the scorers take: a Prompt's forward input (prompt_protocol.forward_input), a [P, H]
    tensor as it is, or what a callable returning the [P, H] embeddings gives (a data-parallel
    wrapper), or None."""
    if prompt is None or isinstance(prompt, torch.Tensor):
        return prompt
    return forward_input(prompt) if is_prompt(prompt) else prompt()


@torch.no_grad()
def eval_loss(model, tok, prompt, examples: list[Example], batch_size: int = 16,
              path: str = "auto", progress: bool = False) -> dict[str, float]:
    """Token-weighted mean cross-entropy of the supervised tokens, and its perplexity."""
    dev = model.device
    p = prompt_input(prompt)
    total, count = 0.0, 0.0
    for idx in tqdm(eval_batches(examples, batch_size), desc="eval loss", disable=not progress or not live_output(),
                    leave=False):
        batch = collate([examples[i] for i in idx], pad_id(tok)).to(dev)
        s, n = row_logprobs(model, p, batch, path)
        total -= float(s.sum())
        count += float(n.sum())
    loss = total / max(count, 1.0)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": int(count)}


def example_scores(model, tok, prompt, fmt: Formatter, examples: list[Example], batch_size: int = 16,
                   path: str = "auto", progress: bool = False,
                   cands: list[list[list[int]]] | None = None) -> torch.Tensor:
    """Log-probability [N, C] of each label word after each example's input (`cands`: the rows'
    `row_candidates`, when the caller already has them)."""
    p = prompt_input(prompt)
    cands = cands if cands is not None else row_candidates(fmt, examples)
    rows = [(p, e.ids[:e.loss_start]) for e in examples]
    return label_scores(model, rows, cands, pad_id(tok), batch_size, path, progress)


def _accuracy(scores: torch.Tensor, examples: list[Example]) -> dict[str, float]:
    # From the count, so 37 of 40 is 0.925 and not float32's 0.925000011920929.
    correct = int((scores.argmax(-1).cpu() == torch.tensor([e.label for e in examples])).sum())
    return {"accuracy": correct / max(len(examples), 1), "correct": correct, "n": len(examples)}


def accuracy(model, tok, prompt, fmt: Formatter, examples: list[Example], **kw: Any) -> dict[str, float]:
    return _accuracy(example_scores(model, tok, prompt, fmt, examples, **kw), examples)


def class_loss(scores: torch.Tensor, examples: list[Example]) -> float:
    """Mean cross-entropy of the gold label under the distribution over the label words (the label
    scores [N, C] softmaxed): what rank classification decides on, and what --loss classes trains."""
    gold = torch.tensor([e.label for e in examples], device=scores.device)
    return float(-torch.log_softmax(scores.float(), -1)[torch.arange(len(examples)), gold].mean())


def evaluate(model, tok, prompt, fmt: Formatter, examples: list[Example], batch_size: int = 16,
             path: str = "auto", progress: bool = False) -> dict[str, float]:
    """Language modelling and input/target data: `loss` is the mean cross-entropy of the supervised
    tokens over the vocabulary, `perplexity` its exponential. Classification: `loss` is the
    cross-entropy over the label words (class_loss), `accuracy` rank classification's; the gold label
    tokens' cross-entropy over the whole vocabulary is `lm_loss`, `perplexity` its exponential (it
    can rise while accuracy does: probability mass moves from other words onto every label word)."""
    if fmt.task != "classify":
        return eval_loss(model, tok, prompt, examples, batch_size, path, progress)
    cands = row_candidates(fmt, examples)
    scores = example_scores(model, tok, prompt, fmt, examples, batch_size, path, progress, cands)
    if all(e.ids[e.loss_start:] == c[e.label] for e, c in zip(examples, cands)):
        # Each example's target is its gold label word, whose score is already its log-likelihood:
        # the loss needs no second pass over the data.
        tokens = sum(len(c[e.label]) for e, c in zip(examples, cands))
        lm = -float(scores[torch.arange(len(examples)), [e.label for e in examples]].sum()) / tokens
        out = {"perplexity": math.exp(min(lm, 50.0)), "tokens": tokens}
    else:  # a truncated target, or label words tokenised differently after some inputs
        out = eval_loss(model, tok, prompt, examples, batch_size, path, progress)
        lm = out.pop("loss")
    return {"loss": class_loss(scores, examples), "lm_loss": lm, **out, **_accuracy(scores, examples)}


# What a mixture's evaluation averages over its tasks (macro: each task counts once), and what it adds up.
MEANS = ("loss", "accuracy", "lm_loss", "perplexity")
SUMS = ("correct", "n", "tokens")


def evaluate_tasks(model, tok, prompt, fmt, examples: list[Example], **kw: Any) -> dict[str, Any]:
    """`evaluate` of one task; of a --mix mixture (data/mixture.py), each task's by its own formatter under
    `tasks`, and the mean over the tasks of what they all report (accuracy when every task classifies)."""
    parts = fmt.parts(examples)
    if len(parts) == 1 and parts[0][0] is fmt:
        return evaluate(model, tok, prompt, fmt, examples, **kw)
    per = {fmt.name_of(f): evaluate(model, tok, prompt, f, ex, **kw) for f, ex in parts}
    out: dict[str, Any] = {k: sum(m[k] for m in per.values()) / len(per) for k in MEANS
                           if all(k in m for m in per.values())}
    if len({"accuracy" in m for m in per.values()}) > 1:
        # A classifier's loss is over its label words, a language-modelling task's over the vocabulary:
        # beside each other, the mean (keep-best's score) is of every task's vocabulary loss.
        out["loss"] = sum(m.get("lm_loss", m["loss"]) for m in per.values()) / len(per)
    out.update({k: sum(m[k] for m in per.values()) for k in SUMS if all(k in m for m in per.values())})
    return {**out, "tasks": per}


def longest_row(fmt, rows: list[Example]) -> int:
    """Tokens of the longest row as it is scored: a classifier's input followed by its longest label word."""
    longest = max(len(e.ids) for e in rows)
    labelled = [e for e in rows if fmt.of(e).label_words]
    cands = row_candidates(fmt, labelled)
    return max([longest] + [e.loss_start + max(map(len, c)) for e, c in zip(labelled, cands)])


def warn_trained_on(prompt: str, meta: dict[str, Any], dcfg: DataConfig) -> None:
    """Warn where --data is the split the prompt was trained on: most of its rows were learnt, and the
    score says little of other text (a newcomer's first check is often the training file)."""
    trained = recorded_section(meta, "DataConfig")
    if isinstance(trained.get("data"), str) and same_model(dcfg.data, trained["data"]) \
            and dcfg.split == trained.get("split", "train"):
        warn(f"--data {dcfg.data} is the data {prompt} was trained on (all but any rows it held out): its score "
             "says little of other text; score held-out rows, such as the run's --eval-data")


def warn_unlike_training(prompt: str, meta: dict[str, Any], model, fmt: Formatter, rows: list[Example],
                         max_length: int) -> None:
    """Say where this scoring differs from train's own scoring of the prompt's held-out rows, whose
    figures it printed: the base's dtype (on a CPU with native bf16, train's `auto` picks bfloat16 for a
    prompt or a prefix, scoring keeps float32) or a --max-length that cuts these rows otherwise. Each
    changes the figures a little (hunt 13: 52 of 64 here against train's 53 of 64)."""
    if not isinstance(meta.get("eval"), dict):  # train printed no held-out figures
        return
    diffs, flags = [], []
    trained, now = meta.get("dtype"), dtype_name(model.dtype)
    if isinstance(trained, str) and trained != now:
        diffs.append(f"in {now}, where train ran it in {trained}")
        flags.append(f"--dtype {trained}")
    length = recorded_section(meta, "DataConfig").get("max_length")
    longest = max((len(e.ids) for e in rows), default=0)
    if isinstance(length, int) and not isinstance(length, bool) and (
            (max_length > length and longest > length) or (max_length < length and fmt.truncated)):
        diffs.append(f"at --max-length {max_length}, where train cut rows at {length}")
        flags.append(f"--max-length {length}")
    if diffs:
        warn(f"scoring {prompt} {' and '.join(diffs)}: the figures may differ a little from those train printed "
             f"(give {' '.join(flags)} to score as train did)")


def eval_prompt(mcfg: ModelConfig, dcfg: DataConfig, prompt: str = "none", batch_size: int = 16,
                model=None, tok=None) -> dict[str, Any]:
    """Score `prompt` (a folder, or 'none' for the untuned model) on every row of `dcfg.data`; the
    prompt's recorded template, target, labels and chat flag are the defaults of `dcfg`'s."""
    if prompt_given(prompt):
        meta = read_meta(prompt)
        dcfg = DataConfig(**with_recorded(asdict(dcfg), meta))
        warn_trained_on(prompt, meta, dcfg)
    if model is None:
        model, tok = load_model(mcfg)
    p = load_prompt(prompt, model).to(model.device) if prompt_given(prompt) else None
    fmt, rows, _ = load_splits(replace(dcfg, eval_fraction=0.0, eval_data="", eval_split=""), tok, shuffle=False)
    check_positions(model, 0 if p is None else p.length, longest_row(fmt, rows), scoring=True)
    if prompt_given(prompt):
        warn_unlike_training(prompt, meta, model, fmt, rows, dcfg.max_length)
    return {"prompt": prompt, "model": mcfg.model, "data": dcfg.data,
            **evaluate(model, tok, p, fmt, rows, batch_size=batch_size, progress=True)}


# ---------------------------------------------------------------- the `eval` command

def format_eval(m: dict[str, Any]) -> str:
    if "accuracy" in m:
        # A mixture's accuracy is the mean over its tasks, which the pooled counts are not.
        rows = f"mean over {len(m['tasks'])} tasks" if m.get("tasks") else f"{m['correct']} of {m['n']}"
        return (f"loss {m['loss']:.4f} (over the label words)  accuracy {100 * m['accuracy']:.2f}% ({rows})  "
                f"lm loss {m['lm_loss']:.4f}  perplexity {m['perplexity']:.3f} ({m['tokens']} label tokens)")
    over = f", mean over {len(m['tasks'])} tasks" if m.get("tasks") else ""
    return f"loss {m['loss']:.4f}  perplexity {m['perplexity']:.3f}  ({m['tokens']} tokens{over})"


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise SoftpromptError(f"--batch-size must be >= 1 (got {args.batch_size})")
    m = eval_prompt(from_args(ModelConfig, args), data_config(args, args.prompt), args.prompt, args.batch_size)
    print(json.dumps(round_floats(m)) if args.json else format_eval(m))
    return 0
