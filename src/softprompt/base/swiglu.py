"""A gated-SiLU MLP (Llama, Qwen2, Mistral, SmolLM2...) that keeps two of its three wide activations.

transformers computes `down_proj(act_fn(gate_proj(x)) * up_proj(x))`, and autograd keeps gate,
up and silu(gate) for backward: three [tokens, intermediate] tensors a layer, the largest share of
a prompt-tuning step's activation memory (measured on SST-2 with a prefix: 230 of 432 MB at its
peak). SiluMul keeps gate and up and recomputes silu(gate) in backward, an elementwise op: the
forward is the same computation, so its output is identical, and so is the gradient (torch's own
SiLU gradient kernel). An MLP gets the fused forward only after it reproduced its own output on a
probe, so a family whose MLP computes something else keeps its own.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F


class SiluMul(torch.autograd.Function):
    """silu(g) * u for g, u [..., I], saving g and u, not silu(g)."""

    @staticmethod
    def forward(ctx, g, u):
        ctx.save_for_backward(g, u)
        return F.silu(g) * u

    @staticmethod
    def backward(ctx, grad):
        g, u = ctx.saved_tensors
        # torch's own SiLU gradient kernel, as autograd calls it for F.silu: the same values, one pass
        return torch.ops.aten.silu_backward(grad * u, g), grad * F.silu(g)


def swiglu_forward(mlp, x: torch.Tensor) -> torch.Tensor:
    return mlp.down_proj(SiluMul.apply(mlp.gate_proj(x), mlp.up_proj(x)))


def fuse_swiglu(model, on: bool = True) -> int:
    """Give every gated-SiLU MLP of `model` the fused forward (`on=False`: its own again); returns how
    many were changed. Each MLP is probed once (`swiglu_fusable`), so switching back and forth is free."""
    changed = 0
    for m in model.modules():
        if not all(hasattr(m, k) for k in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            continue
        if getattr(m, "swiglu_fusable", None) is None:
            m.swiglu_fusable = type(m.act_fn).__name__ in ("SiLU", "SiLUActivation") and same_output(m)
        if m.swiglu_fusable and on != ("forward" in vars(m)):
            if on:
                m.forward = types.MethodType(swiglu_forward, m)  # this instance only; its class stays transformers'
            else:
                del m.forward
            changed += 1
    return changed


@torch.no_grad()
def same_output(mlp) -> bool:
    """Whether the fused forward gives this MLP's own output, bit for bit, on a probe of 2 rows."""
    w = mlp.gate_proj.weight
    if not w.is_floating_point() or w.device.type == "meta":  # a quantized layer's packed weights
        return False
    x = torch.randn(2, w.shape[1], generator=torch.Generator().manual_seed(0)).to(w.device, w.dtype)
    return torch.equal(type(mlp).forward(mlp, x), swiglu_forward(mlp, x))
