"""bfloat16 against float32 on this CPU: is bf16 faster here, and as accurate? (issue 24, item 5)

CPUs differ: with AVX-512 bf16 / AMX a bf16 matmul runs several times faster than fp32; on an
AVX2-only CPU it is emulated and tens of times slower. This bench measures, on this machine:
1. matmul rates, forward ([256, H] x [H, 4H]) and input gradient, for hidden sizes H (where bf16
   starts to pay: small matmuls are bound by overheads, not arithmetic);
2. attention's forward and backward at the built-in model's shape (9 query heads, 3 key/value heads,
   64 per head, 8 rows): in fp32, in bf16, and in bf16 cast to fp32 around the kernel, as a
   half-precision CPU base trains it (base/half_attention.py: torch's bf16 SDPA backward is slow);
3. each task's recipe through the installed command (`softprompt train`, 300 steps at batch 8, then
   `softprompt eval` on the whole dev set) with `--dtype float32` and `--dtype bfloat16` (the prompt
   stays float32 either way), for each method and seed: training seconds and dev accuracy, scored in
   the dtype trained in and, for a bf16 run, again in float32 (`dev_accuracy_float32`: what
   `softprompt eval` gives it by default, as --dtype auto evaluates in float32 on a CPU). Tasks
   (`--tasks`): SST-2 (max length 96, the recipe of the first committed rows), RTE and AG News
   as bench/methods.py sets them up (common.task_data), and `acts`, language modelling on
   awesome-chatgpt-prompts: its held-out loss over the whole vocabulary, scored in float32 for both.
`--dtypes bfloat16 --pair-with OLD.json` retrains one dtype only and pairs it with OLD's other
runs, for a change that touches bf16 alone (the float32 path is unchanged by it); `--seeds 1 2
--pair-with OLD.json` adds seeds to OLD's (its rows of other seeds are copied in, both dtypes).
`--dtype auto`'s CPU rule (base/models.py) rests on these figures: bf16 where it is both faster
and within 0.5 points. The JSON is written row by row, its summary after every run.

    python bench/cpu_bf16.py --methods prompt prefix --seeds 0 1 2 --out bench/results/cpu_bf16.json
    python bench/cpu_bf16.py --tasks rte ag_news --hidden --tokens --out /tmp/t.json   # quality only
    python bench/cpu_bf16.py --model DIR --steps 2 --eval-limit 8 --train-limit 64 --seeds 0 --hidden 64 --tokens 16 \
        --out /tmp/b.json                                        # dry run on a small model folder
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, Results, entry, softprompt, task_data  # noqa: E402

DTYPES = ("float32", "bfloat16")
ATTENTION = ("float32", "bfloat16", "bfloat16_in_float32")  # attention_ms modes


def matmul_rates(hidden: int, dtype: torch.dtype, rows: int = 256, reps: int = 20) -> dict:
    """GFLOP/s of the forward x @ W and of its input gradient g @ W.T, best of `reps`."""
    x = torch.randn(rows, hidden, dtype=dtype)
    w = torch.randn(hidden, 4 * hidden, dtype=dtype)
    g = torch.randn(rows, 4 * hidden, dtype=dtype)
    flops = 2 * rows * hidden * 4 * hidden
    out = {}
    for name, fn in (("forward", lambda: x @ w), ("input_grad", lambda: g @ w.T)):
        fn()
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        out[f"{name}_gflops"] = flops / best / 1e9
    return out


def attention_ms(tokens: int, mode: str, reps: int = 20) -> float:
    """Best ms of one forward and backward of SDPA over [8, 9, tokens, 64] queries against 3 key/value
    heads under a causal mask: `mode` float32, bfloat16, or bfloat16 cast to float32 around the kernel
    (what base/half_attention.py does for up to MAX_KEYS keys; here at every length, to compare)."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    dtype = torch.float32 if mode == "float32" else torch.bfloat16
    q = torch.randn(8, 9, tokens, 64, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(8, 3, tokens, 64, dtype=dtype, requires_grad=True) for _ in range(2))

    def attend():
        if mode == "bfloat16_in_float32":
            return sdpa(q.float(), k.float(), v.float(), is_causal=True, enable_gqa=True).to(dtype)
        return sdpa(q, k, v, is_causal=True, enable_gqa=True)

    best = float("inf")
    for i in range(reps + 2):  # two untimed calls first
        t = time.perf_counter()
        attend().float().sum().backward()
        best = best if i < 2 else min(best, time.perf_counter() - t)
    return 1e3 * best


