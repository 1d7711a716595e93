"""A quantized frozen base model (`--quantize 8bit|4bit`), through transformers' bitsandbytes config.

Prompt tuning never updates the base model, so its weights can be held in 8 or 4 bits: the soft
prompt (float32, prompt.py) and its optimiser state are the only full-precision trainable state,
and the prompt's gradient flows through the quantized layers to their inputs, as QLoRA's does.
bitsandbytes is the backend on both kinds of device: on CUDA its usual kernels, on CPU its CPU
backend (0.45 and later; checked here: 8-bit and NF4 4-bit load, run forward and pass the input
gradient back on the CPU). Tried beside it on this CPU: torchao 0.18's int8 runs, its int4 needs a
kernel library (mslk) that does not install here; optimum-quanto's int8 and int4 run, but it is in
maintenance mode and its first 4-bit load took minutes. bitsandbytes is the one backend.

- `8bit`: LLM.int8() (`load_in_8bit`): int8 weights with per-row scales, outlier columns in 16-bit.
- `4bit`: NF4 with double quantization (`load_in_4bit`), computing in the model's dtype.
The LM head and the embeddings stay in the model's dtype (bitsandbytes' default), so the prompt's
initialisation from the vocabulary and the logits are unchanged. A prompt depends only on the
hidden size: one trained on a quantized base loads onto the full-precision one and back.
"""
from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

from ..core.config import QUANTIZE
from ..core.utils import SoftpromptError

if TYPE_CHECKING:  # annotations only: the callers hold torch
    import torch

INSTALL = "pip install 'softprompt[quant]' (bitsandbytes)"


def available() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def quantization_config(name: str, dtype: torch.dtype):
    """transformers' BitsAndBytesConfig for `--quantize name` (None for `none`)."""
    if name == "none":
        return None
    if not available():
        raise SoftpromptError(f"--quantize {name} needs the bitsandbytes package: {INSTALL}")
    from transformers import BitsAndBytesConfig

    if name == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if name == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=dtype)
    raise SoftpromptError(f"unknown --quantize {name!r}: choose from {', '.join(QUANTIZE)}")


def keep_cpu_kernels_in_range(model) -> int:
    """Send 4-bit layers whose shapes bitsandbytes' AVX-512 bf16 CPU kernel cannot pack to its generic
    CPU path; returns how many. On a CPU with avx512_bf16 an inference-mode forward repacks each NF4
    weight [N, K] in blocks of 32 rows and `blocksize` (64) columns, and fails with "shape '[N, 0]'
    is invalid" unless N % 32 == 0 and K % blocksize == 0. Real models' layers fit; tiny ones may not."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return 0
    sent = 0
    for m in model.modules():
        if isinstance(m, Linear4bit) and getattr(m, "support_avx512bf16_for_cpu", False):
            state = getattr(m.weight, "quant_state", None)
            block = getattr(state, "blocksize", 64) or 64
            if m.out_features % 32 or m.in_features % block:
                m.support_avx512bf16_for_cpu = False
                sent += 1
    return sent


def quantized_bits(model) -> int | None:
    """8 or 4 for a model loaded with `--quantize`, None for a plain one."""
    qc = getattr(model, "hf_quantizer", None) and model.hf_quantizer.quantization_config
    if qc is None:
        return None
    return 8 if getattr(qc, "load_in_8bit", False) else 4 if getattr(qc, "load_in_4bit", False) else None


def unlike_flag(model) -> list[str]:
    """How a quantised model's bitsandbytes settings differ from what its `--quantize` loads (NF4 with
    double quantization...): `name value, not other`, [] when they agree."""
    bits = quantized_bits(model)
    if bits is None:
        return []
    got = model.hf_quantizer.quantization_config.to_dict()
    ours = quantization_config(f"{bits}bit", model.dtype).to_dict()
    return [f"{k} {got.get(k)}, not {v}" for k, v in ours.items() if got.get(k) != v]


def weight_bytes(model) -> int:
    """Bytes the model's parameters and buffers occupy as stored (quantized weights at their size)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())
