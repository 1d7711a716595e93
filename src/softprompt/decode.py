"""Decoding with soft prompts: each prompt's KV cache is computed once and reused, and one
batch may mix rows with different prompts (or none).

Row layout in a mixed batch (left padding on both parts, holes masked out):
    [pad .. prompt_i keys/values | pad .. text_i] then generated tokens
Positions continue from each row's own prompt length, so every row sees exactly what it would
see alone; greedy outputs match one-request-at-a-time decoding token for token.

`Decoding` runs such a batch one step at a time (the server streams from it and stops rows
early); generate.generate_batch drives it to the end.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from .batching import pad_id
from .config import GenerateConfig
from .families import decoder, max_positions, takes_position_ids
from .forward import logits, prefix_kv
from .utils import SoftpromptError


@dataclass
class PrefixState:
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values) [1, heads, P, d]
    length: int
    # The prompt tensor itself: keeps it alive so that its id() cannot be reused by another tensor
    # while this entry exists (a server loads and unloads prompts at run time).
    source: torch.Tensor | None = None


class PromptKV:
    """Per-prompt KV caches, computed on first use and kept (a prompt is a few KB; its KV a few MB).
    Not thread-safe: the server touches it from its one scheduler thread only."""

    def __init__(self, model):
        self.model = model
        self.store: dict[int, PrefixState] = {}

    @torch.no_grad()
    def get(self, prompt: torch.Tensor | None) -> PrefixState | None:
        if prompt is None or prompt.shape[0] == 0:
            return None
        key = id(prompt)
        if key not in self.store or self.store[key].source is not prompt:
            dtype = self.model.get_input_embeddings().weight.dtype
            layers, _ = prefix_kv(self.model, prompt.to(self.model.device, dtype))
            self.store[key] = PrefixState([(k.detach(), v.detach()) for k, v in layers], prompt.shape[0], prompt)
        return self.store[key]

    def drop(self, prompt: torch.Tensor) -> None:
        self.store.pop(id(prompt), None)

    def retain(self, prompts: list[torch.Tensor]) -> None:
        """Forget every cached prompt not in `prompts` (the server's unloaded ones)."""
        keep = {id(p): p for p in prompts}
        for key in [k for k, s in self.store.items() if keep.get(k) is not s.source]:
            del self.store[key]


def _pick(logits: torch.Tensor, seen: torch.Tensor, cfg: GenerateConfig,
          gen: torch.Generator | list[torch.Generator] | None):
    """Next token per row from logits [B, V]; `seen` [B, L] holds ids already in each row (-1 = none)."""
    if cfg.repetition_penalty != 1.0:
        valid = seen >= 0
        idx = seen.clamp(min=0)
        vals = logits.gather(1, idx)
        vals = torch.where(vals > 0, vals / cfg.repetition_penalty, vals * cfg.repetition_penalty)
        logits = logits.scatter(1, idx, torch.where(valid, vals, logits.gather(1, idx)))
    if not cfg.sample:
        return logits.argmax(-1)
    probs = torch.softmax(logits / max(cfg.temperature, 1e-5), -1)
    if cfg.top_p < 1.0:
        sp, si = probs.sort(-1, descending=True)
        drop = sp.cumsum(-1) - sp > cfg.top_p  # keep the smallest set whose mass reaches top_p
        sp = sp.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(1, si, sp)
    if isinstance(gen, list):  # one generator per row: a row's draws do not depend on its batch
        return torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(gen)])
    return torch.multinomial(probs, 1, generator=gen).squeeze(1)


