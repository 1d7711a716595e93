"""What softprompt needs to know about a model family, in one place.

Hugging Face causal LMs differ in a handful of ways that matter to a soft prompt:
- where the transformer stack without the LM head lives (`decoder`);
- whether positions come from `position_ids` (RoPE, learned) or from the mask (BLOOM's ALiBi),
  which decides how a left-padded mixed batch keeps each row's positions (`takes_position_ids`);
- whether the attention goes through transformers' attention interface with full (not sliding
  window) attention in every layer, which the packed shared prefix needs (`can_pack`);
- final-logit scaling (Cohere multiplies by `logit_scale`, Granite divides by `logits_scaling`) and
  soft-capping (Gemma 2): every logit computation must apply them (`logit_scale`, `logit_softcap`);
- sliding-window attention (Mistral, Gemma 2/3, Phi-3, Starcoder2, GPT-OSS) or positions taken from
  the key's column (MPT's ALiBi): a row's real tokens must then be contiguous, with no padding
  between its prompt and its text (`needs_contiguous_rows`);
- the longest sequence it was built for (`max_positions`).
A new family with a quirk of its own adds it here, plus its tiny model in tests/conftest.py.
"""
from __future__ import annotations

import inspect

from .utils import SoftpromptError


def decoder(model):
    """The transformer stack without the LM head (LlamaModel, BloomModel, ...)."""
    return model.base_model


def takes_position_ids(model) -> bool:
    return "position_ids" in inspect.signature(decoder(model).forward).parameters


def packing_obstacle(model) -> str | None:
    """Why the packed shared prefix cannot run on this model (None when it can): it needs the
    attention interface and full attention in every layer (local layers need masks of their own)."""
    if not getattr(model, "_supports_attention_backend", False):
        return f"{model.config.model_type} computes attention itself (not through the attention interface)"
    cfg = model.config
    if getattr(cfg, "sliding_window", None) or any(t != "full_attention" for t in getattr(cfg, "layer_types", None) or ()):
        return f"{model.config.model_type} has sliding-window layers"
    return None


def can_pack(model) -> bool:
    return packing_obstacle(model) is None


def logit_softcap(model) -> float | None:
    return getattr(model.config, "final_logit_softcapping", None) or None


def logit_scale(model) -> float:
    """The factor the family's LM head applies to its logits (before any soft-capping)."""
    cfg = model.config
    if getattr(cfg, "logits_scaling", None):  # Granite divides
        return 1.0 / cfg.logits_scaling
    return float(getattr(cfg, "logit_scale", None) or 1.0)  # Cohere multiplies


def sliding_window(model) -> int | None:
    cfg = model.config
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None) or ()
    return window if window and (not types or any(t != "full_attention" for t in types)) else None


def needs_contiguous_rows(model) -> bool:
    """Padding between a row's prompt and its text would shift what a window or a column-based
    position sees: such rows are prefilled one at a time (no holes) instead of in a padded batch."""
    return sliding_window(model) is not None or model.config.model_type == "mpt"


def max_positions(model) -> int | None:
    """Longest sequence the model was built for, or None when it has no fixed limit (ALiBi)."""
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions", "seq_length"):
        if getattr(cfg, key, None):
            return int(getattr(cfg, key))
    return None


def check_positions(model, virtual_tokens: int, tokens: int = 0) -> None:
    """The prompt and the longest example (`tokens`) fit the model's positions together; checked
    before training allocates anything for them (100000 virtual tokens once ran out of memory)."""
    limit = max_positions(model)
    if limit is not None and virtual_tokens + max(tokens, 1) > limit:
        raise SoftpromptError(f"--virtual-tokens {virtual_tokens} + {max(tokens, 1)} token(s) of the longest example "
                              f"exceed the model's {limit} positions: use fewer --virtual-tokens or a smaller "
                              "--max-length")


def hidden_size(model) -> int:
    return model.get_input_embeddings().weight.shape[1]