def task_run(args, task: str, method: str, dtype: str, seed: int, work: Path) -> dict:
    spec = task_data(task, work)
    if task == "sst2":
        spec["max_length"] = 96  # the recipe of the first committed rows (cpu_bf16.json, cpu_bf16_amd_epyc.json)
    out = work / f"{task}-{method}-{dtype}-{seed}"
    classify = "labels" in spec
    labels = ["--labels", spec["labels"]] if classify else []
    common = ["--model", args.model, "--template", spec["template"], *labels, "--max-length", str(spec["max_length"])]
    t = time.perf_counter()
    softprompt("train", "--method", method, "--data", spec["data"], *common, "--dtype", dtype, "--batch-size", "8",
               "--max-steps", str(args.steps), "--eval-every", "0", "--eval-fraction", "0", "--save-every", "0",
               "--no-eval-untuned", "--seed", str(seed), "--limit", str(args.train_limit), "--out", str(out))
    wall = time.perf_counter() - t
    summary = json.loads((out / "summary.json").read_text())

    def score(scored_in: str) -> dict:
        return json.loads(softprompt("eval", "--prompt", str(out), "--data", spec["eval_data"], *common,
                                     "--dtype", scored_in, "--limit", str(args.eval_limit), "--json"))

    row = {"kind": task, "method": method, "dtype": dtype, "seed": seed, "steps": args.steps,
           "train_limit": args.train_limit, "train_seconds": summary["train_seconds"], "train_wall_seconds": wall}
    if classify:
        dev = score(dtype)
        # What `softprompt eval` gives a bf16-trained prompt by default on a CPU: --dtype auto scores in float32.
        fp32 = dev if dtype == "float32" else score("float32")
        return {**row, "dev_accuracy": dev["accuracy"], "dev_rows": dev["n"], "dev_accuracy_float32": fp32["accuracy"]}
    # A held-out loss is scored in float32 for both dtypes: a bf16 forward would shift it by itself.
    dev = score("float32")
    return {**row, "dev_loss": dev["loss"], "dev_tokens": dev["tokens"], "dev_scored_in": "float32"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="as train's --model")
    ap.add_argument("--tasks", nargs="+", default=["sst2"], choices=["sst2", "rte", "ag_news", "acts"])
    ap.add_argument("--methods", nargs="+", default=["prompt", "prefix"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--hidden", type=int, nargs="*", default=[64, 128, 256, 576, 1024, 2048],
                    help="matmul rows' hidden sizes (none: skip them)")
    ap.add_argument("--eval-limit", type=int, default=0, help="score the first N dev rows (0 = all)")
    ap.add_argument("--train-limit", type=int, default=0, help="training rows (0 = all; small only for a dry run, "
                                                               "whose whole SST-2 would take most of its time)")
    ap.add_argument("--tokens", type=int, nargs="*", default=[64, 128, 512],
                    help="attention rows' lengths (none: skip them)")
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES, help="the dtypes to train in")
    ap.add_argument("--pair-with", nargs="*", default=[], metavar="JSON",
                    help="earlier result files whose runs (same tasks, methods and steps) this run does not "
                         "redo are copied in, each naming its file and commit: the other dtype's, for a change "
                         "that touches one dtype only, and other seeds', to add seeds to a summary")
    ap.add_argument("--out", default=str(RESULTS / "cpu_bf16.json"))
    args = ap.parse_args()
    res = Results(args.out, {"bench": "cpu_bf16", "args": vars(args),
                             "warmup": "matmuls: one untimed call each; training: none (whole runs)"})
    for h in args.hidden:
        row = {"kind": "matmul", "hidden": h, **{d: matmul_rates(h, getattr(torch, d)) for d in DTYPES}}
        row["bf16_speedup_forward"] = row["bfloat16"]["forward_gflops"] / row["float32"]["forward_gflops"]
        row["bf16_speedup_input_grad"] = row["bfloat16"]["input_grad_gflops"] / row["float32"]["input_grad_gflops"]
        print(f"hidden {h}: bf16/fp32 forward {row['bf16_speedup_forward']:.2f}x, "
              f"input gradient {row['bf16_speedup_input_grad']:.2f}x")
        res.add(row)
    for n in args.tokens:
        row = {"kind": "attention", "tokens": n, **{f"{m}_ms": attention_ms(n, m) for m in ATTENTION}}
        times = ", ".join(f"{m} {row[m + '_ms']:.2f} ms" for m in ATTENTION)
        print(f"attention over {n} tokens, forward+backward: {times}")
        res.add(row)
    with tempfile.TemporaryDirectory() as work:
        runs = [res.add(r) for r in earlier_runs(args)]
        for seed in args.seeds:
            for task in args.tasks:
                for method in args.methods:
                    for dtype in args.dtypes:
                        r = res.add(task_run(args, task, method, dtype, seed, Path(work)))
                        runs.append(r)
                        res.set(summary=summary_of(runs, args.tasks, args.methods))
                        score = (f"dev {100 * r['dev_accuracy']:.2f}%" if "dev_accuracy" in r
                                 else f"dev loss {r['dev_loss']:.4f} (float32)")
                        print(f"seed {seed} {task} {method} {dtype}: {r['train_seconds']:.0f} s training, {score}",
                              flush=True)
    for task, methods in res.doc["summary"].items():
        for method, s in methods.items():
            if "bf16_minus_fp32_points" in s:
                acc = {d: 100 * s["mean"][d]["dev_accuracy"] for d in DTYPES}
                score = (f"dev accuracy {acc['float32']:.2f}% fp32, {acc['bfloat16']:.2f}% bf16 "
                         f"({s['bf16_minus_fp32_points']:+.2f} points")
                if "bf16_minus_fp32_points_scored_in_float32" in s:
                    score += f"; {s['bf16_minus_fp32_points_scored_in_float32']:+.2f} with both scored in fp32"
                score += ")"
            else:
                loss = {d: s["mean"][d]["dev_loss"] for d in DTYPES}
                score = (f"dev loss {loss['float32']:.4f} fp32, {loss['bfloat16']:.4f} bf16 "
                         f"({s['bf16_minus_fp32_loss']:+.4f})")
            seeds = ", ".join(next(v for k, v in s.items() if k.startswith("per_seed_")))
            print(f"{task} {method}, mean over seeds {seeds}: bf16 trains {s['bf16_train_speedup']:.2f}x faster; "
                  + score)


