"""Grouped-query attention that keeps each key/value head once for backward, on a CPU.

transformers' SDPA attention copies every key/value head once per query head of its group
(`repeat_kv`) whenever it passes SDPA a mask and the device is not an XPU or MPS: it asks torch's
`enable_gqa` only of mask-free calls, because CUDA's fast kernels refuse it with a mask. A prefix's
rows always carry a mask (its keys and values in front of right-padded rows), and SDPA saves its
inputs for backward, so every layer kept its keys and values `groups` times over: for the built-in
model (9 query heads, 3 key/value heads) three copies of each, two of them redundant. torch's CPU kernel takes
`enable_gqa` with a mask, computes the same scores from the same head, and skips the copies.

Only calls that record a graph on a CPU take it, as base/cpu_linear.py's kernel does: passes
without a backward (eval, serving, generation) keep the model's own attention, which their
batched-equals-alone checks were measured with. An attention module takes it while its
`softprompt_gqa` is true (`use_gqa_attention`), so the benches can switch it per path on a shared base.
"""
from __future__ import annotations

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .attention import route_attention
from .half_attention import IMPL as FP32_IMPL, sdpa

IMPL = "softprompt_gqa"  # prefix of the registered attention name
# The implementations routed (the `inner` of every `_attention`), whose masked grouped-query call it
# reproduces: SDPA, and SDPA with half_attention's fp32 cast, which half_attention.sdpa applies alike.
SDPA = ("sdpa", f"{FP32_IMPL}_sdpa")


def takes_gqa(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask, kwargs) -> bool:
    """Whether this call goes to SDPA with `enable_gqa` here rather than to the model's own attention:
    a grouped-query module switched on (use_gqa_attention switches no other), a CPU call that records
    a graph, a mask (without one, transformers already passes enable_gqa), more than one query (one
    query takes transformers' own reshape), head sizes up to 256 as transformers requires of
    enable_gqa, and nothing that SDPA's plain call would not apply (ALiBi bias, soft-capping, weights)."""
    return (getattr(module, "softprompt_gqa", False) and attention_mask is not None
            and query.device.type == "cpu" and query.shape[2] > 1
            and key.shape[-1] == value.shape[-1] <= 256
            and torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
            and kwargs.get("position_bias") is None and kwargs.get("softcap") is None
            and not kwargs.get("output_attentions"))


def _attention(module, query, key, value, attention_mask, *args, dropout=0.0, scaling=None,
               inner: str = "sdpa", **kwargs):
    """q [B, Hq, T, d], k/v [B, Hkv, S, d], mask [B, 1, T, S] -> ([B, T, Hq, d], None), as `inner` computes it."""
    if args or not takes_gqa(module, query, key, value, attention_mask, kwargs):
        return ALL_ATTENTION_FUNCTIONS[inner](module, query, key, value, attention_mask, *args,
                                              dropout=dropout, scaling=scaling, **kwargs)
    # With a mask transformers computes non-causally (the mask holds causality): so does this call
    out = sdpa(query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def use_gqa_attention(model, on: bool = True) -> int:
    """Route a CPU model's SDPA attention through `_attention` (once) and switch its grouped-query
    modules on (`on=False`: off); returns how many modules take it. Other implementations, models
    without grouped-query attention and other devices are left as they are."""
    impl = model.config._attn_implementation
    if impl in SDPA and model.device.type == "cpu":
        route_attention(model, IMPL, _attention)
    if IMPL not in model.config._attn_implementation:  # routed now or before (perhaps inside packing's route)
        return 0
    grouped = [m for m in model.modules() if getattr(m, "num_key_value_groups", 1) > 1]
    for m in grouped:
        m.softprompt_gqa = on
    return len(grouped) if on else 0
