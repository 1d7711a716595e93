"""The frozen base's float32 linear layers on a CPU through oneDNN while training, where MKL is slow.

torch runs a float32 `F.linear` on an x86 CPU through MKL. On the AMD EPYC (Zen 5) these benches
ran on, MKL 2024.2 reached 170-240 GFLOP/s at the built-in model's shapes over 150-2048 rows, and
oneDNN, which torch also ships, 310-540, a median 2.2x, at float32's accuracy (1.2e-6 relative
against float64, MKL 5.6e-7; bench/results/linear_kernels_amd_epyc.json): MKL does not run its
AVX-512 kernels on CPUs that are not Intel's. Nothing is measured on Intel CPUs or on AMD CPUs
without AVX-512, so `auto` leaves them to MKL.

Only what builds a graph changes: a frozen layer's forward under autograd and its input gradient
(the weights are frozen, so no weight gradient is computed). Evaluation, generation and serving
run under no_grad and keep torch's own kernel, under which their batched-equals-alone guarantees
were measured. The module keeps its class's identity for everything that checks it
(isinstance(m, nn.Linear): transformers, PEFT, bitsandbytes) and its weights: only `forward` differs.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from ..core.config import LINEAR_KERNELS as KERNELS
from ..core.utils import SoftpromptError
from .models import cpu_flags, cpu_vendor


def onednn_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x [..., in] @ w[out, in]^T (+ b): oneDNN's float32 matmul (the op inductor's CPU fusions call)."""
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


class FrozenLinearFn(torch.autograd.Function):
    """A linear layer whose weights take no gradient: forward and input gradient through oneDNN."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(w)
        return onednn_linear(x, w, b)

    @staticmethod
    def backward(ctx, grad):
        (w,) = ctx.saved_tensors
        return onednn_linear(grad, w.t(), None), None, None  # w.t() read in place: no copy of the weight


class OneDNNLinear(nn.Linear):
    """nn.Linear whose frozen float32 CPU forward runs FrozenLinearFn while autograd records;
    everything else (a trainable weight, another dtype or device, a sharded weight, no_grad) is
    nn.Linear's own forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if onednn_applies(x, self.weight, self.bias):
            return FrozenLinearFn.apply(x, self.weight, self.bias)
        return super().forward(x)


def onednn_applies(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> bool:
    """A frozen layer's forward while autograd records, on tensors oneDNN's float32 op takes."""
    return (torch.is_grad_enabled() and not w.requires_grad and (b is None or not b.requires_grad)
            and onednn_takes(x, w, b))


def onednn_takes(*tensors: torch.Tensor | None) -> bool:
    """float32 CPU tensors, none of them a sharded (DTensor) weight."""
    return all(t.dtype == torch.float32 and t.device.type == "cpu" and not hasattr(t, "to_local")
               for t in tensors if t is not None)


def resolve_kernel(asked: str, model, obstacle: str = "", cpuinfo: str | None = None) -> tuple[str, str]:
    """(kernel, why): `auto` is oneDNN for a float32 base on an AMD CPU with AVX-512 (where it was
    measured), else torch's default; `onednn` where oneDNN cannot run (or the caller's `obstacle`) is
    the user's error."""
    if asked not in KERNELS:
        raise SoftpromptError(f"unknown --linear-kernel {asked!r}: choose from {', '.join(KERNELS)}")
    if asked == "default":
        return "default", "default: asked for with --linear-kernel"
    obstacle = obstacle or (
        f"the base is on {model.device.type}, not a CPU" if model.device.type != "cpu" else
        f"the base is {str(model.dtype).replace('torch.', '')}, not float32 (torch already runs half-precision "
        "CPU matmuls through oneDNN)" if model.dtype != torch.float32 else
        "this torch has no oneDNN" if not torch.backends.mkldnn.is_available() else "")
    if asked == "onednn":
        if obstacle:
            raise SoftpromptError(f"--linear-kernel onednn: {obstacle}")
        return "onednn", "onednn: asked for with --linear-kernel"
    if obstacle:
        return "default", f"auto: torch's default, {obstacle}"
    if cpu_vendor(cpuinfo) != "AuthenticAMD" or "avx512f" not in cpu_flags(cpuinfo):
        return "default", ("auto: torch's default (MKL) on a CPU other than an AMD one with AVX-512, where oneDNN "
                           "is not measured faster")
    return "onednn", ("auto: oneDNN on an AMD CPU with AVX-512, where MKL's float32 matmul ran at about half of "
                      "oneDNN's speed (base/cpu_linear.py)")


def use_linear_kernel(model, kernel: str) -> int:
    """Give the model's plain nn.Linear layers `kernel`'s training forward ('onednn' or 'default');
    returns how many layers it changed. Quantized layers (not nn.Linear itself) are left alone."""
    cls = OneDNNLinear if kernel == "onednn" else nn.Linear
    if kernel == "onednn":
        bound_primitive_caches()
    changed = 0
    for m in model.modules():
        if type(m) in (nn.Linear, OneDNNLinear) and type(m) is not cls:
            m.__class__ = cls  # the same module, weights and hooks: only forward differs (see the docstring)
            changed += 1
    return changed


def bound_primitive_caches(capacity: int = 32) -> None:
    """oneDNN keeps one compiled primitive per input shape, in two caches of 1024 each (oneDNN's
    and ideep's), about 1 MB a primitive at the built-in model's shapes. A packed step's row count
    changes at every step, so over the classic script's 65 steps the process grew 180 MB past
    torch's kernel. 32 still holds every primitive of one step (4 weight shapes, forward and input
    gradient, the head, the prompt's own rows). Both are read at oneDNN's first use, so this only
    takes effect before it; a capacity the user set wins."""
    for var in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
        os.environ.setdefault(var, str(capacity))


def head_linear(head: nn.Module):
    """The matmul (x, w, b) -> x @ w^T + b that the frozen-head loss uses for `head`: oneDNN's where the
    head was given that kernel and it applies (forward/hidden.py computes the head's logits and their
    gradient itself, under no_grad)."""
    if isinstance(head, OneDNNLinear) and onednn_takes(head.weight, getattr(head, "bias", None)):
        return onednn_linear
    return torch.nn.functional.linear
