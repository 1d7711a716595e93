"""Choosing each row's next token: greedy, or sampled with temperature, top-p and a repetition
penalty, through transformers' logits processors.

Rows of one batch may each have their own settings (a server mixes requests): rows with equal
settings are processed together, and each sampled row draws from its own seeded generator, so a
row's tokens do not depend on which other rows share its batch.

Scores are sanitised per row: NaN counts as impossible and +inf as the largest finite score, and a
row left with no finite probability falls back to its greedy token, so extreme settings (or
overflowing logits) never reach torch.multinomial as "inf, nan or element < 0". A group of rows
whose processing still raises fails alone when the caller passes `failed` (the server's other
rows keep decoding).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.generation.logits_process import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor,
                                                    TemperatureLogitsWarper, TopPLogitsWarper)


@dataclass(frozen=True)
class Sampling:
    """One row's decoding settings (GenerateConfig's, less the budget)."""
    sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    @classmethod
    def of(cls, cfg) -> "Sampling":
        if not cfg.sample:
            return cls(False, 1.0, 1.0, cfg.repetition_penalty)
        return cls(True, cfg.temperature, cfg.top_p, cfg.repetition_penalty)

    def processors(self) -> LogitsProcessorList:
        procs = LogitsProcessorList()
        if self.repetition_penalty != 1.0:
            procs.append(RepetitionPenaltyLogitsProcessor(self.repetition_penalty))
        if self.sample:
            procs.append(TemperatureLogitsWarper(max(self.temperature, 1e-5)))
            if self.top_p < 1.0:
                procs.append(TopPLogitsWarper(self.top_p))
        return procs


def _seen_ids(seen: list[list[int]], device) -> torch.Tensor:
    """[B, L] ids already in each row; short rows repeat their own first id, which the penalty
    processor's gather-then-scatter leaves as if it appeared once."""
    L = max(len(s) for s in seen)
    return torch.tensor([s + [s[0]] * (L - len(s)) for s in seen], device=device)


def finite(scores: torch.Tensor) -> torch.Tensor:
    """Scores [B, V] with NaN as -inf (impossible) and +inf as the largest finite value."""
    return torch.nan_to_num(scores, nan=float("-inf"), posinf=torch.finfo(scores.dtype).max,
                            neginf=float("-inf"))


def pick(z: torch.Tensor, settings: list[Sampling], seen: list[list[int]],
         gens: list[torch.Generator | None], failed: dict[int, Exception] | None = None) -> torch.Tensor:
    """Next token per row [B] from logits z [B, V] (float). seen[b]: the ids in row b so far (only
    read with a repetition penalty); gens[b]: row b's generator when it samples. With `failed`, a
    group of rows whose processing raises gets its greedy tokens and failed[b] = the error for each
    of its rows, instead of raising for the whole batch."""
    z = finite(z)
    if all(s == Sampling() for s in settings):  # the common case: plain greedy, one kernel
        return z.argmax(-1)
    out = torch.empty(z.shape[0], dtype=torch.long, device=z.device)
    groups: dict[Sampling, list[int]] = {}
    for b, s in enumerate(settings):
        groups.setdefault(s, []).append(b)
    for s, rows in groups.items():
        idx = torch.tensor(rows, device=z.device)
        try:
            out[idx] = pick_group(z.index_select(0, idx), s, [seen[b] for b in rows], [gens[b] for b in rows])
        except Exception as e:
            if failed is None:
                raise
            out[idx] = z.index_select(0, idx).argmax(-1)  # a placeholder: these rows end with the error
            failed.update({b: e for b in rows})
    return out


def pick_group(z: torch.Tensor, s: Sampling, seen: list[list[int]], gens: list[torch.Generator | None]) -> torch.Tensor:
    """Next token [b] for rows z [b, V] sharing the settings `s`."""
    scores = z
    procs = s.processors()
    if procs:
        ids = _seen_ids(seen, z.device) if s.repetition_penalty != 1.0 else None
        scores = finite(procs(ids, scores))
    if not s.sample:
        return scores.argmax(-1)
    probs = torch.softmax(scores, -1)
    # A row whose scores left nothing finite (all -inf) has no distribution: it takes its greedy token.
    ok = (torch.isfinite(probs).all(-1) & (probs.sum(-1) > 0)).tolist()
    return torch.cat([torch.multinomial(probs[j], 1, generator=g) if ok[j] else z[j].argmax(-1, keepdim=True)
                      for j, g in enumerate(gens)])
