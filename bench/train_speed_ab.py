"""Training speed of two commits, A/B in one run: does a change (a refactor) slow training down?

Exports --old (a commit) into a temporary folder with `git archive`, then runs each tree's own
`bench/train_speed.py` against its own `src/`, alternating old, new, old, new, ... (--rounds
pairs) so that both see the same machine state. Each run is softprompt against PEFT on the same
batches; PEFT's step is the control, since neither tree changes it. Prints, per run, both median
steps and the ratio; then new/old of softprompt's median step (1.00 = no change). Writes the JSON
after every run, so a timeout loses one run, not the file:

    python bench/train_speed_ab.py --old 6a68683 --out bench/results/train_speed_ab_refactor.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True).stdout.strip()


def export(commit: str, dest: Path) -> None:
    """The tree of `commit` (src/ and bench/ are what runs) in `dest`."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "src", "bench"], capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    # A tree from before src/softprompt/__init__.py existed is a namespace package, which the installed
    # (editable) package would shadow: an empty __init__ imports the same modules, from this tree.
    (dest / "src" / "softprompt" / "__init__.py").touch()


def run_once(tree: Path, flags: list[str], out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree / "src"), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run([sys.executable, str(tree / "bench" / "train_speed.py"), *flags, "--out", str(out)], env=env,
                   check=True, stdout=subprocess.DEVNULL)
    task = json.loads(out.read_text())["tasks"][0]
    return {"softprompt_median_s": task["softprompt"]["median_step_s"], "peft_median_s": task["peft"]["median_step_s"],
            "softprompt_total_s": task["softprompt"]["total_s"], "peft_total_s": task["peft"]["total_s"],
            "speedup": task["speedup"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", required=True, help="the commit to compare the working tree with")
    ap.add_argument("--rounds", type=int, default=2, help="old/new pairs")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--out", default=str(ROOT / "bench/results/train_speed_ab.json"))
    args = ap.parse_args()
    from common import provenance, write_result

    flags = ["--model", args.model, "--task", args.task, "--steps", str(args.steps), "--check-steps", "0",
             "--no-memory", "--flop-samples", "0"]
    dirty = bool(git("status", "--porcelain", "--", "src", "bench"))
    result = {**provenance(), "old_commit": git("rev-parse", args.old), "new_commit": git("rev-parse", "HEAD") + ("+dirty" if dirty else ""),
              "train_speed_flags": flags, "warmup": "train_speed.py's own, in each run", "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "old"
        old.mkdir()
        (Path(tmp) / "shared").symlink_to(ROOT.parent / "shared")  # the data, beside the tree as beside ROOT
        export(args.old, old)
        for k in range(args.rounds):
            for name, tree in (("old", old), ("new", ROOT)):
                r = {"run": f"{name} {k + 1}", **run_once(tree, flags, Path(tmp) / f"{name}{k}.json")}
                result["runs"].append(r)
                print(f"{r['run']}: PEFT median {r['peft_median_s']:.3f} s, softprompt median "
                      f"{r['softprompt_median_s']:.3f} s, total-time ratio {r['speedup']:.2f}x", flush=True)
                write_result(args.out, result)
    mean = lambda name, key: sum(r[key] for r in result["runs"] if r["run"].startswith(name)) / args.rounds  # noqa: E731
    result["softprompt_new_over_old"] = mean("new", "softprompt_median_s") / mean("old", "softprompt_median_s")
    result["peft_new_over_old"] = mean("new", "peft_median_s") / mean("old", "peft_median_s")
    write_result(args.out, result)
    print(f"softprompt median step new/old: {result['softprompt_new_over_old']:.3f} "
          f"(PEFT's, the control: {result['peft_new_over_old']:.3f}); wrote {args.out}")


if __name__ == "__main__":
    main()
