"""The classic PEFT + Trainer script and its softprompt twin (examples/classic_*_script.py), the full
run side by side: each in a process of its own, one after the other, reporting its training time,
its peak resident memory (the process's high-water mark, model and data included) and the untuned
and tuned generations. The twin differs from PEFT's script in its import line only.

Then the work each library does per step on the recipe's batches (one epoch drawn by the same
Trainer sampler and seed, both models in this process): tokens entering the decoder, padding
included, and GFLOP of one forward and backward (FlopCounterMode: matmuls; the CPU's fused
attention is not counted), then the seconds of one more forward and backward per batch, each shape
warmed by the counted pass. The work ratio is what the twin can gain at equal efficiency per FLOP;
the forward-and-backward time ratio shows how much of it the model step keeps, and the whole runs
add the Trainer's own work, the optimiser and the first call of every shape.

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
from common import ACTS, RESULTS, ROOT, Results, count_flops, entry  # noqa: E402

SCRIPTS = {"peft": "classic_peft_script.py", "softprompt": "classic_softprompt_script.py"}


def run_script(name: str, args: argparse.Namespace, tmp: Path) -> dict:
    out = tmp / f"{name}.json"
    cmd = [sys.executable, str(ROOT / "examples" / SCRIPTS[name]), "--out", str(tmp / f"{name}_adapter"),
           "--json", str(out), "--rows", str(args.rows), "--epochs", str(args.epochs),
           "--max-new-tokens", str(args.max_new_tokens), "--data", ACTS["data"]]
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


def recipe_batches(args: argparse.Namespace, model, tok, tmp: Path) -> list[dict]:
    """One epoch of the scripts' batches, drawn by their Trainer's sampler (same data, collator, seed)."""
    import csv

    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    with open(ACTS["data"], newline="") as f:
        data = Dataset.from_list(list(csv.DictReader(f))[:args.rows])
    data = data.map(lambda rows: tok(rows["prompt"], truncation=True, max_length=128), batched=True,
                    remove_columns=data.column_names)
    targs = TrainingArguments(output_dir=str(tmp / "order"), per_device_train_batch_size=4, use_cpu=True,
                              report_to=[], seed=0)
    loader = Trainer(model=model, args=targs, train_dataset=data,
                     data_collator=DataCollatorForLanguageModeling(tok, mlm=False)).get_train_dataloader()
    batches = list(loader)
    return batches[:args.max_steps] if args.max_steps > 0 else batches


def counted_step(model, layer, batch: dict) -> tuple[int, int]:
    """(tokens entering the first decoder layer, FLOPs) of one forward and backward on `batch`."""
    tokens = []
    hook = layer.register_forward_hook(lambda m, args, out: tokens.append(args[0].shape[:-1].numel()))
    try:
        flops = count_flops(lambda: model(**batch).loss.backward())
    finally:
        hook.remove()
    return sum(tokens), flops


def timed_step(model, batch: dict) -> float:
    t = time.perf_counter()
    model(**batch).loss.backward()
    return time.perf_counter() - t


def work_per_step(args: argparse.Namespace, tmp: Path) -> dict:
    """Mean tokens through the decoder (padding included, as the first layer sees them) and GFLOP of
    one forward and backward, PEFT's model and the twin's, on the same batches; then the seconds of
    one forward and backward with the linear kernel each runs as shipped (PEFT: torch's; the twin:
    softprompt's `auto`, base/cpu_linear.py) and with each kernel given to both, so that the ratio
    can be split into what the kernel is worth and what the rest is."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import peft
    import softprompt
    from softprompt.base.cpu_linear import use_linear_kernel
    from softprompt.base.families import decoder_layers
    from softprompt.base.models import builtin_model_dir
    from softprompt.forward.paths import choose_path

    path = str(builtin_model_dir())
    tok = AutoTokenizer.from_pretrained(path)
    work = {}
    for name, lib in (("peft", peft), ("softprompt", softprompt)):
        torch.manual_seed(0)
        cfg = lib.PromptTuningConfig(task_type=lib.TaskType.CAUSAL_LM, num_virtual_tokens=4,
                                     prompt_tuning_init=lib.PromptTuningInit.RANDOM, tokenizer_name_or_path=path)
        base = AutoModelForCausalLM.from_pretrained(path)
        model = lib.get_peft_model(base, cfg)
        batches = recipe_batches(args, model, tok, tmp)
        shipped = getattr(model, "linear_kernel", "default")
        use_linear_kernel(base, "default")  # FlopCounterMode counts aten's matmuls, not oneDNN's op
        tokens, flops = zip(*(counted_step(model, decoder_layers(base)[0], b) for b in batches))
        by_kernel = {}
        for kernel in ("onednn", "default"):  # each shape warmed: by the counted pass, oneDNN's by a pass of its own
            use_linear_kernel(base, kernel)
            if kernel == "onednn":  # its first call of each shape, untimed
                for b in batches:
                    timed_step(model, b)
            by_kernel[kernel] = [timed_step(model, b) for b in batches]
        seconds = by_kernel[shipped]
        route = ("padded rows, the prompt in front of each" if name == "peft" else
                 choose_path(model.base_model, model.forward_path, rows=batches[0]["attention_mask"]).path)
        work[name] = {"steps_counted": len(batches), "route": route,
                      "decoder_tokens_per_step": sum(tokens) / len(tokens),
                      "real_tokens_per_step": sum(int(b["attention_mask"].sum()) for b in batches) / len(batches),
                      "gflop_per_step": sum(flops) / len(flops) / 1e9,
                      "forward_backward_s_per_step": sum(seconds) / len(seconds), "linear_kernel": shipped,
                      **{f"forward_backward_s_per_step_{k}": sum(v) / len(v) for k, v in by_kernel.items()}}
        print(f"{name:>10}: {work[name]['decoder_tokens_per_step']:.1f} decoder tokens, "
              f"{work[name]['gflop_per_step']:.1f} GFLOP, forward and backward "
              f"{work[name]['forward_backward_s_per_step']:.3f} s per step ({route})", flush=True)
    return work


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
        work = work_per_step(args, Path(tmp))
    runs = {r["script"]: r for r in res.doc["runs"]}
    for name, r in runs.items():
        print(f"{name:>10}: {r['steps']} steps, train {r['train_seconds']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB, "
              f"final train loss {r['train_loss']:.4f}")
        print(f"{'':>10}  untuned: {r['untuned']!r}\n{'':>10}  tuned:   {r['tuned']!r}")
    p, s = runs["peft"], runs["softprompt"]
    pw, sw = work["peft"], work["softprompt"]
    summary = {"train_time_ratio_peft_over_softprompt": round(p["train_seconds"] / max(s["train_seconds"], 1e-9), 2),
               "peak_rss_mb_saved": round(p["peak_rss_mb"] - s["peak_rss_mb"], 1),
               "decoder_token_ratio_peft_over_softprompt":
                   round(pw["decoder_tokens_per_step"] / sw["decoder_tokens_per_step"], 3),
               "gflop_ratio_peft_over_softprompt": round(pw["gflop_per_step"] / sw["gflop_per_step"], 3),
               "forward_backward_time_ratio_peft_over_softprompt":
                   round(pw["forward_backward_s_per_step"] / sw["forward_backward_s_per_step"], 3),
               **{f"forward_backward_time_ratio_both_{k}": round(pw[f"forward_backward_s_per_step_{k}"]
                                                                 / sw[f"forward_backward_s_per_step_{k}"], 3)
                  for k in ("default", "onednn")}}
    print(json.dumps(summary))
    res.set(work_per_step=work, summary=summary)
    print(f"wrote {res.path}")


if __name__ == "__main__":
    entry(main)
