"""Choosing each row's next token: greedy, or sampled with temperature, top-p and a repetition
penalty, through transformers' logits processors, and OpenAI's presence and frequency penalties
(counted over the row's generated tokens only).

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
from transformers.generation.logits_process import (LogitsProcessor, LogitsProcessorList,
                                                    RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                    TopPLogitsWarper)


@dataclass(frozen=True)
class Sampling:
    """One row's decoding settings (GenerateConfig's, less the budget)."""
    sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @classmethod
    def of(cls, cfg) -> "Sampling":
        pens = (cfg.presence_penalty, cfg.frequency_penalty)
        if not cfg.sample:
            return cls(False, 1.0, 1.0, cfg.repetition_penalty, *pens)
        return cls(True, cfg.temperature, cfg.top_p, cfg.repetition_penalty, *pens)

    @property
    def penalised(self) -> bool:
        """Whether OpenAI's presence or frequency penalty is on (they read the generated ids)."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def processors(self) -> LogitsProcessorList:
        """The processors, in order; the presence/frequency one reads the generated ids, the
        repetition one every id (pick_group passes each its own)."""
        procs = LogitsProcessorList()
        if self.penalised:
            procs.append(PresenceFrequencyPenalty(self.presence_penalty, self.frequency_penalty))
        if self.repetition_penalty != 1.0:
            procs.append(RepetitionPenaltyLogitsProcessor(self.repetition_penalty))
        if self.sample:
            procs.append(TemperatureLogitsWarper(max(self.temperature, 1e-5)))
            if self.top_p < 1.0:
                procs.append(TopPLogitsWarper(self.top_p))
        return procs


class PresenceFrequencyPenalty(LogitsProcessor):
    """OpenAI's penalties (transformers has none like them): logit[j] -= frequency * c[j] +
    presence * (c[j] > 0), where c[j] counts j among the row's generated ids. Called with those
    ids [B, N] padded with -1 (`generated_ids`)."""

    def __init__(self, presence: float, frequency: float):
        self.presence, self.frequency = presence, frequency

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        counts = torch.zeros_like(scores)  # [B, V]
        counts.scatter_add_(1, input_ids.clamp(min=0), (input_ids >= 0).to(scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


def generated_ids(generated: list[list[int]], device) -> torch.Tensor:
    """[B, N] each row's generated ids, padded with -1 (N may be 0: nothing generated yet)."""
    N = max(len(g) for g in generated)
    return torch.tensor([g + [-1] * (N - len(g)) for g in generated], dtype=torch.long,
                        device=device).reshape(len(generated), N)


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
         gens: list[torch.Generator | None], failed: dict[int, Exception] | None = None,
         generated: list[list[int]] | None = None) -> torch.Tensor:
    """Next token per row [B] from logits z [B, V] (float). seen[b]: the ids in row b so far (only
    read with a repetition penalty); generated[b]: the ones it generated (the last of seen[b]; only
    read with a presence or frequency penalty, and then required); gens[b]: row b's generator when
    it samples. With `failed`, a group of rows whose processing raises gets its greedy tokens and
    failed[b] = the error for each of its rows, instead of raising for the whole batch."""
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
            gen_ids = [generated[b] for b in rows] if generated is not None else None
            out[idx] = pick_group(z.index_select(0, idx), s, [seen[b] for b in rows], [gens[b] for b in rows], gen_ids)
        except Exception as e:
            if failed is None:
                raise
            out[idx] = z.index_select(0, idx).argmax(-1)  # a placeholder: these rows end with the error
            failed.update({b: e for b in rows})
    return out


def pick_group(z: torch.Tensor, s: Sampling, seen: list[list[int]], gens: list[torch.Generator | None],
               generated: list[list[int]] | None = None) -> torch.Tensor:
    """Next token [b] for rows z [b, V] sharing the settings `s`."""
    scores = z
    if s.penalised and generated is None:
        raise ValueError("a presence or frequency penalty needs each row's generated ids")
    procs = s.processors()
    if procs:
        ids = _seen_ids(seen, z.device) if s.repetition_penalty != 1.0 else None
        gen_ids = generated_ids(generated, z.device) if s.penalised else None
        for p in procs:
            scores = p(gen_ids if isinstance(p, PresenceFrequencyPenalty) else ids, scores)
        scores = finite(scores)
    if not s.sample:
        return scores.argmax(-1)
    probs = torch.softmax(scores, -1)
    # A row whose scores left nothing finite (all -inf) has no distribution: it takes its greedy token.
    ok = (torch.isfinite(probs).all(-1) & (probs.sum(-1) > 0)).tolist()
    return torch.cat([torch.multinomial(probs[j], 1, generator=g) if ok[j] else z[j].argmax(-1, keepdim=True)
                      for j, g in enumerate(gens)])
