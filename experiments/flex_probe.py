"""Probe: the packed shared-prefix attention as FlexAttention with a block mask, against the padded
SDPA gather that packing.py does today, on one layer's shapes (forward + backward).

Prints the compile time of flex_attention, the time per call of each, and the largest difference
of their outputs and input gradients. Used once on a GPU to choose the CUDA packed path.

    python experiments/flex_probe.py --heads 9 --kv-heads 3 --dim 64 --rows 8 --max-len 110
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def padded_reference(q, k, v, P, lengths):
    """q/k/v [1, H, N, d] packed as [prompt, row 0, row 1, ...]; rows see the prompt and themselves."""
    outs = [F.scaled_dot_product_attention(q[:, :, :P], k[:, :, :P], v[:, :, :P], is_causal=True, enable_gqa=True)]
    s = P
    for L in lengths:
        kk = torch.cat([k[:, :, :P], k[:, :, s:s + L]], 2)
        vv = torch.cat([v[:, :, :P], v[:, :, s:s + L]], 2)
        m = torch.ones(L, P + L, dtype=torch.bool, device=q.device)
        m[:, P:] = torch.tril(m[:, P:])
        outs.append(F.scaled_dot_product_attention(q[:, :, s:s + L], kk, vv, attn_mask=m, enable_gqa=True))
        s += L
    return torch.cat(outs, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=110)
    ap.add_argument("--prompt", type=int, default=20)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dt = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(args.max_len // 3, args.max_len, (args.rows,), generator=g).tolist()
    P = args.prompt
    N = P + sum(lengths)
    doc = torch.cat([torch.full((P,), -1), torch.repeat_interleave(torch.arange(args.rows), torch.tensor(lengths))]).to(dev)

    def mask_mod(b, h, qi, ki):
        # causal, and a key is either prompt or in the query's own row
        return (ki <= qi) & ((doc[ki] == -1) | (doc[ki] == doc[qi]))

    q = torch.randn(1, args.heads, N, args.dim, device=dev, dtype=dt, requires_grad=True)
    k = torch.randn(1, args.kv_heads, N, args.dim, device=dev, dtype=dt, requires_grad=True)
    v = torch.randn(1, args.kv_heads, N, args.dim, device=dev, dtype=dt, requires_grad=True)
    t = time.perf_counter()
    bm = create_block_mask(mask_mod, 1, None, N, N, device=dev)
    flex = torch.compile(flex_attention, dynamic=False)
    out = flex(q, k, v, block_mask=bm, enable_gqa=True)
    out.sum().backward()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    print(f"N={N} rows={args.rows}: flex compile + first call {time.perf_counter() - t:.1f}s")
    gq = q.grad.clone()
    q.grad = k.grad = v.grad = None
    ref = padded_reference(q, k, v, P, lengths)
    ref.sum().backward()
    print(f"max |flex - reference| output {(out - ref).abs().max().item():.2e}, dq {(gq - q.grad).abs().max().item():.2e}")

    def bench(fn, n=20):
        for _ in range(3):
            fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t) / n * 1e3

    print(f"flex fwd+bwd {bench(lambda: flex(q, k, v, block_mask=bm, enable_gqa=True).sum().backward()):.3f} ms;"
          f" block mask build {bench(lambda: create_block_mask(mask_mod, 1, None, N, N, device=dev)):.3f} ms;"
          f" per-row SDPA reference {bench(lambda: padded_reference(q, k, v, P, lengths).sum().backward()):.3f} ms")


if __name__ == "__main__":
    main()
