"""The packed training step replayed as a CUDA graph.

On a GPU a small model's step is bound by the host, not the kernels: on an H200 a SmolLM2 step
spent ~10 ms in kernels and ~90 ms launching them from Python (bench/profile_step.py). A CUDA
graph records the step's kernels once and replays them with one launch.

A graph needs static shapes, so each batch is laid out in a bucket (`DenseLayout`): the packed
sequence [prompt ; row 0 ; row 1 ; ...] (the rows' real tokens only, trimmed as forward.supervised
trims them) is padded with filler tokens to N, one of four sizes per octave, and the supervised
states to M. Attention gets a dense [N, N] mask built inside the graph from each position's row
id: a row sees the prompt (row -1) and, causally, itself; fillers form a row of their own and
are never read. transformers hands a 4D mask to SDPA as it is. Positions are the unpacked ones
(prompt 0..P-1, each row from P), so the loss and gradient are the packed path's.

`GraphedStep` captures one graph per bucket, after a warm-up on a side stream, all in one memory
pool (a bucket's outputs are read before the next replay, so buckets can share it). The first
replay of each bucket is checked against its eager warm-up; a failed capture or check switches
the step off for the run (`disabled` says why) and the caller goes on with the eager path.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..base.families import decoder
from .hidden import logits, needed_inputs, token_losses

MAX_TOKENS = 4096  # the dense mask is [N, N]: past this the eager packed path (per-row attention) wins


def capturable_attention():
    """SDPA restricted to the memory-efficient kernel (masks, float32 and bfloat16) and the math
    fallback while capturing: the choice is recorded into the graph, and it keeps out kernels whose
    graph capture this project has not tried (cuDNN's)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def bucket(n: int, floor: int = 64) -> int:
    """n rounded up to one of four sizes per octave (64, 80, 96, 112, 128, 160, ...)."""
    if n <= floor:
        return floor
    step = 1 << max(0, math.floor(math.log2(n)) - 2)
    return -(-n // step) * step


@dataclass
class DenseLayout:
    """One batch in a bucket, as host (CPU) tensors. N packed positions, M supervised states."""
    ids: torch.Tensor     # [N - P] text token ids, packed, then fillers
    pos: torch.Tensor     # [N] position ids
    doc: torch.Tensor     # [N] row id: -1 prompt, 0..B-1 rows, -2 fillers
    sel: torch.Tensor     # [M] packed position whose state predicts each supervised token
    tgt: torch.Tensor     # [M] the token it predicts (0 for fillers)
    weight: torch.Tensor  # [M] 1.0, 0.0 for fillers

    @property
    def shape(self) -> tuple[int, int]:
        return self.pos.shape[0], self.sel.shape[0]

    @classmethod
    def build(cls, P: int, input_ids: torch.Tensor, attention_mask: torch.Tensor, targets: torch.Tensor,
              pad: int) -> "DenseLayout":
        keep = needed_inputs(targets, attention_mask)  # [B, T'] inputs the loss depends on
        B, T = keep.shape
        lengths = keep.sum(1)
        starts = P + torch.cumsum(lengths, 0) - lengths  # packed index of each row's first token
        t = torch.arange(T)
        L = int(lengths.sum())
        N = bucket(P + L)
        ids = torch.full((N - P,), pad, dtype=torch.long)
        ids[:L] = input_ids[:, :T][keep]
        pos = torch.zeros(N, dtype=torch.long)
        pos[:P] = torch.arange(P)
        pos[P:P + L] = (P + t).expand(B, T)[keep]
        doc = torch.full((N,), -2, dtype=torch.long)
        doc[:P] = -1
        doc[P:P + L] = torch.arange(B)[:, None].expand(B, T)[keep]
        # Target column j is predicted by input j-1's state, or by the prompt's last one for j = 0.
        sup = targets[:, :T + 1] != -100  # [B, T'+1]
        b, j = sup.nonzero(as_tuple=True)  # row-major, the order forward.supervised uses
        src = torch.where(j == 0, torch.full_like(j, P - 1), starts[b] + j - 1)
        m = bucket(len(b), floor=8)
        sel, tgt, weight = torch.zeros(m, dtype=torch.long), torch.zeros(m, dtype=torch.long), torch.zeros(m)
        sel[:len(b)], tgt[:len(b)], weight[:len(b)] = src, targets[:, :T + 1][sup], 1.0
        return cls(ids, pos, doc, sel, tgt, weight)


def dense_loss(model, prompt: torch.Tensor, ids, pos, doc, sel, tgt, weight, scale,
               class_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The weighted loss sum times `scale` of one bucketed batch; static shapes and no host syncs,
    so it can be captured. prompt [P, H] (any float dtype; cast to the model's)."""
    embed = model.get_input_embeddings()
    x = torch.cat([prompt.to(embed.weight.dtype), embed(ids)])[None]  # [1, N, H]
    N = doc.shape[0]
    causal = torch.ones(N, N, dtype=torch.bool, device=doc.device).tril()
    mask = ((doc[:, None] == doc[None, :]) | (doc[None, :] == -1)) & causal  # [N, N]
    h = decoder(model)(inputs_embeds=x, position_ids=pos[None], attention_mask=mask[None, None],
                       use_cache=False).last_hidden_state[0]  # [N, H]
    states = h.index_select(0, sel)  # [M, H]
    if class_ids is not None:  # softmax over the label words only
        y = (tgt[:, None] == class_ids[None]).float().argmax(-1)
        ce = F.cross_entropy(logits(model, states, class_ids), y, reduction="none")
    else:
        ce = token_losses(model, states, tgt)
    return (ce * weight).sum() * scale


class _Captured:
    """One bucket's graph, its static inputs and outputs."""

    def __init__(self, lay: DenseLayout, device: torch.device):
        self.inputs = [t.to(device) for t in (lay.ids, lay.pos, lay.doc, lay.sel, lay.tgt, lay.weight)]
        self.scale = torch.ones((), device=device)
        self.graph = torch.cuda.CUDAGraph()
        self.loss: torch.Tensor | None = None
        self.grad: torch.Tensor | None = None

    def load(self, lay: DenseLayout, scale: float) -> None:
        for dst, src in zip(self.inputs, (lay.ids, lay.pos, lay.doc, lay.sel, lay.tgt, lay.weight)):
            dst.copy_(src, non_blocking=True)
        self.scale.fill_(scale)


class GraphedStep:
    """Loss and prompt gradient of one batch by graph replay; None when the batch or this run
    cannot use a graph (the caller then takes the eager path)."""

    def __init__(self, model, prompt: torch.Tensor, pad: int, class_ids: torch.Tensor | None = None,
                 max_tokens: int = MAX_TOKENS):
        self.model, self.prompt, self.pad, self.class_ids = model, prompt, pad, class_ids
        self.max_tokens = max_tokens
        self.graphs: dict[tuple[int, int], _Captured] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.disabled: str | None = None
        self.replays = 0
        self.capture_seconds = 0.0  # warm-up, capture and check of every bucket (part of the step time)

    def _compute(self, c: _Captured) -> tuple[torch.Tensor, torch.Tensor]:
        with capturable_attention():
            loss = dense_loss(self.model, self.prompt, *c.inputs, c.scale, self.class_ids)
            (grad,) = torch.autograd.grad(loss, [self.prompt])
        return loss.detach(), grad

    def _capture(self, lay: DenseLayout, scale: float) -> _Captured:
        c = _Captured(lay, self.prompt.device)
        c.load(lay, scale)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: cuBLAS handles, kernel choices, the allocator
            for _ in range(2):
                ref_loss, ref_grad = self._compute(c)
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(c.graph, pool=self.pool):
            c.loss, c.grad = self._compute(c)
        c.graph.replay()
        if not (torch.allclose(c.loss, ref_loss, rtol=1e-3, atol=1e-6)
                and torch.allclose(c.grad, ref_grad, rtol=1e-2, atol=1e-3 * float(ref_grad.abs().max()) + 1e-12)):
            raise RuntimeError(f"graph replay differs from eager: loss {float(c.loss):.6g} vs {float(ref_loss):.6g}")
        return c

    def __call__(self, input_ids, attention_mask, targets, scale: float) -> torch.Tensor | None:
        """The scaled loss (a 0-d tensor) with the prompt's gradient added to prompt.grad; None if
        this batch must take the eager path."""
        if self.disabled:
            return None
        lay = DenseLayout.build(self.prompt.shape[0], input_ids.cpu(), attention_mask.cpu(), targets.cpu(), self.pad)
        if lay.shape[0] > self.max_tokens:
            return None
        c = self.graphs.get(lay.shape)
        try:
            if c is None:
                t = time.perf_counter()
                c = self.graphs[lay.shape] = self._capture(lay, scale)
                self.capture_seconds += time.perf_counter() - t  # _capture ends in a sync (the check)
            else:
                c.load(lay, scale)
                c.graph.replay()
        except RuntimeError as e:  # capture not supported by some op, or a failed check
            self.disabled = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            self.graphs.clear()
            return None
        self.replays += 1
        # The static gradient is overwritten by the next replay: accumulate a copy.
        g = self.prompt.grad
        self.prompt.grad = c.grad.clone() if g is None else g.add_(c.grad)
        return c.loss
