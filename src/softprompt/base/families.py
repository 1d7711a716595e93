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
- the longest sequence it was built for (`max_positions`);
- where its decoder layers are (`decoder_layers`: sharding, activation checkpointing), and the
  shape of its key/value cache (`kv_geometry`: the static decoder's slot buffers);
- the names its config.json gives the layer and head counts (`layer_and_head_counts`,
  `kv_head_count`: PEFT's config, a prefix's geometry);
- whether the packed sequence can run under one dense [N, N] mask (`dense_mask_obstacle`: the
  CUDA-graphed training step).
A new family with a quirk of its own adds it here, plus its tiny model in tests/conftest.py.
"""
from __future__ import annotations

import inspect

from ..core.utils import SoftpromptError


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


def dense_mask_obstacle(model) -> str | None:
    """Why the packed sequence cannot run under one dense 4D mask (None when it can): SDPA takes
    such a mask as it is; the other attention implementations are not known to."""
    impl = model.config._attn_implementation
    if not str(impl).endswith("sdpa"):
        return f"attention implementation {impl!r} (the dense mask needs SDPA)"
    return packing_obstacle(model)


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


def check_positions(model, virtual_tokens: int, tokens: int = 0, scoring: bool = False) -> None:
    """The prompt and the longest example (`tokens`) fit the model's positions together; checked
    before training allocates anything for them (100000 virtual tokens once ran out of memory), and
    before a scoring command (`scoring`: its prompt is made) runs rows past learnt position tables."""
    limit = max_positions(model)
    if limit is not None and virtual_tokens + max(tokens, 1) > limit:
        if scoring:
            raise SoftpromptError(f"the prompt's {virtual_tokens} virtual token(s) + {max(tokens, 1)} token(s) of the "
                                  f"longest row exceed the model's {limit} positions: use a smaller --max-length")
        raise SoftpromptError(f"--virtual-tokens {virtual_tokens} + {max(tokens, 1)} token(s) of the longest example "
                              f"exceed the model's {limit} positions: use fewer --virtual-tokens or a smaller "
                              "--max-length")


def hidden_size(model) -> int:
    return model.get_input_embeddings().weight.shape[1]


def decoder_layers(model) -> list:
    """The decoder layers (transformers marks each with GradientCheckpointingLayer), in order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def kv_geometry(model) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of the model's key/value cache."""
    cfg = model.config
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    if cfg.model_type == "falcon" and not cfg.new_decoder_architecture:
        heads = 1 if cfg.multi_query else cfg.num_attention_heads  # its num_kv_heads counts only in the new one
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_hidden_layers, heads, d


def layer_and_head_counts(config: dict) -> tuple[int | None, int | None]:
    """(layers, attention heads) from a config.json's dict; the names differ by family:
    num_hidden_layers (Llama...), n_layer (GPT-2, BLOOM), n_layers (MPT)."""
    layers = next((config[k] for k in ("num_hidden_layers", "n_layer", "n_layers") if config.get(k)), None)
    heads = next((config[k] for k in ("num_attention_heads", "n_head", "n_heads") if config.get(k)), None)
    return layers, heads


def config_geometry(config: dict) -> dict[str, int | None]:
    """What a prompt must match in a config.json's dict: the hidden size (a soft prompt's width), and
    the layers, key/value heads and head dim (a prefix's cache); None where the config does not say."""
    layers, heads = layer_and_head_counts(config)
    hidden = config.get("hidden_size") or config.get("n_embd") or config.get("d_model")
    return {"hidden_size": hidden, "num_layers": layers, "num_key_value_heads": kv_head_count(config),
            "head_dim": config.get("head_dim") or (hidden // heads if hidden and heads else None)}


def geometry_mismatches(ours: dict[str, int], config: dict) -> list[str]:
    """"KEY VALUE (the model's: OTHER)" for each of `ours` (config_geometry's keys) that a config.json's
    dict says otherwise."""
    theirs = config_geometry(config)
    return [f"{k} {v} (the model's: {theirs[k]})" for k, v in ours.items() if theirs[k] is not None and theirs[k] != v]


def kv_head_count(config: dict) -> int | None:
    """Key/value heads from a config.json's dict: num_key_value_heads under grouped-query attention
    (PEFT's prefix layout uses it), else every attention head has its own (BLOOM, GPT-2...)."""
    return config.get("num_key_value_heads") or layer_and_head_counts(config)[1]
