"""Prompt transfer on a low-data target (issue 23): RTE trained from (a) a fresh default init, (b) an
SST-2 prompt and (c) a mixture prompt (SST-2 + AG News, `train --mix`), with `--init-from`, for 100,
500 and all RTE training rows, for each method, over several seeds; scored by rank classification on
RTE's validation set.

- RTE: ../shared/data/rte/{train,val}.jsonl, its labels entailment / not_entailment written as the
  label words yes / no (template "Premise: ...\\nHypothesis: ...\\nEntailment:").
- SST-2: train.tsv / dev.tsv, "Review: {sentence}\\nSentiment:", negative / positive.
- AG News: alps_dev_10k.tsv, headerless text<TAB>label; every 10th row is its held-out part.
Each source is trained once (seed 0) with the target's method, so a prompt starts a prompt and a
prefix a prefix (ptuning and residual save soft prompts: their source starts the encoder's input).
The mixture caps each task at --source-limit rows (T5's examples-proportional mixing with a cap).
Data files derived from the shared ones and the source prompts live in --workdir and are reused.

Rows are written one by one (a time limit loses the row in progress) and a rerun skips the rows its
--out already holds; `summary` (kept current with the rows) holds each cell's mean, sd and n over
the seeds and its gain in points over the fresh init. Not meant for a loaded machine: about
(methods x sizes x 3 x seeds) runs of --steps steps each.

    python bench/transfer.py                                  # prompt and prefix, 3 seeds, full size
    python bench/transfer.py --methods prompt --seeds 0       # one method, one seed
    python bench/transfer.py --methods prompt --seeds 0 --sizes 100 --inits fresh sst2 \\
        --out /tmp/a.json --workdir /tmp/wa                   # part of a grid: one process a core
    python bench/transfer.py --model random:DIR --steps 2 --source-steps 2 --sizes 16 --eval-limit 8 \\
        --seeds 0 --out /tmp/t.json --workdir /tmp/tw         # dry run: minutes on a CPU
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (RESULTS, Results, SHARED, device_and_dtype, entry, fmt_row, load_bench_model,  # noqa: E402
                    write_jsonl)

from softprompt.core.config import DataConfig, ModelConfig, PromptConfig, TrainConfig  # noqa: E402
from softprompt.training.train import train  # noqa: E402

INITS = ("fresh", "sst2", "mixture")
RTE_TEMPLATE = "Premise: {premise}\nHypothesis: {hypothesis}\nEntailment:"
RTE_WORDS = {"entailment": "yes", "not_entailment": "no"}
SST2 = dict(template="Review: {sentence}\nSentiment:", labels="negative,positive")
AG = dict(template="News: {text}\nTopic:", labels="World,Sports,Business,Sci/Tech")


def prepare_data(work: Path) -> dict[str, str]:
    """RTE with label words, AG News as JSONL with a deterministic held-out part (every 10th row).
    Not common.task_data: its templates and AG News split differ, and the committed transfer results
    were measured on these."""
    work.mkdir(parents=True, exist_ok=True)
    out = {}
    for split in ("train", "val"):
        rows = [json.loads(line) for line in (SHARED / "rte" / f"{split}.jsonl").read_text().splitlines() if line]
        out[f"rte_{split}"] = write_jsonl(work / f"rte_{split}.jsonl", [
            {"premise": r["premise"], "hypothesis": r["hypothesis"], "label": RTE_WORDS[r["label"]]} for r in rows])
    with open(SHARED / "ag_news" / "alps_dev_10k.tsv", newline="") as f:
        ag = [{"text": t, "label": lab} for t, lab in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    out["ag_train"] = write_jsonl(work / "ag_train.jsonl", [r for i, r in enumerate(ag) if i % 10])
    out["ag_dev"] = write_jsonl(work / "ag_dev.jsonl", [r for i, r in enumerate(ag) if not i % 10])
    return out


def train_cfg(args, out: Path, method: str, steps: int, seed: int, overwrite: bool = True) -> TrainConfig:
    return TrainConfig(out=str(out), method=method, max_steps=steps, batch_size=args.batch_size, seed=seed,
                       eval_every=0, eval_untuned=False, save_every=0, warmup_steps=min(10, steps), overwrite=overwrite)


def source_prompts(args, model, tok, mcfg: ModelConfig, data: dict[str, str], work: Path, method: str) -> dict:
    """The SST-2 and mixture prompts for `method` that --inits asks for (trained once, reused from --workdir)."""
    shared = dict(max_length=args.max_length, limit=args.source_limit, eval_limit=args.eval_limit)
    sst2 = DataConfig(data=str(SHARED / "sst2" / "train.tsv"), eval_data=str(SHARED / "sst2" / "dev.tsv"),
                      **SST2, **shared)
    ag_task = {"data": data["ag_train"], "eval_data": data["ag_dev"], "template": AG["template"],
               "labels": AG["labels"]}
    mixture = DataConfig(**{**sst2.__dict__, "mix": [ag_task]})
    out = {}
    for name, dcfg in ((n, d) for n, d in (("sst2", sst2), ("mixture", mixture)) if n in args.inits):
        folder = work / f"source_{name}_{method}"
        if not (folder / "summary.json").is_file():
            s = train(mcfg, dcfg, PromptConfig(virtual_tokens=args.virtual_tokens),
                      train_cfg(args, folder, method, args.source_steps, 0), model=model, tok=tok, quiet=True)
            print(f"source {name} ({method}): {json.dumps(s.get('final_eval'))[:200]}", flush=True)
        out[name] = str(folder)
    return out


def target_run(args, model, tok, mcfg, data, work: Path, method: str, size: int, init: str, seed: int,
               sources: dict) -> dict:
    dcfg = DataConfig(data=data["rte_train"], eval_data=data["rte_val"], template=RTE_TEMPLATE, labels="yes,no",
                      max_length=args.max_length, limit=size, eval_limit=args.eval_limit)
    pcfg = (PromptConfig(virtual_tokens=args.virtual_tokens) if init == "fresh"
            else PromptConfig(init_from=sources[init]))
    s = train(mcfg, dcfg, pcfg, train_cfg(args, work / "target", method, args.steps, seed), model=model, tok=tok,
              quiet=True)
    ev = s["final_eval"] or {}
    return {"method": method, "rows": size or "all", "init": init, "seed": seed, "accuracy": ev.get("accuracy"),
            "loss": ev.get("loss"), "train_examples": json.loads((work / "target" / "run_config.json").read_text())
            ["train_examples"], "steps": s["steps"], "train_seconds": s["train_seconds"]}


def key(row: dict) -> tuple:
    return row["method"], str(row["rows"]), row["init"], row["seed"]


def summarise(rows: list[dict]) -> dict:
    """summary[method][rows][init]: accuracy's mean over the seeds, its sd and n, and (past the fresh
    init) its gain in points over the fresh init's mean at the same size."""
    groups: dict = {}
    for r in rows:
        if r["accuracy"] is not None:
            groups.setdefault(r["method"], {}).setdefault(str(r["rows"]), {}).setdefault(r["init"], []).append(
                r["accuracy"])
    out: dict = {}
    for method, sizes in groups.items():
        for size, inits in sizes.items():
            fresh = inits.get("fresh")
            for init, accs in inits.items():
                cell = {"mean": statistics.mean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                        "n": len(accs)}
                if fresh and init != "fresh":
                    cell["gain_points"] = 100 * (cell["mean"] - statistics.mean(fresh))
                out.setdefault(method, {}).setdefault(size, {})[init] = cell
    return out


