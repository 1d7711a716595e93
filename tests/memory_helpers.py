"""What autograd keeps for backward, counted for tests of memory-saving forwards."""
from __future__ import annotations

import torch


def saved_bytes(fn) -> tuple[int, object]:
    """Bytes of the tensors autograd keeps for backward while fn runs (views of weights included),
    and fn's result."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return total, out
