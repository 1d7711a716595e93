"""Routing a model's attention through a wrapper of softprompt's, by transformers' public interface.

A wrapper is registered once per original implementation under `{prefix}_{original}` (attention
function and mask function alike) and receives the original's name as `inner`, so that it can call
it for the calls it leaves alone. The model then switches with set_attn_implementation.
"""
from __future__ import annotations

import functools
from typing import Callable

from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS


def route_attention(model, prefix: str, wrapper: Callable) -> None:
    """Make `wrapper(module, q, k, v, mask, ..., inner=original)` the model's attention; a no-op when
    it already is."""
    impl = model.config._attn_implementation
    if impl.startswith(prefix):
        return
    name = f"{prefix}_{impl}"
    if name not in ALL_ATTENTION_FUNCTIONS:
        ALL_ATTENTION_FUNCTIONS.register(name, functools.partial(wrapper, inner=impl))
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[impl]
                                              if impl in ALL_MASK_ATTENTION_FUNCTIONS else sdpa_mask)
    model.set_attn_implementation(name)
