"""What softprompt needs to know about a model family, in one place.

Hugging Face causal LMs differ in a handful of ways that matter to a soft prompt:
- where the transformer stack without the LM head lives (`decoder`);
- whether positions come from `position_ids` (RoPE, learned) or from the mask (BLOOM's ALiBi),
  which decides how a left-padded mixed batch keeps each row's positions (`takes_position_ids`);
- whether the attention goes through transformers' attention interface with full (not sliding
  window) attention in every layer, which the packed shared prefix needs (`can_pack`);
- final-logit soft-capping (Gemma 2), which every logit computation must apply (`logit_softcap`);
- the longest sequence it was built for (`max_positions`).
A new family with a quirk of its own adds it here, plus its tiny model in tests/conftest.py.
"""
from __future__ import annotations

import inspect


def decoder(model):
    """The transformer stack without the LM head (LlamaModel, BloomModel, ...)."""
    return model.base_model


def takes_position_ids(model) -> bool:
    return "position_ids" in inspect.signature(decoder(model).forward).parameters


def can_pack(model) -> bool:
    """True when the attention goes through the attention interface, with full attention in every
    layer: local (sliding-window) layers would need their own masks in the packed layout."""
    if not getattr(model, "_supports_attention_backend", False):
        return False
    cfg = model.config
    if getattr(cfg, "sliding_window", None):
        return False
    return all(t == "full_attention" for t in getattr(cfg, "layer_types", None) or ())


def logit_softcap(model) -> float | None:
    return getattr(model.config, "final_logit_softcapping", None) or None


def max_positions(model) -> int | None:
    """Longest sequence the model was built for, or None when it has no fixed limit (ALiBi)."""
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions", "seq_length"):
        if getattr(cfg, key, None):
            return int(getattr(cfg, key))
    return None


def hidden_size(model) -> int:
    return model.get_input_embeddings().weight.shape[1]
