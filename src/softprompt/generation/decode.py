"""Decoding with soft prompts, continuously batched: each prompt's KV cache is computed once and
reused, one batch mixes rows with different prompts (or none), rows join a running batch between
steps and leave it as soon as they finish.

Row layout (forward/prefill.py; left padding, holes masked out):
    [pad .. prompt_i keys/values | pad .. text_i] then generated tokens
Positions continue from each row's own prompt length, so every row sees exactly what it would
see alone; greedy outputs match one-request-at-a-time decoding token for token. Rows that join
are prefilled as a group of their own; at the next step their cache is left-padded to the running
batch's length (or the batch's to theirs) and stacked under it. Families whose window or
positions follow the key's column (families.needs_contiguous_rows) prefill each row alone, so
that its prompt and text stay adjacent.

`DecodeBatch` is the engine (the server's scheduler feeds it, generate.generate_batch drives it).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..base.families import max_positions, needs_contiguous_rows
from ..core.config import GenerateConfig
from ..core.utils import SoftpromptError
from ..data.batching import pad_id
from ..forward.hidden import logits
from ..forward.prefill import Prefilled, PrefixState, PromptKV, extend, prefill
from .sampling import Sampling, pick


@dataclass(eq=False)
class Row:
    """One request's state while it decodes, and its result once it has finished."""
    id: int
    max_new: int
    sampling: Sampling
    gen: torch.Generator | None
    seen: list[int]                         # input ids then new ones (for the repetition penalty)
    new: list[int] = field(default_factory=list)  # the generated ones (presence/frequency penalties count these)
    done: bool = False
    stopped_by_eos: bool = False
    error: Exception | None = None  # choosing its next token failed: it ended there (sampling.pick's `failed`)


@dataclass
class Group:
    """Rows in one batch: their cache, mask [B, L], last positions [B], next-token logits [B, V]
    and the tokens they feed at the next step [B]."""
    rows: list[Row]
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values) [B, heads, L, d]
    mask: torch.Tensor
    pos: torch.Tensor
    z: torch.Tensor
    fed: torch.Tensor | None = None

    def select(self, keep: list[int]) -> None:
        idx = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        self.rows = [self.rows[i] for i in keep]
        self.layers = [(k.index_select(0, idx), v.index_select(0, idx)) for k, v in self.layers]
        self.mask, self.pos, self.z = (t.index_select(0, idx) for t in (self.mask, self.pos, self.z))
        if self.fed is not None:
            self.fed = self.fed.index_select(0, idx)

    def stack(self, other: "Group") -> None:
        """Append `other`'s rows, left-padding the shorter cache so both end at the same column."""
        L = max(self.mask.shape[1], other.mask.shape[1])
        pad4 = lambda t: F.pad(t, (0, 0, L - t.shape[2], 0))  # noqa: E731 - left-pad [B, H, L, d]
        pad2 = lambda m: F.pad(m, (L - m.shape[1], 0))  # noqa: E731
        self.layers = [(torch.cat([pad4(k), pad4(k2)]), torch.cat([pad4(v), pad4(v2)]))
                       for (k, v), (k2, v2) in zip(self.layers, other.layers)]
        self.mask = torch.cat([pad2(self.mask), pad2(other.mask)])
        self.pos = torch.cat([self.pos, other.pos])
        self.z = torch.cat([self.z, other.z])
        self.rows += other.rows
        self.fed = None  # picked for all rows after stacking

    def trim(self) -> None:
        """Drop leading columns no row attends to (left by rows that have left)."""
        first = int(self.mask.any(0).int().argmax())
        if first:
            self.layers = [(k[:, :, first:], v[:, :, first:]) for k, v in self.layers]
            self.mask = self.mask[:, first:]