class Decoding:
    """Step-wise decoding of one batch of rows: the prompts' cached KV and the texts are run once
    (prefill) on construction, then each `step()` returns every row's next token (None for a
    finished row). The server streams from it and stops rows early (stop strings, gone clients).

    Per row: its own token budget (`max_new`) and, when sampling, its own seeded generator
    (`seeds`), so a row's output does not depend on which other rows share its batch. Without
    `seeds` one generator seeded with `cfg.seed` serves the whole batch (generate_batch's way).
    The step's tokens reach the host once per step (one sync), not once per row.
    """

    @torch.no_grad()
    def __init__(self, model, tok, rows: list[tuple[torch.Tensor | None, list[int]]], cfg: GenerateConfig,
                 kv: PromptKV | None = None, max_new: list[int] | None = None, seeds: list[int] | None = None):
        self.model, self.cfg = model, cfg
        kv = kv or PromptKV(model)
        dev = self.dev = model.device
        prefixes = [kv.get(p) for p, _ in rows]
        plen = [s.length if s else 0 for s in prefixes]
        tlen = [len(ids) for _, ids in rows]
        self.max_new = list(max_new) if max_new is not None else [cfg.max_new_tokens] * len(rows)
        if min(tlen) == 0:
            raise SoftpromptError("empty input text: give at least one token to continue")
        B, Pm, Tm = len(rows), max(plen), max(tlen)
        limit = max_positions(model)
        # Positions count per row, so each row must fit on its own (not the batch's longest prompt + text).
        for i in range(B):
            if limit and plen[i] + tlen[i] + self.max_new[i] > limit:
                raise SoftpromptError(f"input too long: {plen[i]} virtual + {tlen[i]} text + {self.max_new[i]} "
                                      f"new tokens exceed the model's {limit} positions")
        self.pad = pad = pad_id(tok)
        ids = torch.full((B, Tm), pad, dtype=torch.long)
        mask = torch.zeros(B, Pm + Tm, dtype=torch.long)
        for i, (_, t) in enumerate(rows):
            ids[i, Tm - len(t):] = torch.tensor(t)
            mask[i, Pm - plen[i]:Pm] = 1
            mask[i, Pm + Tm - len(t):] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        cache = DynamicCache()
        if Pm:
            ref = next(s for s in prefixes if s)
            layers = []
            for li, (k0, v0) in enumerate(ref.layers):
                K = k0.new_zeros(B, k0.shape[1], Pm, k0.shape[3])
                V = v0.new_zeros(B, v0.shape[1], Pm, v0.shape[3])
                for i, s in enumerate(prefixes):
                    if s:
                        K[i, :, Pm - s.length:] = s.layers[li][0][0]
                        V[i, :, Pm - s.length:] = s.layers[li][1][0]
                layers.append((K, V))
            cache = DynamicCache(ddp_cache_data=layers)
        # Each row's positions count only its own real tokens (prompt included).
        pos = (mask.cumsum(1) - 1).clamp(min=0)[:, Pm:]
        self.with_pos = takes_position_ids(model)  # BLOOM derives positions (ALiBi) from the mask instead
        kw = {"position_ids": pos} if self.with_pos else {}
        self.out = decoder(model)(inputs_embeds=model.get_input_embeddings()(ids), attention_mask=mask,
                                  cache=cache, use_cache=True, **kw)
        self.mask, self.last_pos = mask, pos[:, -1]
        if not cfg.sample:
            self.gen = None
        elif seeds is None:
            self.gen = torch.Generator(device=dev).manual_seed(cfg.seed)
        else:
            self.gen = [torch.Generator(device=dev).manual_seed(s) for s in seeds]
        self.eos = eos_ids(model, tok)
        self.seen = torch.where(ids == pad, -1, ids) if cfg.repetition_penalty != 1.0 else ids
        self.new: list[list[int]] = [[] for _ in range(B)]
        self.done = [m <= 0 for m in self.max_new]
        self.stopped_by_eos = [False] * B
        self._fed: torch.Tensor | None = None  # last step's tokens, fed to the model on the next step

    @property
    def finished(self) -> bool:
        return all(self.done)

    def stop(self, i: int) -> None:
        """End row i now (its caller saw a stop string, or its client left); it stops costing compute
        in the sense that its later tokens are masked padding."""
        self.done[i] = True

    @torch.no_grad()
    def step(self) -> list[int | None]:
        """Each live row's next token (None for rows already finished); [] once all are finished."""
        if self.finished:
            return []
        model, cfg = self.model, self.cfg
        done_t = torch.tensor(self.done, device=self.dev)
        if self._fed is not None:  # feed the previous step's tokens (padding for finished rows)
            nxt = torch.where(done_t, torch.full_like(self._fed, self.pad), self._fed)
            if cfg.repetition_penalty != 1.0:
                self.seen = torch.cat([self.seen, torch.where(done_t, -1, nxt)[:, None]], 1)
            self.mask = torch.cat([self.mask, (~done_t).long()[:, None]], 1)
            self.last_pos = self.last_pos + 1
            kw = {"position_ids": self.last_pos[:, None]} if self.with_pos else {}
            self.out = decoder(model)(inputs_embeds=model.get_input_embeddings()(nxt[:, None]),
                                      attention_mask=self.mask, cache=self.out.cache, use_cache=True, **kw)
        z = logits(model, self.out.last_hidden_state[:, -1])
        self._fed = _pick(z, self.seen, cfg, self.gen)
        picked = self._fed.tolist()  # the step's one host sync
        res: list[int | None] = []
        for i, t in enumerate(picked):
            if self.done[i]:
                res.append(None)
                continue
            self.new[i].append(t)
            res.append(t)
            if t in self.eos:
                self.done[i] = self.stopped_by_eos[i] = True
            elif len(self.new[i]) >= self.max_new[i]:
                self.done[i] = True
        return res


def eos_ids(model, tok) -> set[int]:
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    gc_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(gc_eos) if isinstance(gc_eos, list) else ({gc_eos} if gc_eos is not None else set())
    return ids
