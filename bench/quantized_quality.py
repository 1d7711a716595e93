"""Does a lower-precision base cost accuracy? The same SST-2 prompt recipe on the built-in model with
its base in float32, bfloat16 (`--dtype`; the prompt stays float32), 8-bit and 4-bit (bitsandbytes
through `--quantize`), at the same steps and seed, each `softprompt train` in its own process; then
each prompt scored on the float32 base as well, since a prompt trained on a lower-precision base is
meant to load onto the full-precision one. The JSON also holds the CPU's float32 and bfloat16 matmul
rates, which decide whether bf16 can pay here (native on CPUs with avx512_bf16 or AMX).

Reported per setting: dev accuracy (all 872 rows) on its own base and on the float32 base, training
seconds, and the training process's peak resident memory (its ru_maxrss, loading included).

    python bench/quantized_quality.py                    # 120 steps each, about 10 minutes on 2 cores
    python bench/quantized_quality.py --steps 300 --settings none,4bit
    python bench/quantized_quality.py --settings none,bf16 --out bench/results/cpu_bf16_quality.json
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
from common import RESULTS, SHARED, entry, provenance, write_result  # noqa: E402

# A setting's name -> the train/eval flags that give its base.
BASES = {"none": ["--dtype", "float32"], "bf16": ["--dtype", "bfloat16"],
         "8bit": ["--quantize", "8bit"], "4bit": ["--quantize", "4bit"]}

SST2 = ["--data", str(SHARED / "sst2" / "train.tsv"), "--eval-data", str(SHARED / "sst2" / "dev.tsv"),
        "--template", "Review: {sentence}\nSentiment:", "--labels", "negative,positive"]


def run(args: list[str], stdout=subprocess.DEVNULL) -> tuple[int, float]:
    """Run `softprompt ARGS` in a child; its exit status and peak resident set in MiB."""
    proc = subprocess.Popen([sys.executable, "-m", "softprompt", *args], stdout=stdout)
    _, status, usage = os.wait4(proc.pid, 0)
    return os.waitstatus_to_exitcode(status), usage.ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


def accuracy(prompt_dir: Path, base: str) -> float:
    out = prompt_dir / f"eval_{base}.json"
    with out.open("w") as f:
        code, _ = run(["eval", "--data", str(SHARED / "sst2" / "dev.tsv"), *SST2[4:], "--prompt", str(prompt_dir),
                       *BASES[base], "--json"], stdout=f)
    if code:
        raise SystemExit(f"eval of {prompt_dir} on {base} failed with exit {code}")
    return json.loads(out.read_text().strip().splitlines()[-1])["accuracy"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--settings", default="none,8bit,4bit")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    rows = []
    settings = args.settings.split(",")
    if unknown := [q for q in settings if q not in BASES]:
        ap.error(f"unknown --settings {unknown}: choose from {', '.join(BASES)}")
    path = Path(args.out) if args.out else RESULTS / "quantized_quality_smollm2-135m-instruct_cpu.json"
    head = {**provenance(), "bench": "quantized_quality", "matmul_gflops": matmul_rates(), "seed": args.seed,
            "steps": args.steps, "warmup": "none: each setting trains once, in a fresh process"}
    with tempfile.TemporaryDirectory() as tmp:
        for q in settings:
            out = Path(tmp) / q
            code, peak = run(["train", "--method", "prompt", *SST2, *BASES[q], "--max-steps", str(args.steps),
                              "--eval-every", str(args.steps), "--save-every", "0", "--seed", str(args.seed),
                              "--out", str(out)])
            if code:
                raise SystemExit(f"train with {' '.join(BASES[q])} failed with exit {code}")
            s = json.loads((out / "summary.json").read_text())
            row = {"base": q, "steps": s["steps"], "train_seconds": s["train_seconds"],
                   "peak_rss_mb": round(peak, 1), "accuracy_own_base": accuracy(out, q),
                   "accuracy_fp32_base": accuracy(out, "none") if q != "none" else None}
            rows.append(row)
            print(json.dumps(row), flush=True)
            write_result(path, {**head, "rows": rows})  # row by row: a timeout loses one setting, not the file
    print(f"{'base':6s} {'acc own base':>13s} {'acc on fp32':>12s} {'train s':>8s} {'peak RSS':>9s}")
    for r in rows:
        fp = "" if r["accuracy_fp32_base"] is None else f"{100 * r['accuracy_fp32_base']:.2f}%"
        print(f"{r['base']:6s} {100 * r['accuracy_own_base']:12.2f}% {fp:>12s} {r['train_seconds']:8.1f} "
              f"{r['peak_rss_mb'] / 1024:8.2f}G")


def matmul_rates() -> dict[str, float]:
    """GFLOP/s of a frozen linear layer's forward (x @ W.T) and input-gradient (g @ W) matmuls in
    float32 and bfloat16, best of 5 each."""
    import time

    import torch

    out = {}
    for dt in (torch.float32, torch.bfloat16):
        w, x = torch.randn(2048, 2048).to(dt), torch.randn(128, 2048).to(dt)
        for name, f in (("forward", lambda: x @ w.t()), ("input_grad", lambda: x @ w)):
            best = float("inf")
            for _ in range(5):
                t = time.perf_counter()
                f()
                best = min(best, time.perf_counter() - t)
            out[f"{str(dt)[6:]}_{name}"] = round(2 * 2048 * 2048 * 128 / best / 1e9, 2)
    return out


if __name__ == "__main__":
    entry(main)