class DecodeBatch:
    """Rows decoding together. `add` prefills new rows (they join at the next `step`); `step` gives
    every live row one token and returns {row id: token}; finished rows (EOS, budget, `stop`)
    leave the batch at once and wait in `results` until `pop`ped. One host sync per step."""

    def __init__(self, model, tok, kv: PromptKV | None = None):
        self.model, self.tok = model, tok
        self.kv = kv or PromptKV(model)
        self.dev = model.device
        self.pad, self.eos = pad_id(tok), eos_ids(model, tok)
        self.limit = max_positions(model)
        self.live: Group | None = None
        self.joining: list[Group] = []
        self.results: dict[int, Row] = {}
        self.next_id = 0

    @property
    def finished(self) -> bool:
        return self.live is None and not self.joining

    @property
    def size(self) -> int:
        return (len(self.live.rows) if self.live else 0) + sum(len(g.rows) for g in self.joining)

    def _check(self, rows, max_new: list[int]) -> list[PrefixState | None]:
        prefixes = [self.kv.get(p) for p, _ in rows]
        for (_, ids), pre, n in zip(rows, prefixes, max_new):
            if not ids:
                raise SoftpromptError("empty input text: give at least one token to continue")
            P = pre.length if pre else 0
            # Positions count per row, so each row must fit on its own.
            if self.limit and P + len(ids) + n > self.limit:
                raise SoftpromptError(f"input too long: {P} virtual + {len(ids)} text + {n} new tokens exceed "
                                      f"the model's {self.limit} positions")
        return prefixes

    @torch.no_grad()
    def add(self, rows: list[tuple[torch.Tensor | None, list[int]]], cfg: GenerateConfig,
            max_new: list[int] | None = None, seeds: list[int] | None = None) -> list[int]:
        """Prefill rows of (soft prompt [P, H] or None, input ids); returns their row ids. Each row
        has its own budget (`max_new`, default cfg.max_new_tokens) and, when sampling, its own
        generator (seeds[i], default cfg.seed + i)."""
        if not rows:
            return []
        max_new = list(max_new) if max_new is not None else [cfg.max_new_tokens] * len(rows)
        prefixes = self._check(rows, max_new)
        sampling = Sampling.of(cfg)
        seeds = seeds if seeds is not None else [cfg.seed + i for i in range(len(rows))]
        states = []
        for (_, ids), n, seed in zip(rows, max_new, seeds):
            gen = torch.Generator(device=self.dev).manual_seed(seed) if cfg.sample else None
            states.append(Row(self.next_id, n, sampling, gen, list(ids), done=n <= 0))
            self.next_id += 1
        texts = [ids for _, ids in rows]
        if needs_contiguous_rows(self.model):  # no padding between a row's prompt and its text
            self.joining += [self.prefill([s], [p], [t]) for s, p, t in zip(states, prefixes, texts)]
        else:
            self.joining.append(self.prefill(states, prefixes, texts))
        return [s.id for s in states]

    def prefill(self, states: list[Row], prefixes: list[PrefixState | None], texts: list[list[int]]) -> Group:
        pre = prefill(self.model, prefixes, texts, self.pad)
        return Group(states, pre.layers, pre.mask, pre.pos, logits(self.model, pre.last[:, -1]))

    def stop(self, row_id: int) -> None:
        """End a row now (its caller saw a stop string, or its client left): it leaves at the next step."""
        for g in ([self.live] if self.live else []) + self.joining:
            for r in g.rows:
                if r.id == row_id:
                    r.done = True

    def pop(self, row_id: int) -> Row:
        return self.results.pop(row_id)

    def retire(self, g: Group) -> Group | None:
        """Move finished rows out of `g` into `results`; None when none is left."""
        keep = [i for i, r in enumerate(g.rows) if not r.done]
        for r in g.rows:
            if r.done:
                self.results[r.id] = r
        if not keep:
            return None
        if len(keep) < len(g.rows):
            g.select(keep)
            g.trim()
        return g

    def _forward_live(self) -> None:
        """Feed the live rows' last tokens: one new column of cache and fresh logits."""
        g = self.live
        out = extend(self.model, Prefilled(g.layers, g.mask, g.pos, None), g.fed[:, None])
        g.layers, g.mask, g.pos = out.layers, out.mask, out.pos
        g.z = logits(self.model, out.last[:, -1])

    @torch.no_grad()
    def step(self) -> dict[int, int]:
        """One token for every live row: {row id: token}."""
        if self.live is not None:
            self.live = self.retire(self.live)  # rows stopped since the last step leave first
        if self.live is not None:
            self._forward_live()
        for g in self.joining:
            g = self.retire(g)
            if g is None:
                continue
            if self.live is None:
                self.live = g
            else:
                self.live.stack(g)
        self.joining = []
        if self.live is None:
            return {}
        self.live.fed, out = self.pick_and_record(self.live.z, self.live.rows)
        return out

    def pick_and_record(self, z: torch.Tensor, rows: list[Row]) -> tuple[torch.Tensor, dict[int, int]]:
        """Each row's next token from logits z [B, V], appended to the row (which is done at EOS or
        at its budget): the picks [B] on the device, and {row id: token}. A row whose token could not
        be chosen ends with its `error` (and no token); the other rows go on."""
        failed: dict[int, Exception] = {}
        picks = pick(z, [r.sampling for r in rows], [r.seen for r in rows], [r.gen for r in rows], failed,
                     generated=[r.new for r in rows])
        out = {}
        for b, (r, t) in enumerate(zip(rows, picks.tolist())):  # the step's one host sync
            if b in failed:
                r.done, r.error = True, failed[b]
                continue
            out[r.id] = t
            r.new.append(t)
            r.seen.append(t)
            if t in self.eos:
                r.done = r.stopped_by_eos = True
            elif len(r.new) >= r.max_new:
                r.done = True
        return picks, out


def eos_ids(model, tok) -> set[int]:
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    gc_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(gc_eos) if isinstance(gc_eos, list) else ({gc_eos} if gc_eos is not None else set())
    return ids
