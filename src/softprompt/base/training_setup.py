"""What a frozen base is given before it trains a prompt, in one order, for `train` and SoftPromptModel.

Each step changes how a forward that records a graph runs, not what it computes beyond float
rounding, and eval, generation and serving (no graph) are left as the model's own:
- half_attention: a half-precision CPU base attends in fp32 where a backward follows;
- gqa_attention: grouped key/value heads kept once; routed after the fp32 route, whose cast it calls;
- cpu_linear: frozen float32 linear layers through oneDNN where `--linear-kernel` resolves to it;
- swiglu: gated-SiLU MLPs keep two of their three wide activations.
The returned record is what run_config.json keeps of them.
"""
from __future__ import annotations

from typing import Any

from .cpu_linear import resolve_kernel, use_linear_kernel
from .gqa_attention import use_gqa_attention
from .half_attention import use_fp32_attention
from .swiglu import fuse_swiglu


def prepare_for_training(model, linear_kernel: str = "auto", obstacle: str = "") -> dict[str, Any]:
    """Apply the four to `model` (each once: calling again changes nothing) and say what was taken;
    `obstacle`: why the caller's run cannot take oneDNN (cpu_linear.resolve_kernel)."""
    use_fp32_attention(model)
    gqa = use_gqa_attention(model)
    kernel, why = resolve_kernel(linear_kernel, model, obstacle)
    use_linear_kernel(model, kernel)
    return {"linear_kernel_taken": kernel, "linear_kernel_reason": why, "swiglu_fused_mlps": fuse_swiglu(model),
            "gqa_attention_modules": gqa}
