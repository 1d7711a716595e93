"""Generation with soft prompts: each prompt's KV cache is computed once and reused, and one
batch may mix rows with different prompts (or none).

Row layout in a mixed batch (left padding on both parts, holes masked out):
    [pad .. prompt_i keys/values | pad .. text_i] then generated tokens
Positions continue from each row's own prompt length, so every row sees exactly what it would
see alone; greedy outputs match one-request-at-a-time decoding token for token.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from .config import GenerateConfig
from .data import chat_wrap, pad_id
from .forward import decoder, prefix_kv, _logits
from .models import max_positions
from .utils import SoftpromptError


@dataclass
class PrefixState:
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values) [1, heads, P, d]
    length: int


class PromptKV:
    """Per-prompt KV caches, computed on first use and kept (a prompt is a few KB; its KV a few MB)."""

    def __init__(self, model):
        self.model = model
        self.store: dict[int, PrefixState] = {}

    @torch.no_grad()
    def get(self, prompt: torch.Tensor | None) -> PrefixState | None:
        if prompt is None or prompt.shape[0] == 0:
            return None
        key = id(prompt)
        if key not in self.store:
            dtype = self.model.get_input_embeddings().weight.dtype
            layers, _ = prefix_kv(self.model, prompt.to(self.model.device, dtype))
            self.store[key] = PrefixState([(k.detach(), v.detach()) for k, v in layers], prompt.shape[0])
        return self.store[key]

    def drop(self, prompt: torch.Tensor) -> None:
        self.store.pop(id(prompt), None)


def _accepts_positions(model) -> bool:
    return "position_ids" in inspect.signature(decoder(model).forward).parameters


def _pick(logits: torch.Tensor, seen: torch.Tensor, cfg: GenerateConfig, gen: torch.Generator | None):
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
    return torch.multinomial(probs, 1, generator=gen).squeeze(1)


@torch.no_grad()
def generate_batch(model, tok, rows: list[tuple[torch.Tensor | None, list[int]]], cfg: GenerateConfig,
                   kv: PromptKV | None = None) -> list[list[int]]:
    """Generate for rows of (soft prompt [P, H] or None, input token ids); returns new token ids."""
    if not rows:
        return []
    kv = kv or PromptKV(model)
    dev = model.device
    prefixes = [kv.get(p) for p, _ in rows]
    plen = [s.length if s else 0 for s in prefixes]
    tlen = [len(ids) for _, ids in rows]
    if min(tlen) == 0:
        raise SoftpromptError("empty input text: give at least one token to continue")
    B, Pm, Tm = len(rows), max(plen), max(tlen)
    limit = max_positions(model)
    if limit and Pm + Tm + cfg.max_new_tokens > limit:
        raise SoftpromptError(f"input too long: {Pm} virtual + {Tm} text + {cfg.max_new_tokens} new tokens "
                              f"exceed the model's {limit} positions")
    pad = pad_id(tok)
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
    with_pos = _accepts_positions(model)  # BLOOM derives positions (ALiBi) from the mask instead
    kw = {"position_ids": pos} if with_pos else {}
    out = decoder(model)(inputs_embeds=model.get_input_embeddings()(ids), attention_mask=mask, cache=cache,
                         use_cache=True, **kw)
    gen = torch.Generator(device=dev).manual_seed(cfg.seed) if cfg.sample else None
    eos = eos_ids(model, tok)
    seen = torch.where(ids == pad, -1, ids) if cfg.repetition_penalty != 1.0 else ids
    new: list[list[int]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    last_pos = pos[:, -1]
    for step in range(cfg.max_new_tokens):
        logits = _logits(model, out.last_hidden_state[:, -1])
        nxt = _pick(logits, seen, cfg, gen)
        for i in range(B):
            if not done[i]:
                new[i].append(int(nxt[i]))
                if int(nxt[i]) in eos:
                    done[i] = True
        if bool(done.all()) or step == cfg.max_new_tokens - 1:
            break
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        if cfg.repetition_penalty != 1.0:
            seen = torch.cat([seen, torch.where(done, -1, nxt)[:, None]], 1)
        mask = torch.cat([mask, (~done).long()[:, None]], 1)
        last_pos = last_pos + 1
        kw = {"position_ids": last_pos[:, None]} if with_pos else {}
        out = decoder(model)(inputs_embeds=model.get_input_embeddings()(nxt[:, None]), attention_mask=mask,
                             cache=out.cache, use_cache=True, **kw)
    return [[t for t in r if t not in eos] for r in new]


def eos_ids(model, tok) -> set[int]:
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    gc_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(gc_eos) if isinstance(gc_eos, list) else ({gc_eos} if gc_eos is not None else set())
    return ids


def encode_for_generation(tok, text: str, chat: bool = False) -> list[int]:
    if chat:  # the chat template already holds its special tokens
        return tok(chat_wrap(tok, text), add_special_tokens=False).input_ids
    return tok(text).input_ids
