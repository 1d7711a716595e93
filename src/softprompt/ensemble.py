"""Prompt ensembling (Lester et al. 2021, section 6): K soft prompts for one task, scored together
in a single batch over the frozen model, combined by majority vote or by mean log-probability.

One batch holds every example once per prompt: row (k, i) is [prompt_k ; input_i (; label tokens)],
right-padded, so each row keeps positions 0.. from its own first virtual token and sees exactly
what it would see alone (prompts may differ in length). The model is stored once; only the
batch grows K-fold, which is the paper's point against an ensemble of K fine-tuned models.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .config import DataConfig, ModelConfig
from .data import Example, Formatter, eval_batches
from .evaluate import row_candidates
from .forward import _logits, decoder

MAX_ROWS = 64  # rows per forward pass: examples per batch = max(1, MAX_ROWS // K)


def per_row_hidden(model, prompts: list[torch.Tensor], seqs: list[list[int]], which: list[int]) -> torch.Tensor:
    """Hidden states [B, L, H] of rows [prompts[which[b]] ; seqs[b]], right-padded (pads masked,
    after every real token, so a causal model's real positions are untouched by them)."""
    embed = model.get_input_embeddings()
    dtype = embed.weight.dtype
    dev = embed.weight.device
    parts = [torch.cat([prompts[k].to(dev, dtype), embed(torch.tensor(s, dtype=torch.long, device=dev))])
             for k, s in zip(which, seqs)]
    L = max(p.shape[0] for p in parts)
    x = torch.zeros(len(parts), L, parts[0].shape[1], dtype=dtype, device=dev)
    mask = torch.zeros(len(parts), L, dtype=torch.long, device=dev)
    for b, p in enumerate(parts):
        x[b, :p.shape[0]] = p
        mask[b, :p.shape[0]] = 1
    return decoder(model)(inputs_embeds=x, attention_mask=mask, use_cache=False).last_hidden_state


@torch.no_grad()
def ensemble_scores(model, prompts: list[torch.Tensor], fmt: Formatter, examples: list[Example],
                    progress: bool = False) -> torch.Tensor:
    """Log-probability [K, N, C] of every label word after every example under every prompt; the K
    prompts' rows of a group of examples share one forward pass."""
    K = len(prompts)
    cands = row_candidates(fmt, examples)
    C = len(fmt.label_words)
    scores = torch.zeros(K, len(examples), C)
    inputs = [Example(e.ids[:e.loss_start], 0, e.label, e.text) for e in examples]
    per = max(1, MAX_ROWS // K)
    for idx in tqdm(eval_batches(inputs, per), desc="ensemble", disable=not progress, leave=False):
        single = all(len(w) == 1 for i in idx for w in cands[i])
        # Single-token label words: one row per (prompt, example), read the next-token distribution.
        # Otherwise one row per (prompt, example, label word), summing the word's token log-probs.
        variants = [None] if single else list(range(C))
        seqs, which, meta = [], [], []
        for k in range(K):
            for i in idx:
                for c in variants:
                    seqs.append(inputs[i].ids + (cands[i][c] if c is not None else []))
                    which.append(k)
                    meta.append((k, i, c))
        h = per_row_hidden(model, prompts, seqs, which)
        # Gather the states that predict each scored token, then one vocabulary projection for all.
        rows, pos, toks, dest = [], [], [], []
        for b, (k, i, c) in enumerate(meta):
            start = prompts[k].shape[0] + len(inputs[i].ids) - 1  # state after the input's last token
            words = [(c2, cands[i][c2]) for c2 in range(C)] if c is None else [(c, cands[i][c])]
            for c2, w in words:
                n = 1 if c is None else len(w)  # token t of a word is predicted by the state before it
                rows += [b] * n
                pos += range(start, start + n)
                toks += w[:n]
                dest += [(k, i, c2)] * n
        lp = torch.log_softmax(_logits(model, h[rows, pos]), -1)
        lp = lp[torch.arange(len(toks)), torch.tensor(toks, device=lp.device)].float().cpu()
        for (k, i, c), v in zip(dest, lp.tolist()):
            scores[k, i, c] += v
    return scores


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
    acc = lambda p: float((p == gold).float().mean())
    singles = [{"prompt": n, "accuracy": acc(preds["single"][k])} for k, n in enumerate(names)]
    best = max(singles, key=lambda s: s["accuracy"])
    return {"n": int(gold.numel()), "prompts": singles, "best_single": best,
            "mean_single_accuracy": sum(s["accuracy"] for s in singles) / len(singles),
            "majority_vote_accuracy": acc(preds["vote"]), "mean_logprob_accuracy": acc(preds["mean_logprob"])}


def ensemble_cmd(mcfg: ModelConfig, dcfg: DataConfig, prompt_dirs: list[str], model=None, tok=None,
                 progress: bool = True) -> dict[str, Any]:
    """Score every row of `dcfg.data` with each prompt alone and with the ensemble of all of them."""
    from .data import load_splits
    from .models import load_model
    from .prompt import load_prompt
    from .utils import SoftpromptError

    if len(prompt_dirs) < 2:
        raise SoftpromptError("ensemble needs at least two prompt folders")
    if model is None:
        model, tok = load_model(mcfg)
    prompts = [load_prompt(d, model).embeds.detach() for d in prompt_dirs]
    fmt, rows, _ = load_splits(replace(dcfg, eval_fraction=0.0, eval_data=""), tok)
    if fmt.task != "classify":
        raise SoftpromptError("ensemble scores classification data: give --labels (and --template)")
    scores = ensemble_scores(model, prompts, fmt, rows, progress=progress)
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
