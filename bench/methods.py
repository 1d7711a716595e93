"""Quality of the prompt-learning methods on the built-in model: softprompt's methods against PEFT's
and full fine-tuning, on three classification tasks, over several seeds, at one training budget.

- Tasks: SST-2 (train -> dev), RTE (train -> val), and AG News (the 10,001-row training-side
  subset in ../shared/data/ag_news, split here into 9,001 training and 1,000 dev rows by a fixed
  shuffle that does not depend on the run's seed). Templates and label words are plain, written
  once for all methods and not tuned.
- Budget: 300 optimiser steps at batch 8 for every method, P = 20 virtual tokens.
- softprompt (`sp:prompt`, `sp:prefix`, `sp:ptuning`, `sp:residual`): `train()` with nothing but
  the data, the method, the steps and the seed; every other choice (init, lr, loss) is its default.
- PEFT (`peft:prompt`, `peft:prefix`, `peft:ptuning`): PEFT's "Prompt-based methods" task guide
  (docs/source/task_guides/prompt_based_methods.md): its configs (PromptTuningConfig with TEXT init,
  PrefixTuningConfig, PromptEncoderConfig with encoder_hidden_size=128), AdamW at lr 3e-2 with a
  linear decay and no warm-up, the causal-LM loss on the label word. Its batches are length-grouped
  as `group_by_length` makes them and its logits are kept only where the loss reads them: the same
  loss as the guide's loop, less CPU time.
- Full fine-tuning (`full`): `train(method="full")` on a copy of the model, its default lr 2e-5.
- Ablation, asked for by name only: `sp:prefix-plain`, the prefix with PEFT's plain steps
  (`--no-prefix-scaled-steps`), to measure what scaled steps change on the same machine.

Every method is scored by the same rank classification over the label words on the whole dev set
(PEFT's prompts are read into softprompt's objects, whose logits equal PEFT's forward: tests/
test_peft*.py). Rows are written one by one and the bench resumes: rows already in --out are kept.

    python bench/methods.py                                   # everything: many hours on 2 CPU cores
    python bench/methods.py --tasks sst2 --seeds 0            # one task, one seed
    python bench/methods.py --steps 2 --eval-limit 8 --train-limit 64 --out /tmp/m.json   # dry run
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (RESULTS, attn_implementation, entry, load_bench_model, provenance, task_data,  # noqa: E402
                    write_result)

from softprompt.core.config import DataConfig, ModelConfig, PromptConfig, TrainConfig  # noqa: E402
from softprompt.data.batching import batch_order, collate, pad_id  # noqa: E402
from softprompt.data.formatting import load_splits  # noqa: E402
from softprompt.evaluation.evaluate import evaluate  # noqa: E402
from softprompt.prompts.prefix import PrefixPrompt, from_flat  # noqa: E402
from softprompt.prompts.prompt import SoftPrompt, init_prompt  # noqa: E402
from softprompt.training.train import default_init_text, train  # noqa: E402

SP_METHODS = ("sp:prompt", "sp:prefix", "sp:ptuning", "sp:residual")
PEFT_METHODS = ("peft:prompt", "peft:prefix", "peft:ptuning")
# Ablations: a softprompt method with one default turned off (not among the methods compared by default).
ABLATIONS = {"sp:prefix-plain": ("prefix", {"prefix_scaled_steps": False})}  # PEFT's plain steps
METHODS = (*SP_METHODS, *PEFT_METHODS, "full")
PEFT_LR = 3e-2  # the task guide's one rate for all three prompt-based methods
PEFT_GUIDE = "https://github.com/huggingface/peft/blob/main/docs/source/task_guides/prompt_based_methods.md"


def run_softprompt(method: str, model, tok, dcfg, splits, args, seed: int) -> dict:
    fmt, train_ex, eval_ex = splits
    name, off = ABLATIONS.get(method, (method.split(":")[1] if ":" in method else method, {}))
    base = copy.deepcopy(model) if name == "full" else model  # full fine-tuning changes the weights
    with tempfile.TemporaryDirectory() as tmp:
        summary = train(ModelConfig(device=str(args.device)), dcfg, PromptConfig(virtual_tokens=args.P),
                        TrainConfig(out=tmp, method=name, max_steps=args.steps, batch_size=args.batch_size,
                                    eval_every=0, save_every=0, seed=seed, eval_untuned=False, **off),
                        model=base, tok=tok, quiet=True, splits=(fmt, train_ex, eval_ex))
        cfg = json.loads((Path(tmp) / "run_config.json").read_text())
    del base
    ev = summary["final_eval"]
    return {"accuracy": ev["accuracy"], "train_seconds": summary["train_seconds"],
            "trainable_params": summary["trainable_params"], "lr": summary["lr"],
            "loss": cfg["TrainConfig"]["loss"], "init": cfg["PromptConfig"]["init"],
            **({"prefix_scaled_steps": cfg["TrainConfig"]["prefix_scaled_steps"]} if name == "prefix" else {})}


def peft_model(method: str, model, tok, fmt, P: int):
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model

    kind = method.split(":")[1]
    if kind == "prompt":
        pm = get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
        # The guide's TEXT init (the init text's embeddings, repeated to fill P), built by softprompt's
        # identical init, so that no Hub tokenizer download is needed.
        text = default_init_text(fmt)
        pm.prompt_encoder["default"].embedding.weight.data.copy_(
            init_prompt(model, tok, PromptConfig(P, "text", init_text=text)).embeds)
    elif kind == "prefix":
        pm = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    else:
        pm = get_peft_model(model, PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=P,
                                                       encoder_hidden_size=128))
    return pm


def peft_prompt(method: str, pm, model):
    """PEFT's trained prompt as softprompt's object (prompt tuning's embedding, P-tuning's encoder
    output, prefix tuning's keys and values), for the shared evaluator."""
    enc = pm.prompt_encoder["default"]
    if method == "peft:prefix":
        cfg = model.config
        heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return PrefixPrompt(from_flat(enc.embedding.weight.detach().float(), cfg.num_hidden_layers, heads, d))
    idx = torch.arange(pm.peft_config["default"].num_virtual_tokens, device=enc.embedding.weight.device)
    with torch.no_grad():
        return SoftPrompt(enc(idx).detach().float())


def run_peft(method: str, model, tok, dcfg, splits, args, seed: int) -> dict:
    fmt, train_ex, eval_ex = splits
    torch.manual_seed(seed)  # prefix tuning's and P-tuning's random init
    pm = peft_model(method, model, tok, fmt, args.P)
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=PEFT_LR)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / args.steps))
    order = []
    while len(order) < args.steps:  # epochs of length-grouped batches, as softprompt's loop draws them
        order += batch_order([len(e.ids) for e in train_ex], args.batch_size, seed + len(order), group=True)
    P = 0 if method == "peft:prefix" else args.P  # prompt tuning and P-tuning return logits for the prompt too
    pad, seconds = pad_id(tok), 0.0
    pm.train()
    for step in range(args.steps):
        b = collate([train_ex[i] for i in order[step]], pad).to(args.device)
        t = time.perf_counter()
        labels = torch.cat([b.targets.new_full((b.targets.shape[0], P), -100), b.targets], 1)
        keep = (labels[:, 1:] != -100).any(0).nonzero().squeeze(1)  # positions predicting a label token
        logits = pm(input_ids=b.input_ids, attention_mask=b.attention_mask, logits_to_keep=keep).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels[:, keep + 1].flatten(), ignore_index=-100)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        seconds += time.perf_counter() - t
    pm.eval()
    prompt = peft_prompt(method, pm, model).to(args.device)
    trainable = sum(p.numel() for p in params)
    del pm, opt, params
    m = evaluate(model, tok, prompt, fmt, eval_ex, batch_size=32)
    return {"accuracy": m["accuracy"], "train_seconds": round(seconds, 2), "trainable_params": trainable,
            "lr": PEFT_LR, "loss": "lm (label word)", "init": "text" if method == "peft:prompt" else "random"}