def earlier_runs(args) -> list[dict]:
    """The --pair-with files' training runs of this run's tasks, methods and step count that it does
    not redo: in a dtype not trained now, or of a seed not trained now (so that the summary spans both)."""
    out = []
    for path in args.pair_with:
        doc = json.loads(Path(path).read_text())
        commits = {r.get("commit") for r in doc.get("runs", [])} or {doc.get("commit")}
        for r in doc["rows"]:
            redone = r.get("dtype") in args.dtypes and r.get("seed") in args.seeds
            if (r.get("dtype") in DTYPES and not redone and r["kind"] in args.tasks
                    and r["method"] in args.methods and r["steps"] == args.steps
                    and r.get("train_limit", 0) == args.train_limit):
                if r["dtype"] == "float32" and "dev_accuracy" in r:
                    r = {"dev_accuracy_float32": r["dev_accuracy"], **r}  # scored in its own dtype, float32
                here = f"{Path(path).name} at {', '.join(sorted(c for c in commits if c))}"
                out.append({**r, "from": r.get("from", here)})  # a row copied in before names where it ran
    return out


def summary_of(runs: list[dict], tasks: list[str], methods: list[str]) -> dict:
    """{task: {method: summarise(...)}} over the (task, method) pairs whose both dtypes have a run.
    (The first committed files, SST-2 only, keyed their summary by method alone.)"""
    out: dict = {}
    for task in tasks:
        for method in methods:
            mine = [r for r in runs if r["kind"] == task and r["method"] == method]
            if {r["dtype"] for r in mine} == set(DTYPES):
                out.setdefault(task, {})[method] = summarise(mine)
    return out


def summarise(runs: list[dict]) -> dict:
    """One task's and method's runs, over the seeds run in both dtypes (a run in progress leaves one
    unpaired): mean training seconds and dev score per dtype, bf16's speedup and its score change, and
    each seed's change (bf16 minus fp32: accuracy points, or a held-out loss's difference); for
    accuracy also the change with both scored in float32 (`..._scored_in_float32`) where every run has it."""
    by_seed = {(r["seed"], r["dtype"]): r for r in runs}
    seeds = sorted({s for s, _ in by_seed if all((s, d) in by_seed for d in DTYPES)})
    metric = "dev_accuracy" if "dev_accuracy" in runs[0] else "dev_loss"
    scale, change = (100, "points") if metric == "dev_accuracy" else (1, "loss")
    scores = [m for m in (metric, "dev_accuracy_float32") if all(m in r for r in runs)]
    mean = {d: {k: sum(by_seed[s, d][k] for s in seeds) / len(seeds) for k in ("train_seconds", *scores)}
            for d in DTYPES}
    out = {"mean": mean, "bf16_train_speedup": mean["float32"]["train_seconds"] / mean["bfloat16"]["train_seconds"]}
    for m in scores:
        tail = "_scored_in_float32" if m == "dev_accuracy_float32" else ""
        out[f"bf16_minus_fp32_{change}{tail}"] = scale * (mean["bfloat16"][m] - mean["float32"][m])
        out[f"per_seed_{change}{tail}"] = {str(s): scale * (by_seed[s, "bfloat16"][m] - by_seed[s, "float32"][m])
                                           for s in seeds}
    return out


if __name__ == "__main__":
    entry(main)
