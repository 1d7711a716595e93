"""The padding-free shared prefix: the soft prompt and every row of a batch as one packed sequence.

The prompt-KV path in hidden.py runs the prompt as its own batch of 1 and then the [B, T] text,
so each step passes over all weights twice and pays for every pad position. Here the decoder
sees a single [1, P + sum(L_b)] sequence: the prompt once, then each row's real tokens, no pads.
Every linear layer (nearly all the FLOPs) runs once on the real tokens only. Attention is the one
place where rows must stay apart: a row attends to the prompt and causally to itself, never to
another row. A registered attention function does that by gathering each layer's queries and
keys back into a padded [B, heads, T, d] layout with the prompt's keys in front, which costs only
attention's small share of the work.

Positions are those of the unpacked layout (prompt 0..P-1, every row P..P+L_b-1), so RoPE sees
exactly what the straightforward path sees. This needs models whose attention goes through
transformers' attention interface and whose positions come from `position_ids` (Llama, Qwen2,
Gemma, ...). BLOOM builds ALiBi from the 2D mask inside its own attention, and models with
sliding-window layers (Mistral, Gemma 2) need their own masks, so they keep the prompt-KV path
(families.can_pack decides).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..base.attention import route_attention
from ..base.families import can_pack, decoder
from ..base.half_attention import sdpa
from .paths import right_padded

IMPL = "softprompt_packed"  # prefix of the registered attention names


@dataclass
class Layout:
    """Where each row's tokens sit in the packed sequence [prompt, row 0, row 1, ...]."""
    P: int                  # prompt length, at packed positions 0..P-1
    valid: torch.Tensor     # [B, T] bool, right-padded rows
    pad: torch.Tensor       # [B*T] packed text index of each padded slot; pads point at L (a zero row)
    unpad: torch.Tensor     # [L] padded slot of each packed text token

    @classmethod
    def build(cls, P: int, attention_mask: torch.Tensor) -> "Layout":
        valid = attention_mask.bool()
        B, T = valid.shape
        t = torch.arange(T, device=valid.device)
        lengths = valid.sum(1)
        starts = torch.cumsum(lengths, 0) - lengths
        pad = torch.where(valid, starts[:, None] + t, lengths.sum()).flatten()
        unpad = torch.arange(B * T, device=valid.device)[valid.flatten()]
        return cls(P, valid, pad, unpad)

    def position_ids(self) -> torch.Tensor:
        """[1, N]: the prompt at 0..P-1 and every row from P on, as in the unpacked layout."""
        dev = self.valid.device
        t = torch.arange(self.valid.shape[1], device=dev)
        rows = (self.P + t).expand_as(self.valid)[self.valid]
        return torch.cat([torch.arange(self.P, device=dev), rows])[None]


def packable(model, attention_mask: torch.Tensor) -> bool:
    """True when this model and mask can take the packed path (see the module docstring)."""
    return can_pack(model) and right_padded(attention_mask)


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
               softprompt_layout: Layout | None = None, inner: str = "sdpa", **kwargs):
    """query [1, Hq, N, d], key/value [1, Hkv, N, d] of the packed sequence -> [1, N, Hq, d]."""
    lay = softprompt_layout
    if lay is None:  # not a packed call: exactly the model's own attention
        return ALL_ATTENTION_FUNCTIONS[inner](module, query, key, value, attention_mask,
                                              scaling=scaling, dropout=dropout, **kwargs)
    gqa = query.shape[1] != key.shape[1]  # grouped-query attention: fewer key/value heads
    P = lay.P
    q, k, v = query[0], key[0], value[0]  # [H, N, d]
    # clone(): SDPA saves its inputs for backward, and a slice would keep the whole [H, N, d] alive.
    head = sdpa(q[None, :, :P].clone(), k[None, :, :P].clone(), v[None, :, :P].clone(),
               is_causal=True, scale=scaling, enable_gqa=gqa)  # [1, H, P, d]

    B, T = lay.valid.shape
    # index_select both ways: its backward is an index_add, far cheaper on CPU than the
    # accumulating index_put behind advanced indexing or masked_scatter/masked_select.
    def rows(x):  # [H, N, d] -> [B, H, T, d] in the padded layout, zeros at pads
        H, _, d = x.shape
        text = torch.cat([x[:, P:], x.new_zeros(H, 1, d)], dim=1)
        return text.index_select(1, lay.pad).view(H, B, T, d).transpose(0, 1)

    def with_prompt(x):  # [B, H, P+T, d]: the prompt's keys or values in front of every row
        return torch.cat([x[None, :, :P].expand(B, -1, -1, -1), rows(x)], dim=2)

    # The prompt's queries in front make the layout square, so SDPA's causal flag (top-left aligned)
    # is exactly "the prompt, then causal within the row": query P+t sees keys 0..P+t. Pads come
    # after every real key of their row, so no mask is needed, and the causal kernel skips the upper
    # triangle that a boolean mask computes: at 2048-token rows that was about half of attention.
    out = sdpa(with_prompt(q), with_prompt(k), with_prompt(v), is_causal=True,
               scale=scaling, enable_gqa=gqa)[:, :, P:]  # [B, H, T, d]
    H, d = out.shape[1], out.shape[3]
    out = out.transpose(1, 2).reshape(B * T, H, d).index_select(0, lay.unpad)  # [L, H, d]
    out = torch.cat([head[0].transpose(0, 1), out])  # [N, H, d]
    return out[None], None


def enable_packing(model) -> None:
    """Route the model's attention through `_attention`, once: with no packed layout in the call it
    runs the model's own implementation (`inner`) unchanged, so only packed passes behave differently."""
    route_attention(model, IMPL, _attention)


def packed_hidden(model, prompt: torch.Tensor, x: torch.Tensor, attention_mask: torch.Tensor):
    """Text hidden states [B, T, H] (zeros at pads) and the prompt's last state [1, H], from one
    packed pass of prompt [P, H] and text embeddings x [B, T, H]."""
    enable_packing(model)
    P = prompt.shape[0]
    lay = Layout.build(P, attention_mask)
    seq = torch.cat([prompt, x[lay.valid]])[None]  # [1, N, H]
    h = decoder(model)(inputs_embeds=seq, position_ids=lay.position_ids(), use_cache=False,
                       softprompt_layout=lay).last_hidden_state[0]  # [N, H]
    out = h.new_zeros(x.shape).masked_scatter(lay.valid[..., None], h[P:])
    return out, h[P - 1][None]
