"""The README's first recipe, run as a user runs it, and recorded: its figure in the quick start
("-> N% SST-2 dev accuracy after S s of training") comes from this file's result, not from memory.

Runs, with the installed command on this checkout's sources, the quick start's `softprompt train`
on the local SST-2 files (its `local:` variant, flags otherwise as printed), then `softprompt eval`
of the prompt and of the untuned model on every dev row (the recipe's held-out score reads the
first --eval-limit 500 rows; the README's `eval` line scores all 872). Records the run's summary
(held-out accuracy at each evaluation, training seconds), both evals, and what the machine did
meanwhile (other work on a shared machine slows the seconds, not the accuracies):

    python bench/quick_start.py                                   # about 10 minutes on 2 cores
    python bench/quick_start.py --steps 4 --eval-limit 8 --out /tmp/q.json   # dry run
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, SHARED, Results, entry, softprompt  # noqa: E402
from serve_common import MachineLoad  # noqa: E402

SST2 = SHARED / "sst2"
TEMPLATE, LABELS = "Review: {sentence}\\nSentiment:", "negative,positive"


def recipe(model: str, steps: int, eval_limit: int, out: Path) -> list[str]:
    """The README's quick-start train command, local variant (its steps and limits as given)."""
    every = max(1, steps // 4)
    return ["train", "--model", model, "--data", str(SST2 / "train.tsv"), "--eval-data", str(SST2 / "dev.tsv"),
            "--template", TEMPLATE, "--labels", LABELS, "--eval-limit", str(eval_limit), "--max-length", "96",
            "--virtual-tokens", "20", "--init", "labels", "--loss", "classes", "--lr", "1e-2", "--schedule", "cosine",
            "--batch-size", "16", "--max-steps", str(steps), "--eval-every", str(every), "--save-every", "0",
            "--out", str(out)]


def dev_eval(model: str, prompt: str, limit: int) -> dict:
    args = ["eval", "--model", model, "--data", str(SST2 / "dev.tsv"), "--template", TEMPLATE, "--labels", LABELS,
            "--prompt", prompt, "--json"] + (["--limit", str(limit)] if limit else [])
    return json.loads(softprompt(*args))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--eval-limit", type=int, default=500)
    ap.add_argument("--dev-limit", type=int, default=0, help="rows of the dev evals (0 = all 872)")
    ap.add_argument("--out", default=str(RESULTS / "quick_start_cpu.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "sst2"
        cmd = recipe(args.model, args.steps, args.eval_limit, run)
        res = Results(args.out, {"bench": "quick_start", "train_command": "softprompt " + " ".join(cmd)}, key=None)
        load = MachineLoad()
        softprompt(*cmd)
        summary = json.loads((run / "summary.json").read_text())
        evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        res.set(summary=summary, held_out=[e for e in evals if e.get("split", "").startswith("eval")],
                machine_load=load.stop())
        res.set(dev_tuned=dev_eval(args.model, str(run), args.dev_limit),
                dev_untuned=dev_eval(args.model, "none", args.dev_limit))
    s = res.doc
    print(f"held-out accuracy {100 * s['summary']['final_eval']['accuracy']:.1f}% after "
          f"{s['summary']['train_seconds']:.0f} s of training; all dev rows: tuned "
          f"{100 * s['dev_tuned']['accuracy']:.1f}%, untuned {100 * s['dev_untuned']['accuracy']:.1f}% -> {args.out}")


if __name__ == "__main__":
    entry(main)
