"""Where a training step's time goes, PEFT against softprompt, on a GPU or a CPU.

Profiles a few steps of each path with torch.profiler on the same batches as bench/train_speed.py
(PEFT's recipe on its random, padded batches; PEFT at its best and softprompt on the length-grouped
ones), after one untimed pass over them (warm-up and, on CUDA, the graph captures).
- On a GPU a small model's step is often bound by the host (Python, kernel launches), not by the
  kernels: per step it prints wall time, summed device-kernel time, kernel launches, top kernels.
- On a CPU every operator runs on the host: per step it prints wall time and the operators' own
  (self) time, split into matmuls, attention, the loss, the optimiser and the rest, and the top
  operators. Self times do not nest, so the classes add up to about the step (the remainder is
  Python and the profiler).

    python bench/profile_step.py --task lm512 --steps 3                      # the real model, on this CPU
    python bench/profile_step.py --model random:DIR --task sst2 --dtype bfloat16 --steps 5
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Results, attn_implementation, device_and_dtype, entry, load_bench_model, sync  # noqa: E402
from train_speed import TASK_CHOICES, Path_, batches_for, initial, kernels, task_examples  # noqa: E402

from softprompt.base.cpu_linear import KERNELS  # noqa: E402
from softprompt.data.batching import pad_id  # noqa: E402

PATHS = ("peft", "peft_best", "softprompt")
# Operator classes by name (aten's names, forward and backward alike); the first match wins.
# The loss comes first: its log_softmax backward would match attention's softmax backward.
# softprompt's chunked cross-entropy computes its softmax gradient with exp, gather and scatter_add
# (no decoder op of these families uses them; the embeddings gather with index_select).
CLASSES = (("loss", ("log_softmax", "logsumexp", "nll_loss", "cross_entropy", "aten::exp", "aten::gather",
                     "scatter_add")),
           ("attention", ("scaled_dot_product", "flash_attention", "efficient_attention", "aten::softmax",
                          "_softmax_backward")),
           ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul",
                       "mkldnn::_linear_pointwise")),
           ("optimizer", ("_foreach", "adam", "clip_grad")))


def op_class(name: str) -> str:
    low = name.lower()
    return next((c for c, keys in CLASSES if any(k in low for k in keys)), "other")


def cpu_breakdown(events, n: int) -> dict:
    """Per step: each class's summed self CPU time (ms) and every operator's, the costliest first."""
    ops = [e for e in events if e.self_cpu_time_total > 0]
    by_class: dict[str, float] = {c: 0.0 for c, _ in CLASSES} | {"other": 0.0}
    for e in ops:
        by_class[op_class(e.key)] += e.self_cpu_time_total / 1e3 / n
    ranked = sorted(ops, key=lambda e: -e.self_cpu_time_total)
    return {"self_cpu_ms": by_class, "self_cpu_ms_total": sum(by_class.values()),
            "ops": [{"name": e.key[:90], "class": op_class(e.key), "ms_per_step": e.self_cpu_time_total / 1e3 / n,
                     "count_per_step": e.count / n} for e in ranked]}  # every operator, the costliest first


def profile_path(path: Path_, batches, dev) -> dict:
    for b in batches:  # warm-up (untimed): allocator, cuBLAS handles, each bucket's graph capture
        path.step(b, record=False)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    sync(dev)
    t = time.perf_counter()
    with profile(activities=acts) as prof:
        for b in batches[1:]:
            path.step(b, record=False)
    n = len(batches) - 1
    wall = (time.perf_counter() - t) / n
    events = prof.key_averages()
    out = {"wall_ms": 1e3 * wall, **cpu_breakdown(events, n)}
    if dev.type != "cuda":
        return out
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    dev_us = sum(e.self_device_time_total for e in kernels) / n
    top = sorted(kernels, key=lambda e: -e.self_device_time_total)[:8]
    return {**out, "kernel_ms": dev_us / 1e3, "kernels_per_step": sum(e.count for e in kernels) / n,
            "kernel_fraction": dev_us / 1e6 / wall if wall else 0.0,
            "top_kernels": [{"name": e.key[:90], "ms_per_step": e.self_device_time_total / 1e3 / n,
                             "count_per_step": e.count / n} for e in top]}


def report(task: str, name: str, r: dict) -> None:
    if "kernel_ms" in r:
        print(f"{task} {name:10s} wall {r['wall_ms']:8.1f} ms  kernels {r['kernel_ms']:7.1f} ms "
              f"({100 * r['kernel_fraction']:.0f}%)  launches {r['kernels_per_step']:.0f}")
        for k in r["top_kernels"][:4]:
            print(f"    {k['ms_per_step']:6.2f} ms x{k['count_per_step']:.0f}  {k['name']}")
        return
    split = "  ".join(f"{c} {ms:.0f}" for c, ms in r["self_cpu_ms"].items())
    print(f"{task} {name:10s} wall {r['wall_ms']:8.1f} ms  self CPU ms: {split}")
    for k in r["ops"][:5]:
        print(f"    {k['ms_per_step']:8.1f} ms x{k['count_per_step']:.0f}  {k['name']} ({k['class']})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--task", nargs="+", default=["sst2"], choices=TASK_CHOICES)
    ap.add_argument("--method", default="prompt", choices=("prompt", "prefix"))
    ap.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    ap.add_argument("--steps", type=int, default=5, help="profiled steps per path (after one untimed pass)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--virtual-tokens", type=int, default=20)
    ap.add_argument("--limit", type=int, default=2000)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--linear-kernel", default="auto", choices=KERNELS, help="softprompt's (train_speed's flag)")
    ap.add_argument("--peft-kernel", default="default", choices=("default", "onednn"), help="PEFT's (train_speed's)")
    ap.add_argument("--no-graphs", dest="graphs", action="store_false", help="profile softprompt's eager step on CUDA")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    dev, dtype = device_and_dtype(args.device, args.dtype)
    model, tok = load_bench_model(args.model, dev, dtype, args.seed)
    head = {"bench": "profile_step", "model": args.model, "device": str(dev), "dtype": args.dtype,
            "method": args.method, "attn_implementation": attn_implementation(model),
            "cuda_graphs": args.graphs and dev.type == "cuda",
            "warmup": "one untimed pass over the same batches (allocator, cuBLAS handles, graph captures)"}
    res = Results(args.out, head, key="tasks") if args.out else None  # a task at a time
    for task in args.task:
        ex = task_examples(task, tok, args.limit, args.seed)
        init = initial(args.method, model, tok, args.virtual_tokens, args.seed).to(dtype)
        out = {}
        for name in args.paths:
            bs = batches_for(ex, tok, args.batch_size, args.steps + 1, args.seed, trainer_style=name == "peft")
            p = Path_(name, model, init, 1e-3, dev, args.graphs, pad_id(tok), args.method, kernels(args, model, name))
            out[name] = profile_path(p, bs, dev)
            report(task, name, out[name])
        if res:
            res.add({"task": task, "steps": args.steps, "batch_size": args.batch_size, **out})


if __name__ == "__main__":
    entry(main)
