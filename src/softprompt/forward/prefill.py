"""Rows after their own prompts, as one left-padded batch with a key/value cache, and that batch
extended by more tokens per row: what decoding (generation/decode.py) grows one token at a time,
and what multi-token label scoring (classify.py) grows by each candidate's tokens. `PromptKV` keeps
each prompt's keys and values, computed once, for both.

Row layout (left padding, holes masked out):
    [pad .. prompt_i keys/values | pad .. text_i] then the tokens each extension feeds
Positions count each row's own real tokens, its prompt included, so a row sees exactly what it
would see alone. BLOOM takes no position ids: it derives ALiBi from the same mask. Families whose
window or positions follow the key's column (families.needs_contiguous_rows) must come one row at
a time, so that a row's prompt and text stay adjacent; the caller splits them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from ..base.families import decoder, takes_position_ids
from ..core.prompt_protocol import is_prompt
from .hidden import prefix_kv

KeyValues = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values) [batch, heads, positions, d]


@dataclass
class PrefixState:
    layers: KeyValues  # [1, heads, P, d]
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
    def get(self, prompt) -> PrefixState | None:
        """The cached state of `prompt` (a Prompt or its [P, H] embeddings; None: no prompt)."""
        if prompt is None or (not is_prompt(prompt) and prompt.shape[0] == 0):
            return None
        key = id(prompt)
        if key not in self.store or self.store[key].source is not prompt:
            if is_prompt(prompt):  # its own keys and values, whatever its kind
                layers, P = prompt.past_key_values(self.model), prompt.length
            else:
                dtype = self.model.get_input_embeddings().weight.dtype
                layers, P = prefix_kv(self.model, prompt.to(self.model.device, dtype))[0], prompt.shape[0]
            self.store[key] = PrefixState([(k.detach(), v.detach()) for k, v in layers], P, prompt)
        return self.store[key]

    def drop(self, prompt: torch.Tensor) -> None:
        self.store.pop(id(prompt), None)

    def retain(self, prompts: list[torch.Tensor]) -> None:
        """Forget every cached prompt not in `prompts` (the server's unloaded ones)."""
        keep = {id(p): p for p in prompts}
        for key in [k for k, s in self.store.items() if keep.get(k) is not s.source]:
            del self.store[key]


@dataclass
class Prefilled:
    layers: KeyValues   # the batch's cache [B, heads, L, d]
    mask: torch.Tensor  # [B, L]: 1 where a row has a real prompt or text token
    pos: torch.Tensor   # [B]: the position of each row's last token
    last: torch.Tensor | None  # [B, T, H]: hidden states of the tokens the call fed (None: not kept)


def prefill(model, prefixes: list[PrefixState | None], texts: list[list[int]], pad: int) -> Prefilled:
    """Each row's text (non-empty) after its prompt's keys and values (PromptKV.get's; None: no
    prompt), as one left-padded batch."""
    B, dev = len(texts), model.device
    plen = [p.length if p else 0 for p in prefixes]
    Pm, Tm = max(plen), max(len(t) for t in texts)
    ids = torch.full((B, Tm), pad, dtype=torch.long)
    mask = torch.zeros(B, Pm + Tm, dtype=torch.long)
    for i, t in enumerate(texts):
        ids[i, Tm - len(t):] = torch.tensor(t)
        mask[i, Pm - plen[i]:Pm] = 1
        mask[i, Pm + Tm - len(t):] = 1
    ids, mask = ids.to(dev), mask.to(dev)
    cache = DynamicCache()
    if Pm:
        ref = next(p.layers for p in prefixes if p)
        layers = []
        for li, (k0, v0) in enumerate(ref):
            K = k0.new_zeros(B, k0.shape[1], Pm, k0.shape[3])
            V = v0.new_zeros(B, v0.shape[1], Pm, v0.shape[3])
            for i, p in enumerate(prefixes):
                if p:
                    K[i, :, Pm - p.length:] = p.layers[li][0][0]
                    V[i, :, Pm - p.length:] = p.layers[li][1][0]
            layers.append((K, V))
        cache = DynamicCache(ddp_cache_data=layers)
    pos = (mask.cumsum(1) - 1).clamp(min=0)[:, Pm:]  # [B, Tm]
    kw = {"position_ids": pos} if takes_position_ids(model) else {}
    out = decoder(model)(inputs_embeds=model.get_input_embeddings()(ids), attention_mask=mask, cache=cache,
                         use_cache=True, **kw)
    return Prefilled([(layer.keys, layer.values) for layer in out.cache.layers], mask, pos[:, -1],
                     out.last_hidden_state)


def extend(model, state: Prefilled, ids: torch.Tensor, valid: torch.Tensor | None = None) -> Prefilled:
    """`state` with ids [B, L] fed after every row, right-padded where `valid` [B, L] is False (a pad
    comes after every real token of its row, so under the causal mask it changes none of them)."""
    valid = torch.ones_like(ids, dtype=torch.bool) if valid is None else valid
    mask = torch.cat([state.mask, valid.long()], 1)
    pos = state.pos[:, None] + torch.arange(1, ids.shape[1] + 1, device=ids.device)  # [B, L]
    kw = {"position_ids": pos} if takes_position_ids(model) else {}
    out = decoder(model)(inputs_embeds=model.get_input_embeddings()(ids), attention_mask=mask,
                         cache=DynamicCache(ddp_cache_data=state.layers), use_cache=True, **kw)
    return Prefilled([(layer.keys, layer.values) for layer in out.cache.layers], mask, pos[:, -1],
                     out.last_hidden_state)


def repeat_rows(state: Prefilled, index: torch.Tensor) -> Prefilled:
    """The rows of `state` picked (and repeated) by index [N], hidden states not kept: a row once per
    candidate that follows it."""
    return Prefilled([(k.index_select(0, index), v.index_select(0, index)) for k, v in state.layers],
                     state.mask.index_select(0, index), state.pos.index_select(0, index), None)
