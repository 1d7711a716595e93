"""Evaluation: held-out loss and perplexity, and rank-classification accuracy over label words.

The untuned model (`prompt=None`) and a tuned one are scored by exactly the same code, so the
numbers compare. Rank classification picks the label word whose tokens the model finds most
probable after the input; one forward pass suffices when every label word is a single token.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from tqdm.auto import tqdm

from .data import Example, Formatter, collate, eval_batches, pad_id
from .forward import next_token_logprobs, row_logprobs


@torch.no_grad()
def eval_loss(model, tok, prompt, examples: list[Example], batch_size: int = 16,
              shared_prefix: bool = True, progress: bool = False) -> dict[str, float]:
    """Token-weighted mean cross-entropy of the supervised tokens, and its perplexity."""
    dev = model.device
    p = prompt() if prompt is not None else None
    total, count = 0.0, 0.0
    for idx in tqdm(eval_batches(examples, batch_size), desc="eval loss", disable=not progress, leave=False):
        batch = collate([examples[i] for i in idx], pad_id(tok)).to(dev)
        s, n = row_logprobs(model, p, batch, shared_prefix)
        total -= float(s.sum())
        count += float(n.sum())
    loss = total / max(count, 1.0)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": int(count)}


@torch.no_grad()
def label_scores(model, tok, prompt, fmt: Formatter, examples: list[Example], batch_size: int = 16,
                 shared_prefix: bool = True, progress: bool = False) -> torch.Tensor:
    """Log-probability [N, C] of each label word after each example's input."""
    dev = model.device
    p = prompt() if prompt is not None else None
    cand = fmt.candidates(examples[0])
    inputs = [Example(e.ids[:e.loss_start], 0, e.label, e.text) for e in examples]
    scores = torch.zeros(len(examples), len(cand))
    single = all(len(c) == 1 for c in cand)
    pad = pad_id(tok)
    for idx in tqdm(eval_batches(inputs, batch_size), desc="classify", disable=not progress, leave=False):
        if single:
            batch = collate([inputs[i] for i in idx], pad).to(dev)
            ids = torch.tensor([c[0] for c in cand], device=dev)
            scores[idx] = next_token_logprobs(model, p, batch.input_ids, batch.attention_mask, ids,
                                              shared_prefix).float().cpu()
            continue
        for k, c in enumerate(cand):  # multi-token label words: score each candidate's tokens
            exs = [Example(inputs[i].ids + c, len(inputs[i].ids)) for i in idx]
            s, _ = row_logprobs(model, p, collate(exs, pad).to(dev), shared_prefix)
            scores[idx, k] = s.float().cpu()
    return scores


def _accuracy(scores: torch.Tensor, examples: list[Example]) -> dict[str, float]:
    gold = torch.tensor([e.label for e in examples])
    return {"accuracy": float((scores.argmax(-1) == gold).float().mean()), "n": len(examples)}


def accuracy(model, tok, prompt, fmt: Formatter, examples: list[Example], **kw: Any) -> dict[str, float]:
    return _accuracy(label_scores(model, tok, prompt, fmt, examples, **kw), examples)


def evaluate(model, tok, prompt, fmt: Formatter, examples: list[Example], batch_size: int = 16,
             shared_prefix: bool = True, progress: bool = False) -> dict[str, float]:
    if fmt.task != "classify":
        return eval_loss(model, tok, prompt, examples, batch_size, shared_prefix, progress)
    scores = label_scores(model, tok, prompt, fmt, examples, batch_size, shared_prefix, progress)
    cand = fmt.candidates(examples[0])
    if all(e.ids[e.loss_start:] == cand[e.label] for e in examples):
        # Each example's target is its gold label word, whose score is already its log-likelihood:
        # the loss needs no second pass over the data.
        tokens = sum(len(cand[e.label]) for e in examples)
        loss = -float(scores[torch.arange(len(examples)), [e.label for e in examples]].sum()) / tokens
        out = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens}
    else:  # a truncated target, or label words tokenised differently after some inputs
        out = eval_loss(model, tok, prompt, examples, batch_size, shared_prefix, progress)
    return {**out, **_accuracy(scores, examples)}
