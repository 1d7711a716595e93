"""PEFT's prefix-tuning adapter layout (peft_type PREFIX_TUNING) for prefix.PrefixPrompt; peft_io.py
calls this for a prefix, as it handles the soft prompt's PROMPT_TUNING itself.

PEFT stores a prefix as one tensor, `prompt_embeddings` [P, num_layers * 2 * token_dim], which it
views as [P, 2 * num_layers, num_attention_heads, token_dim / num_attention_heads] (keys of layer l
at 2l, values at 2l+1). Under grouped-query attention (a config with num_key_value_heads) PEFT
sets num_attention_heads to the key/value heads and token_dim to kv_heads * head_dim. With
prefix_projection PEFT saves its encoder's output, not the MLP: the file holds the folded keys and
values either way, so reading it needs no encoder. No `peft` import is needed here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..core.utils import SoftpromptError
from .prefix import KIND, PrefixPrompt, from_flat, to_flat
from .prompt import read_prompt_tensor

PEFT_TYPE = "PREFIX_TUNING"


def adapter(prompt: PrefixPrompt, model: str, geometry: dict) -> tuple[dict[str, Any], torch.Tensor]:
    """(adapter_config.json, the `prompt_embeddings` tensor) of a prefix; `geometry`: the base
    model's (num_layers, num_attention_heads) as read from its config, checked against the prefix."""
    L, heads, d = prompt.geometry
    if geometry.get("num_layers") not in (None, L):
        raise SoftpromptError(f"the prefix has {L} layers but {model!r} has {geometry['num_layers']}")
    cfg = {
        "peft_type": PEFT_TYPE,
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": model,
        "num_virtual_tokens": prompt.length,
        "num_layers": L,
        "token_dim": heads * d,
        "num_attention_heads": heads,  # PEFT's choice under GQA: the key/value heads
        "encoder_hidden_size": heads * d,
        "num_transformer_submodules": 1,
        "prefix_projection": False,
        "inference_mode": True,
        "revision": None,
        "modules_to_save": None,
        "auto_mapping": None,
    }
    return cfg, to_flat(prompt.key_values().detach()).contiguous()


def read_adapter(cfg: dict[str, Any], weights: Path, config_path: Path,
                 geometry: dict) -> tuple[torch.Tensor, dict[str, Any]]:
    """A PREFIX_TUNING adapter's keys and values [L, 2, heads, P, head_dim] and what to record about
    them; `geometry`: the base model's counts when its config could be read (checked)."""
    need = ("num_virtual_tokens", "num_layers", "token_dim", "num_attention_heads")
    missing = [k for k in need if not isinstance(cfg.get(k), int) or cfg[k] < 1]
    if missing:
        raise SoftpromptError(f"{config_path}: a prefix-tuning adapter needs positive integers {', '.join(missing)}")
    if cfg.get("num_transformer_submodules", 1) != 1:
        raise SoftpromptError(f"{config_path}: num_transformer_submodules {cfg['num_transformer_submodules']}: "
                              "only decoder-only (causal LM) prefixes can be imported")
    P, L, D, heads = (cfg[k] for k in need)
    if D % heads:
        raise SoftpromptError(f"{config_path}: token_dim {D} is not a multiple of num_attention_heads {heads}")
    t = read_prompt_tensor(weights, "adapter")
    if list(t.shape) != [P, L * 2 * D]:
        raise SoftpromptError(f"{weights}: prompt_embeddings has shape {list(t.shape)}, expected "
                              f"[{P}, {L * 2 * D}] (num_virtual_tokens, num_layers * 2 * token_dim)")
    layers, kv_heads = geometry.get("num_layers"), geometry.get("num_key_value_heads")
    if layers not in (None, L) or kv_heads not in (None, heads):
        raise SoftpromptError(f"{config_path}: the prefix has {L} layers and {heads} key/value heads, the base model "
                              f"has {layers} and {kv_heads}")
    meta = {"kind": KIND, "num_layers": L, "num_key_value_heads": heads, "head_dim": D // heads}
    return from_flat(t.float(), L, heads, D // heads).contiguous(), meta
