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


def row_candidates(fmt: Formatter, examples: list[Example]) -> list[list[list[int]]]:
    """Each example's own label-word token ids: a label word's tokens can depend on the text before
    it (" positive" after "Sentiment:", "positive" after a trailing space or newline)."""
    memo: dict[str, list[list[int]]] = {}
    out = []
    for e in examples:
        rendered = fmt.render_input(e.text)
        key = rendered[-1:]  # label_text depends only on the input's last character
        if key not in memo:
            memo[key] = fmt.label_ids(rendered)
        out.append(memo[key])
    return out


@torch.no_grad()
def label_scores(model, tok, prompt, fmt: Formatter, examples: list[Example], batch_size: int = 16,
                 shared_prefix: bool = True, progress: bool = False,
                 cands: list[list[list[int]]] | None = None) -> torch.Tensor:
    """Log-probability [N, C] of each label word after each example's input (`cands`: the rows'
    `row_candidates`, when the caller already has them)."""
    dev = model.device
    p = prompt() if prompt is not None else None
    cands = cands if cands is not None else row_candidates(fmt, examples)
    inputs = [Example(e.ids[:e.loss_start], 0, e.label, e.text) for e in examples]
    scores = torch.zeros(len(examples), len(fmt.label_words))
    pad = pad_id(tok)
    # Rows sharing one candidate set are scored together; usually there is just one such group.
    groups: dict[tuple, list[int]] = {}
    for i, c in enumerate(cands):
        groups.setdefault(tuple(map(tuple, c)), []).append(i)
    for cand, members in groups.items():
        single = all(len(c) == 1 for c in cand)
        sub = [inputs[i] for i in members]
        for bidx in tqdm(eval_batches(sub, batch_size), desc="classify", disable=not progress, leave=False):
            idx = [members[j] for j in bidx]
            if single:  # one forward pass: the next-token distribution holds every label word
                batch = collate([inputs[i] for i in idx], pad).to(dev)
                ids = torch.tensor([c[0] for c in cand], device=dev)
                scores[idx] = next_token_logprobs(model, p, batch.input_ids, batch.attention_mask, ids,
                                                  shared_prefix).float().cpu()
                continue
            for k, c in enumerate(cand):  # multi-token label words: score each candidate's tokens
                exs = [Example(inputs[i].ids + list(c), len(inputs[i].ids)) for i in idx]
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
    cands = row_candidates(fmt, examples)
    scores = label_scores(model, tok, prompt, fmt, examples, batch_size, shared_prefix, progress, cands)
    if all(e.ids[e.loss_start:] == c[e.label] for e, c in zip(examples, cands)):
        # Each example's target is its gold label word, whose score is already its log-likelihood:
        # the loss needs no second pass over the data.
        tokens = sum(len(c[e.label]) for e, c in zip(examples, cands))
        loss = -float(scores[torch.arange(len(examples)), [e.label for e in examples]].sum()) / tokens
        out = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens}
    else:  # a truncated target, or label words tokenised differently after some inputs
        out = eval_loss(model, tok, prompt, examples, batch_size, shared_prefix, progress)
    return {**out, **_accuracy(scores, examples)}