def summarise(rows: list[dict]) -> dict:
    """Mean and spread per (task, method); which PEFT method is best; how much of the gap between
    prompt tuning and full fine-tuning each softprompt method closes."""
    out: dict = {}
    for task in sorted({r["task"] for r in rows}):
        cells = {}
        for method in (*METHODS, *ABLATIONS):
            accs = [r["accuracy"] for r in rows if r["task"] == task and r["method"] == method]
            if accs:
                cells[method] = {"mean": statistics.mean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                                 "n": len(accs)}
        peft = {m: c["mean"] for m, c in cells.items() if m in PEFT_METHODS}
        best_peft = max(peft, key=peft.get) if peft else None
        gap = {}
        if "sp:prompt" in cells and "full" in cells:
            lo, hi = cells["sp:prompt"]["mean"], cells["full"]["mean"]
            gap = {m: (cells[m]["mean"] - lo) / (hi - lo) if hi != lo else None for m in (*SP_METHODS, *ABLATIONS)
                   if m in cells}
        out[task] = {"methods": cells, "best_peft": best_peft,
                     "vs_best_peft_points": {m: 100 * (cells[m]["mean"] - peft[best_peft])
                                             for m in (*SP_METHODS, *ABLATIONS) if m in cells and best_peft},
                     "gap_closed": gap}
    return out


