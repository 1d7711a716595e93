"""The classic PEFT + Trainer script and its softprompt twin (examples/classic_*_script.py), the full
run side by side: each in a process of its own, one after the other, reporting its training time,
its peak resident memory (the process's high-water mark, model and data included) and the untuned
and tuned generations. The twin differs from PEFT's script in its import line only.

    python bench/classic_scripts.py                       # the recipe's 50 rows, 5 epochs
    python bench/classic_scripts.py --max-steps 4 --rows 16   # a quick check that it runs

Writes bench/results/classic_scripts.json (command, commit, machine, both runs).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, Results  # noqa: E402

SCRIPTS = {"peft": "classic_peft_script.py", "softprompt": "classic_softprompt_script.py"}


def run_script(name: str, args: argparse.Namespace, tmp: Path) -> dict:
    out = tmp / f"{name}.json"
    cmd = [sys.executable, str(ROOT / "examples" / SCRIPTS[name]), "--out", str(tmp / f"{name}_adapter"),
           "--json", str(out), "--rows", str(args.rows), "--epochs", str(args.epochs),
           "--max-new-tokens", str(args.max_new_tokens)]
    if args.max_steps > 0:
        cmd += ["--max-steps", str(args.max_steps)]
    print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{SCRIPTS[name]} failed:\n{res.stderr[-3000:]}")
    r = json.loads(out.read_text())
    r["process_seconds"] = round(time.perf_counter() - t0, 1)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-steps", type=int, default=0, help="optimiser steps (0 = the recipe's --epochs)")
    ap.add_argument("--epochs", type=float, default=5)
    ap.add_argument("--rows", type=int, default=50)
    ap.add_argument("--max-new-tokens", type=int, default=50)
    ap.add_argument("--out", default=str(RESULTS / "classic_scripts.json"))
    args = ap.parse_args()
    res = Results(args.out, {"args": vars(args), "warmup": "none: each script runs once, in a fresh process"},
                  key="runs")
    with tempfile.TemporaryDirectory() as tmp:
        for name in SCRIPTS:  # each script's run is kept as it finishes
            res.add({"script": name, **run_script(name, args, Path(tmp))})
    runs = {r["script"]: r for r in res.doc["runs"]}
    for name, r in runs.items():
        print(f"{name:>10}: {r['steps']} steps, train {r['train_seconds']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB, "
              f"final train loss {r['train_loss']:.4f}")
        print(f"{'':>10}  untuned: {r['untuned']!r}\n{'':>10}  tuned:   {r['tuned']!r}")
    p, s = runs["peft"], runs["softprompt"]
    summary = {"train_time_ratio_peft_over_softprompt": round(p["train_seconds"] / max(s["train_seconds"], 1e-9), 2),
               "peak_rss_mb_saved": round(p["peak_rss_mb"] - s["peak_rss_mb"], 1)}
    print(json.dumps(summary))
    res.set(summary=summary)
    print(f"wrote {res.path}")


if __name__ == "__main__":
    main()
