"""Does a quantized base cost accuracy? The same SST-2 prompt recipe on the built-in model with its
base in float32, 8-bit and 4-bit (bitsandbytes through `--quantize`), at the same steps and seed,
each `softprompt train` in its own process; then each prompt scored on the float32 base as well,
since a prompt trained on a quantized base is meant to load onto the full-precision one.

Reported per setting: dev accuracy (all 872 rows) on its own base and on the float32 base, training
seconds, and the training process's peak resident memory (its ru_maxrss, loading included).

    python bench/quantized_quality.py                    # 120 steps each, about 10 minutes on 2 cores
    python bench/quantized_quality.py --steps 300 --settings none,4bit
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, SHARED, machine, write_result  # noqa: E402

SST2 = ["--data", str(SHARED / "sst2" / "train.tsv"), "--eval-data", str(SHARED / "sst2" / "dev.tsv"),
        "--template", "Review: {sentence}\nSentiment:", "--labels", "negative,positive"]


def run(args: list[str], stdout=subprocess.DEVNULL) -> tuple[int, float]:
    """Run `softprompt ARGS` in a child; its exit status and peak resident set in MiB."""
    proc = subprocess.Popen([sys.executable, "-m", "softprompt", *args], stdout=stdout)
    _, status, usage = os.wait4(proc.pid, 0)
    return os.waitstatus_to_exitcode(status), usage.ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


def accuracy(prompt_dir: Path, quantize: str) -> float:
    out = prompt_dir / f"eval_{quantize}.json"
    with out.open("w") as f:
        code, _ = run(["eval", "--data", str(SHARED / "sst2" / "dev.tsv"), *SST2[4:], "--prompt", str(prompt_dir),
                       "--quantize", quantize, "--json"], stdout=f)
    if code:
        raise SystemExit(f"eval of {prompt_dir} on {quantize} failed with exit {code}")
    return json.loads(out.read_text().strip().splitlines()[-1])["accuracy"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--settings", default="none,8bit,4bit")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for q in args.settings.split(","):
            out = Path(tmp) / q
            code, peak = run(["train", *SST2, "--quantize", q, "--max-steps", str(args.steps),
                              "--eval-every", str(args.steps), "--save-every", "0", "--seed", str(args.seed),
                              "--out", str(out)])
            if code:
                raise SystemExit(f"train with --quantize {q} failed with exit {code}")
            s = json.loads((out / "summary.json").read_text())
            row = {"quantize": q, "steps": s["steps"], "train_seconds": s["train_seconds"],
                   "peak_rss_mb": round(peak, 1), "accuracy_own_base": accuracy(out, q),
                   "accuracy_fp32_base": accuracy(out, "none") if q != "none" else None}
            rows.append(row)
            print(json.dumps(row), flush=True)
    path = Path(args.out) if args.out else RESULTS / "quantized_quality_smollm2-135m-instruct_cpu.json"
    write_result(path, {"bench": "quantized_quality", "machine": machine(), "seed": args.seed,
                        "steps": args.steps, "rows": rows})
    print(f"{'base':6s} {'acc own base':>13s} {'acc on fp32':>12s} {'train s':>8s} {'peak RSS':>9s}")
    for r in rows:
        fp = "" if r["accuracy_fp32_base"] is None else f"{100 * r['accuracy_fp32_base']:.2f}%"
        print(f"{r['quantize']:6s} {100 * r['accuracy_own_base']:12.2f}% {fp:>12s} {r['train_seconds']:8.1f} "
              f"{r['peak_rss_mb'] / 1024:8.2f}G")


if __name__ == "__main__":
    main()
