"""Attention in float32 while a half-precision base trains on a CPU over short rows.

torch's CPU scaled-dot-product attention runs its backward far slower in half precision than in
float32 over short rows: forward and backward over 8 rows of 64 tokens (9 heads, 3 key/value heads)
took 5.4 ms in bf16 against 2.0 ms in fp32 (torch 2.13, AMD EPYC Zen 5 with avx512_bf16;
bench/results/cpu_bf16_amd_epyc.json), and fp16 is slower still (16.8 against 3.1 ms at 80 tokens).
Profiled, attention took about 30% of a bf16 training step of the built-in model on SST-2 (4% in
fp32). So where a backward will run through attention (q, k or v requires grad), queries, keys and
values are cast to fp32 and the output back: the linear layers, nearly all the FLOPs, stay in the
half dtype, and the casts cost about 0.1 ms a layer. bf16's kernel catches up as rows grow: on that
CPU the two measured within 3% from 192 to 256 keys, and bf16 1.2x faster at 512, so rows of more
than 256 keys keep it. A prefix being trained comes in fp32 at any length (`takes_fp32_keys`,
prompts/prefix.py): rounded to bf16 before attention, its keys and values lost 2 points on RTE.
Passes without a backward (eval, serving, generation) run as the model's own attention; so does
everything on a GPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .attention import route_attention

IMPL = "softprompt_fp32"  # prefix of the registered attention name: softprompt_fp32_sdpa
HALF = (torch.bfloat16, torch.float16)
MAX_KEYS = 256  # the longest key sequence attended in fp32: bf16 and fp32-cast measured within 3% there


def upcasts(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether attention runs in fp32: half precision on a CPU with a backward to come through it,
    also where only the keys and values carry one (a prompt's cached keys and values attended by rows
    of frozen embeddings), over at most MAX_KEYS keys, or at any length where keys come in fp32 (a
    prefix being trained, `takes_fp32_keys`)."""
    grad = query.requires_grad or key.requires_grad or value.requires_grad
    return (grad and query.device.type == "cpu" and query.dtype in HALF
            and (key.shape[-2] <= MAX_KEYS or key.dtype != query.dtype or value.dtype != query.dtype))


def in_fp32(query, key, value, mask):
    """(query, key, value, mask) cast to fp32; a boolean mask stays as it is, an additive one must match q."""
    if mask is not None and mask.is_floating_point():
        mask = mask.float()
    return query.float(), key.float(), value.float(), mask


def sdpa(query, key, value, attn_mask=None, **kwargs) -> torch.Tensor:
    """F.scaled_dot_product_attention, in fp32 where `upcasts`, returned in query's dtype."""
    if not upcasts(query, key, value):
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, **kwargs)
    return F.scaled_dot_product_attention(*in_fp32(query, key, value, attn_mask), **kwargs).to(query.dtype)


def _attention(module, query, key, value, attention_mask, *args, inner: str = "sdpa", **kwargs):
    """The model's own attention `inner` (q [B, Hq, T, d], k/v [B, Hkv, S, d] -> [B, T, Hq, d]),
    in fp32 where `upcasts`."""
    fn = ALL_ATTENTION_FUNCTIONS[inner]
    if not upcasts(query, key, value):
        return fn(module, query, key, value, attention_mask, *args, **kwargs)
    out, weights = fn(module, *in_fp32(query, key, value, attention_mask), *args, **kwargs)
    return out.to(query.dtype), weights


def takes_fp32_keys(model) -> bool:
    """Whether the model's attention takes fp32 keys and values beside half-precision queries where a
    backward follows: it is routed through `_attention` (use_fp32_attention), which attends them in fp32,
    perhaps inside another route (gqa_attention's, packing's)."""
    return IMPL in model.config._attn_implementation


def use_fp32_attention(model) -> bool:
    """Route a half-precision CPU model's SDPA attention through `_attention`; True when it did.
    Other implementations, dtypes and devices are left as they are: only SDPA's CPU backward was
    measured slow."""
    if model.device.type != "cpu" or model.dtype not in HALF or model.config._attn_implementation != "sdpa":
        return False
    route_attention(model, IMPL, _attention)
    return True
