"""PEFT's P-tuning adapter layout (peft_type P_TUNING, its PromptEncoder) read as an ordinary soft
prompt; peft_io.py calls this for such an adapter.

PEFT's save_pretrained runs the encoder once and stores its output as `prompt_embeddings` [P, H]
(get_prompt_embedding_to_save), the very tensor a prompt-tuning adapter holds: that is read as it
is. A file of the encoder's own tensors instead (PEFT's PromptEncoder state_dict: `embedding.weight`,
`mlp_head.*`, `lstm_head.*`) is built as ptuning_encoder.PromptEncoder from adapter_config.json and
run here once. Either way what is imported is the prompt the encoder produces; exporting it
(export-peft) writes a PROMPT_TUNING adapter, which PEFT loads as it would the P-tuning one in
inference mode. No `peft` import is needed here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..core.utils import SoftpromptError, short
from .prompt import TENSOR_NAME, read_prompt_tensor
from .ptuning_encoder import LSTM_LAYERS, PromptEncoder

PEFT_TYPE = "P_TUNING"
ENCODER_KEY = "embedding.weight"  # the encoder's input embedding, in its state_dict


def encoder_from_peft(cfg: dict[str, Any], tensors: dict[str, torch.Tensor]) -> PromptEncoder:
    """A PromptEncoder from a P_TUNING adapter_config.json and the encoder's state_dict; raises
    ValueError or RuntimeError when they do not fit together."""
    P, H = tensors[ENCODER_KEY].shape
    kind = str(cfg.get("encoder_reparameterization_type") or "MLP").lower()
    hidden = cfg.get("encoder_hidden_size") or H  # PEFT's default: the model's hidden size
    if kind == "lstm" and (cfg.get("encoder_num_layers") or LSTM_LAYERS) != LSTM_LAYERS:
        raise ValueError(f"an LSTM encoder of {cfg['encoder_num_layers']} layers (softprompt builds {LSTM_LAYERS})")
    enc = PromptEncoder(P, H, hidden, kind)
    enc.load_state_dict({k: v.float() for k, v in tensors.items()})
    return enc


def read_adapter(cfg: dict[str, Any], weights: Path) -> torch.Tensor:
    """The [P, H] prompt of a P_TUNING adapter's weights file: PEFT's folded `prompt_embeddings`, or
    the output of the encoder the file holds."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise SoftpromptError(f"corrupt adapter file {weights}: {e}") from None
    if TENSOR_NAME in tensors or ENCODER_KEY not in tensors:
        return read_prompt_tensor(weights, "adapter")  # names what is missing when neither is there
    try:
        enc = encoder_from_peft(cfg, tensors)
    except (ValueError, RuntimeError, TypeError) as e:
        raise SoftpromptError(f"{weights}: its prompt encoder does not fit its adapter_config.json "
                              f"({short(str(e).splitlines()[0], 200)})") from None
    with torch.no_grad():
        t = enc()
    if not torch.isfinite(t).all():
        raise SoftpromptError(f"{weights}: its prompt encoder produces NaN or infinite values")
    return t