def report(summary: dict) -> None:
    widths = [8, 6, 8, 8, 7, 6, 6]
    print(fmt_row(["method", "rows", "init", "acc %", "sd", "gain", "seeds"], widths))
    for method, sizes in sorted(summary.items()):
        for size, inits in sorted(sizes.items()):
            for init, c in sorted(inits.items()):
                gain = f"{c['gain_points']:+.1f}" if "gain_points" in c else ""
                sd = f"{100 * c['std']:.1f}" if c["n"] > 1 else ""
                print(fmt_row([method, size, init, f"{100 * c['mean']:.1f}", sd, gain, c["n"]], widths))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="as bench/common.py's (random:DIR for a dry run)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--methods", nargs="+", default=["prompt", "prefix"],
                    choices=["prompt", "prefix", "ptuning", "residual"])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 500, 0], help="RTE training rows (0 = all)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--inits", nargs="+", default=list(INITS), choices=INITS,
                    help="starts to measure: split a grid over processes, each with its own --workdir")
    ap.add_argument("--steps", type=int, default=300, help="optimiser steps of each RTE run")
    ap.add_argument("--source-steps", type=int, default=1000, help="optimiser steps of each source prompt")
    ap.add_argument("--source-limit", type=int, default=20000, help="rows of each source task (the mixture's cap)")
    ap.add_argument("--eval-limit", type=int, default=0, help="score the first N held-out rows (0 = all)")
    ap.add_argument("--virtual-tokens", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--out", default="")
    ap.add_argument("--workdir", default="", help="derived data files and source prompts (default: next to --out)")
    args = ap.parse_args(argv)
    dev, dtype = device_and_dtype(args.device, args.dtype)
    out = Path(args.out or RESULTS / f"transfer_{dev.type}.json")
    work = Path(args.workdir or out.with_suffix(""))
    done = json.loads(out.read_text())["rows"] if out.is_file() else []  # resumable: rows already measured stay
    model, tok = load_bench_model(args.model, dev, dtype)
    mcfg = ModelConfig(model=args.model, device=dev.type, dtype=args.dtype)
    data = prepare_data(work / "data")
    res = Results(out, {"bench": "transfer", "model": args.model, "device": str(dev), "dtype": args.dtype,
                        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "workdir")}})
    res.doc["rows"] = done
    res.set(summary=summarise(done))  # then kept current with each row, as the rows are
    have = {key(r) for r in done}
    for method in args.methods:
        sources = source_prompts(args, model, tok, mcfg, data, work, method)
        for size in args.sizes:
            for init in args.inits:
                for seed in args.seeds:
                    if (method, str(size or "all"), init, seed) in have:
                        continue
                    row = res.add(target_run(args, model, tok, mcfg, data, work, method, size, init, seed, sources))
                    res.set(summary=summarise(res.doc["rows"]))
                    print(json.dumps(row), flush=True)
    report(res.doc["summary"])
    print(f"wrote {res.path}")


if __name__ == "__main__":
    entry(main)
