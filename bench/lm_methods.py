"""Is the default method (`--method auto`: a prefix) the right one on language-modelling data?

bench/methods.py chose the default on three classification tasks. The classic recipe that users come
from is language modelling (awesome-chatgpt-prompts), where a prefix (about 20x a soft prompt's
parameters on the built-in model) ended 300 steps at a worse held-out loss than a soft prompt when
trained without a held-out split (bench/results/cpu_bf16_*: no eval, the last prompt kept). This
bench trains each method the way a user's `softprompt train` does by default: the installed command
with nothing but the data, the method, the steps and the seed, so a tenth of the training file is
held out, evaluated every 50 steps, and the best prompt is kept (`--keep-best`). Each run is then
scored by `softprompt eval` (float32, the whole vocabulary) on a fixed fifth of the corpus that
training never saw. Tasks (common.task_data): `acts` (awesome-chatgpt-prompts) and `quotes`
(quotable.io's quotes with their authors), two corpora; more seeds, not more tuning, decide.

Rows are written one by one; the summary (each method's mean held-out loss per task, and the
prefix's difference to each other method, per seed) after every run. The bench resumes: the rows
already in --out (of the same model, steps and eval limit) are kept, each with its commit and CPU.

    python bench/lm_methods.py                                   # both tasks, prefix and prompt, seeds 0 1
    python bench/lm_methods.py --model DIR --steps 2 --seeds 0 --eval-limit 8 --out /tmp/l.json   # dry run
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, Results, entry, softprompt, task_data  # noqa: E402

TASKS = ("acts", "quotes")
SAME_RUN = ("model", "steps", "eval_limit")  # what rows of one --out must share to be summarised together


def task_run(args, task: str, method: str, seed: int, work: Path) -> dict:
    spec = task_data(task, work)
    out = work / f"{task}-{method}-{seed}"
    common = ["--model", args.model, "--template", spec["template"], "--max-length", str(spec["max_length"])]
    t = time.perf_counter()
    softprompt("train", "--method", method, "--data", spec["data"], *common, "--max-steps", str(args.steps),
               "--seed", str(seed), "--save-every", "0", "--no-eval-untuned", "--out", str(out))
    wall = time.perf_counter() - t
    summary = json.loads((out / "summary.json").read_text())
    config = json.loads((out / "run_config.json").read_text())
    dev = json.loads(softprompt("eval", "--prompt", str(out), "--data", spec["eval_data"], *common,
                                "--dtype", "float32", "--limit", str(args.eval_limit), "--json"))
    return {"task": task, "method": method, "seed": seed, "steps": args.steps, "dtype": config["dtype"],
            "train_seconds": summary["train_seconds"], "train_wall_seconds": wall,
            "trainable_params": summary["trainable_params"], "lr": summary["lr"],
            "best_eval_loss": summary.get("best_eval_loss"),
            "final_eval_loss": (summary["final_eval"] or {}).get("loss"),
            "eval_dtype": summary.get("eval_dtype"), "dev_loss": dev["loss"], "dev_tokens": dev["tokens"]}


def summarise(rows: list[dict], tasks: list[str], methods: list[str]) -> dict:
    """{task: {"mean_dev_loss": {method: mean}, "prefix_minus": {method: {"mean", "per_seed"}}}} over the
    seeds every method of the task has run. The tasks and methods asked for and those already in the
    rows: a resumed file's summary is the file's, not only its last run's."""
    tasks = list(dict.fromkeys([*tasks, *(r["task"] for r in rows)]))
    methods = list(dict.fromkeys([*methods, *(r["method"] for r in rows)]))
    out: dict = {}
    for task in tasks:
        by = {(r["method"], r["seed"]): r["dev_loss"] for r in rows if r["task"] == task}
        seeds = sorted({s for _, s in by if all((m, s) in by for m in methods)})
        if not seeds:
            continue
        mean = {m: statistics.mean(by[m, s] for s in seeds) for m in methods}
        entry = {"seeds": seeds, "mean_dev_loss": mean}
        if "prefix" in methods:
            entry["prefix_minus"] = {m: {"mean": mean["prefix"] - mean[m],
                                         "per_seed": {str(s): by["prefix", s] - by[m, s] for s in seeds}}
                                     for m in methods if m != "prefix"}
        out[task] = entry
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="as train's --model")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    ap.add_argument("--methods", nargs="+", default=["prefix", "prompt"],
                    choices=["prefix", "prompt", "ptuning", "residual"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eval-limit", type=int, default=0, help="score the first N held-out rows (0 = all)")
    ap.add_argument("--note", default="", help="recorded as is: e.g. what else ran on the machine")
    ap.add_argument("--out", default=str(RESULTS / "lm_methods.json"))
    args = ap.parse_args()
    old = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    if old and any(old.get("args", {}).get(k) != getattr(args, k) for k in SAME_RUN):
        was = ", ".join(f"{k} {old.get('args', {}).get(k)}" for k in SAME_RUN)
        sys.exit(f"--out {args.out} holds rows of another run ({was}): choose another --out")
    rows: list[dict] = old.get("rows", [])
    notes = old.get("notes", [old["note"]] if old.get("note") else []) + ([args.note] if args.note else [])
    res = Results(args.out, {"bench": "lm_methods", "args": vars(args), "notes": notes,
                             "flags": "train's defaults but --max-steps, --seed, --save-every 0, --no-eval-untuned"},
                  rows=rows)
    done = {(r["task"], r["method"], r["seed"]) for r in rows}
    res.set(summary=summarise(rows, args.tasks, args.methods))
    with tempfile.TemporaryDirectory() as work:
        for seed in args.seeds:
            for task in args.tasks:
                for method in args.methods:
                    if (task, method, seed) in done:
                        continue
                    r = res.add({**task_run(args, task, method, seed, Path(work)), "commit": res.doc["commit"],
                                 "cpu_model": res.doc["machine"].get("cpu_model")})  # a resumed file spans runs
                    res.set(summary=summarise(res.doc["rows"], args.tasks, args.methods))
                    print(f"seed {seed} {task} {method} ({r['dtype']}): {r['train_seconds']:.0f} s, best held-out "
                          f"{r['best_eval_loss']}, dev loss {r['dev_loss']:.4f} (float32)", flush=True)
    for task, s in res.doc["summary"].items():
        losses = ", ".join(f"{m} {v:.4f}" for m, v in s["mean_dev_loss"].items())
        print(f"{task}, seeds {s['seeds']}: mean dev loss {losses}")


if __name__ == "__main__":
    entry(main)