def report(summary: dict) -> None:
    for task, s in summary.items():
        print(f"\n{task}: dev accuracy, mean +- std over seeds (n)")
        for m, c in s["methods"].items():
            extra = ""
            if m in s["vs_best_peft_points"]:
                extra = f"   {s['vs_best_peft_points'][m]:+.2f} pts vs best PEFT ({s['best_peft']})"
            if s["gap_closed"].get(m) is not None:
                extra += f", closes {100 * s['gap_closed'][m]:.0f}% of prompt -> full"
            print(f"  {m:<12} {100 * c['mean']:6.2f} +- {100 * c['std']:4.2f} ({c['n']}){extra}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tasks", nargs="+", default=["sst2", "rte", "ag_news"])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=[*METHODS, *ABLATIONS])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--P", type=int, default=20, help="virtual tokens, every method")
    ap.add_argument("--train-limit", type=int, default=0, help="training rows (0 = all; small only for a dry run)")
    ap.add_argument("--eval-limit", type=int, default=0, help="dev rows (0 = all; small only for a dry run)")
    ap.add_argument("--note", default="", help="recorded as is: e.g. what else ran on the machine")
    ap.add_argument("--out", default=str(RESULTS / "methods_smollm2-135m-instruct_cpu.json"))
    args = ap.parse_args()
    args.device = torch.device(args.device)
    out = Path(args.out)
    old = json.loads(out.read_text()) if out.exists() else {}
    rows = old.get("rows", [])
    doc = {**provenance(), "bench": "methods", "model": args.model, "device": str(args.device), "dtype": "float32",
           "steps": args.steps, "batch_size": args.batch_size, "virtual_tokens": args.P,
           "train_limit": args.train_limit, "eval_limit": args.eval_limit, "peft_lr": PEFT_LR, "peft_guide": PEFT_GUIDE,
           "notes": old.get("notes", []) + ([args.note] if args.note else []), "rows": rows}
    model, tok = load_bench_model(args.model, args.device, torch.float32)
    doc["attn_implementation"] = attn_implementation(model)
    done = {(r["task"], r["method"], r["seed"]) for r in rows}
    with tempfile.TemporaryDirectory() as folder:
        for seed in args.seeds:  # seed-major: one seed of everything first, so a stopped run still compares
            for task in args.tasks:
                dcfg = DataConfig(**task_data(task, Path(folder)), limit=args.train_limit, eval_limit=args.eval_limit)
                splits = load_splits(dcfg, tok, seed)
                for method in args.methods:
                    if (task, method, seed) in done:
                        continue
                    t0 = time.perf_counter()
                    run = run_peft if method.startswith("peft:") else run_softprompt
                    r = {"task": task, "method": method, "seed": seed,
                         **run(method, model, tok, dcfg, splits, args, seed),
                         "wall_seconds": round(time.perf_counter() - t0, 1), "commit": doc["commit"],
                         "cpu_model": doc["machine"].get("cpu_model")}  # a resumed file's rows span machines
                    rows.append(r)
                    doc["summary"] = summarise(rows)
                    write_result(out, doc)
                    print(f"{task} {method} seed {seed}: {100 * r['accuracy']:.2f}% "
                          f"({r['train_seconds']:.0f} s training, {r['wall_seconds']:.0f} s wall)", flush=True)
    doc["summary"] = summarise(rows)
    write_result(out, doc)
    report(doc["summary"])
    print(f"wrote {out}")


if __name__ == "__main__":
    entry(main)
