"""Where a training step's time goes, PEFT against softprompt: GPU kernel time against host time.

On a GPU a small model's step is often bound by the host (Python, kernel launches), not by the
kernels: the step's wall time then far exceeds the summed kernel time. This script profiles a few
steps of each path with torch.profiler on the same batches as bench/train_speed.py (after one
untimed pass over them: warm-up and, on CUDA, the graph captures) and prints, per step: wall time,
summed device-kernel time, the number of kernel launches, and the top kernels.

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
from common import Results, attn_implementation, device_and_dtype, load_bench_model, sync  # noqa: E402
from train_speed import TASKS, Path_, batches_for, initial_prompt, task_examples  # noqa: E402

from softprompt.data.batching import pad_id  # noqa: E402


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
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    dev_us = sum(e.self_device_time_total for e in kernels) / n
    launches = sum(e.count for e in kernels) / n
    top = sorted(kernels, key=lambda e: -e.self_device_time_total)[:8]
    return {"wall_ms": 1e3 * wall, "kernel_ms": dev_us / 1e3, "kernels_per_step": launches,
            "kernel_fraction": dev_us / 1e6 / wall if wall else 0.0,
            "top_kernels": [{"name": e.key[:90], "ms_per_step": e.self_device_time_total / 1e3 / n,
                             "count_per_step": e.count / n} for e in top]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--task", nargs="+", default=["sst2"], choices=sorted(TASKS))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--virtual-tokens", type=int, default=20)
    ap.add_argument("--limit", type=int, default=2000)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-graphs", dest="graphs", action="store_false", help="profile softprompt's eager step on CUDA")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    dev, dtype = device_and_dtype(args.device, args.dtype)
    model, tok = load_bench_model(args.model, dev, dtype, args.seed)
    head = {"bench": "profile_step", "model": args.model, "device": str(dev), "dtype": args.dtype,
            "attn_implementation": attn_implementation(model), "cuda_graphs": args.graphs and dev.type == "cuda",
            "warmup": "one untimed pass over the same batches (allocator, cuBLAS handles, graph captures)"}
    res = Results(args.out, head, key="tasks") if args.out else None  # a task at a time
    for task in args.task:
        ex = task_examples(task, tok, args.limit, args.seed)
        init = initial_prompt(model, args.virtual_tokens, args.seed).to(dtype)
        out = {}
        for name, trainer_style in (("peft", True), ("softprompt", False)):
            bs = batches_for(ex, tok, args.batch_size, args.steps + 1, args.seed, trainer_style=trainer_style)
            p = Path_(name, model, init, 1e-3, dev, args.graphs, pad_id(tok))
            out[name] = r = profile_path(p, bs, dev)
            print(f"{task} {name:10s} wall {r['wall_ms']:7.1f} ms  kernels {r['kernel_ms']:7.1f} ms "
                  f"({100 * r['kernel_fraction']:.0f}%)  launches {r['kernels_per_step']:.0f}")
            for k in r["top_kernels"][:4]:
                print(f"    {k['ms_per_step']:6.2f} ms x{k['count_per_step']:.0f}  {k['name']}")
        if res:
            res.add({"task": task, **out})


if __name__ == "__main__":
    main()
