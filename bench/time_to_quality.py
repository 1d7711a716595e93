"""Time to quality on SST-2: PEFT's prompt-tuning recipe against softprompt's default recipe, in
one process, on the same model, data and dev set, over several seeds.

- PEFT's recipe: `get_peft_model(PromptTuningConfig(20 virtual tokens, TEXT init))`, AdamW lr 3e-2,
  batch 8, linear decay without warm-up and gradient clipping at 1.0 (Trainer's defaults), random
  batches padded to their longest row, the loss on the label word; 300 steps.
- softprompt: `softprompt train --method prompt` with nothing but the data flags (`--data --eval-data
  --template --labels`) and a step budget: its defaults pick the label-word init, the label-word
  softmax and lr 1e-2.
Both are scored by the same rank classification on all 872 dev rows; only optimiser steps are
timed. A seed sets the batch order of both (and nothing else: the inits are deterministic).

One run's dev accuracy moves by about a point with the batch order alone (872 rows: a standard
error of 1.1 points at 87%), so one seed's final accuracy is a noisy target. The target is the mean
of PEFT's final accuracies over the seeds, PEFT's time the mean of its training times, and
softprompt's curve the mean over the same seeds at each evaluation step; each seed's own result is
reported too.

    python bench/time_to_quality.py                 # 3 seeds, about 50 minutes on 2 CPU cores
    python bench/time_to_quality.py --seeds 0       # one seed
    python bench/time_to_quality.py --merge A.json B.json --out C.json   # seeds run apart, summarised
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
from common import (RESULTS, Results, SHARED, attn_implementation, device_and_dtype, entry,  # noqa: E402
                    load_bench_model, provenance, sync, write_result)

from softprompt.core.config import DataConfig, ModelConfig, PromptConfig, TrainConfig  # noqa: E402
from softprompt.data.batching import collate, pad_id  # noqa: E402
from softprompt.data.formatting import load_splits  # noqa: E402
from softprompt.evaluation.evaluate import evaluate  # noqa: E402
from softprompt.prompts.prompt import SoftPrompt, init_prompt  # noqa: E402
from softprompt.training.train import train  # noqa: E402

DATA = dict(data=str(SHARED / "sst2" / "train.tsv"), eval_data=str(SHARED / "sst2" / "dev.tsv"),
            template="Review: {sentence}\nSentiment:", labels="negative,positive")
INIT_TEXT = "Classify if the movie review is negative or positive."


def peft_recipe(model, tok, args, dev, seed: int) -> dict:
    from peft import PromptTuningConfig, get_peft_model

    fmt, train_ex, dev_ex = load_splits(DataConfig(**DATA, eval_limit=args.eval_limit), tok, seed)
    pm = get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=args.virtual_tokens))
    emb = pm.prompt_encoder["default"].embedding.weight
    # PEFT's TEXT init (the init text's token embeddings, repeated to fill P), built by softprompt's
    # identical init so that no Hub tokenizer download is needed.
    emb.data.copy_(init_prompt(model, tok, PromptConfig(args.virtual_tokens, "text", init_text=INIT_TEXT)).embeds)
    opt = torch.optim.AdamW([emb], lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / args.peft_steps))
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train_ex), generator=g).tolist()
    pad = pad_id(tok)
    curve, seconds = [], 0.0
    for step in range(1, args.peft_steps + 1):
        idx = order[(step - 1) * args.batch_size: step * args.batch_size]
        b = collate([train_ex[i] for i in idx], pad).to(dev)
        sync(dev)
        t = time.perf_counter()
        loss = pm(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.targets).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([emb], 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        sync(dev)
        seconds += time.perf_counter() - t
        if step % args.peft_eval_every == 0 or step == args.peft_steps:
            # softprompt's evaluator on PEFT's prompt: the same logits as PEFT's forward (tests/test_peft.py)
            m = evaluate(model, tok, SoftPrompt(emb.detach().clone()).to(dev), fmt, dev_ex, batch_size=32)
            curve.append({"step": step, "seconds": round(seconds, 2), "accuracy": m["accuracy"]})
            print(f"peft seed {seed} step {step}: {seconds:.0f} s, dev accuracy {100 * m['accuracy']:.2f}%", flush=True)
    del pm
    return {"steps": args.peft_steps, "train_seconds": seconds, "final_accuracy": curve[-1]["accuracy"],
            "curve": curve}


def softprompt_recipe(model, tok, args, seed: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        train(ModelConfig(device=args.device), DataConfig(**DATA, eval_limit=args.eval_limit),
              PromptConfig(), TrainConfig(out=tmp, method="prompt", max_steps=args.sp_steps,
                                          eval_every=args.sp_eval_every,
                                          save_every=0, seed=seed, eval_untuned=False),
              model=model, tok=tok, quiet=True)
        recs = [json.loads(l) for l in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
        cfg = json.loads((Path(tmp) / "run_config.json").read_text())
    curve = [{"step": r["step"], "seconds": r["seconds"], "accuracy": r["accuracy"]} for r in recs if r["split"] == "eval"]
    for c in curve:
        print(f"softprompt seed {seed} step {c['step']}: {c['seconds']:.0f} s, dev accuracy {100 * c['accuracy']:.2f}%", flush=True)
    cfg["TrainConfig"].pop("out")
    return {"resolved_config": {k: cfg[k] for k in ("PromptConfig", "TrainConfig")}, "curve": curve}


def first_hit(curve: list[dict], target: float) -> dict | None:
    return next((c for c in curve if c["accuracy"] >= target - 1e-9), None)


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def summarize(res: dict) -> None:
    """Add the mean-over-seeds target, curve and time ratio to `res` and print them."""
    runs = res["runs"]
    peft_steps = runs[0]["peft"]["steps"]
    sp_steps = runs[0]["softprompt"]["resolved_config"]["TrainConfig"]["max_steps"]
    target = mean(r["peft"]["final_accuracy"] for r in runs)
    peft_s = mean(r["peft"]["train_seconds"] for r in runs)
    steps = [c["step"] for c in runs[0]["softprompt"]["curve"]]
    curve = [{"step": st, "seconds": mean(r["softprompt"]["curve"][i]["seconds"] for r in runs),
              "accuracy": mean(r["softprompt"]["curve"][i]["accuracy"] for r in runs)} for i, st in enumerate(steps)]
    hit = first_hit(curve, target)
    res.update(target_accuracy=target, peft_mean_train_seconds=peft_s, softprompt_mean_curve=curve,
               softprompt_reached_target_at=hit, time_ratio=hit["seconds"] / peft_s if hit else None,
               resolved_config=runs[0]["softprompt"]["resolved_config"])
    print(f"\n{'seed':>5} {'PEFT final':>11} {'PEFT s':>7}   softprompt: first eval at or above that seed's PEFT accuracy")
    for r in runs:
        pe, own = r["peft"], first_hit(r["softprompt"]["curve"], r["peft"]["final_accuracy"])
        r["softprompt"]["reached_own_seed_target_at"] = own
        at = f"{100 * own['accuracy']:.2f}% at step {own['step']}, {own['seconds']:.0f} s" if own else "not reached"
        print(f"{r['seed']:>5} {100 * pe['final_accuracy']:>10.2f}% {pe['train_seconds']:>7.0f}   {at}")
    print(f"\nPEFT's recipe, mean of {len(runs)} seeds: {100 * target:.2f}% after {peft_steps} steps, "
          f"{peft_s:.0f} s of training (a third: {peft_s / 3:.0f} s)")
    print("softprompt's default recipe, mean curve: " + ", ".join(
        f"{100 * c['accuracy']:.2f}% at {c['seconds']:.0f} s" for c in curve))
    if hit:
        print(f"reaches {100 * target:.2f}% at step {hit['step']}, {hit['seconds']:.0f} s: "
              f"{res['time_ratio']:.2f}x PEFT's time ({1 / res['time_ratio']:.1f}x faster; target: at most 0.33x)")
    else:
        print(f"does not reach {100 * target:.2f}% within {sp_steps} steps")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--virtual-tokens", type=int, default=20)
    ap.add_argument("--lr", type=float, default=3e-2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--peft-steps", type=int, default=300)
    ap.add_argument("--peft-eval-every", type=int, default=100)
    ap.add_argument("--sp-steps", type=int, default=300, help="softprompt's step budget (its linear decay ends there)")
    ap.add_argument("--sp-eval-every", type=int, default=30)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--eval-limit", type=int, default=0, help="score the first N dev rows (0 = all 872; "
                    "a small N only for a dry run)")
    ap.add_argument("--out", default="")
    ap.add_argument("--merge", nargs="+", metavar="RESULT", help="summarise the runs of these result files "
                    "together (e.g. seeds run in separate processes) into --out, running nothing")
    args = ap.parse_args()
    if args.merge:
        parts = [json.loads(Path(f).read_text()) for f in args.merge]
        # The command and commit are the merge's; the machine stays the one the runs measured.
        res = {**parts[0], **{k: v for k, v in provenance().items() if k != "machine"},
               "runs": [r for part in parts for r in part["runs"]], "merged_from": args.merge,
               "measured_commits": [p.get("commit", "not recorded") for p in parts]}
        res["seeds"] = [r["seed"] for r in res["runs"]]
        summarize(res)
        print(f"wrote {write_result(args.out or RESULTS / 'time_to_quality_merged.json', res)}")
        return
    dev, dtype = device_and_dtype(args.device, args.dtype)
    model, tok = load_bench_model(args.model, dev, dtype)
    out = args.out or RESULTS / f"time_to_quality_{dev.type}.json"
    res = Results(out, {"bench": "time_to_quality", "model": args.model, "device": str(dev), "dtype": args.dtype,
                        "attn_implementation": attn_implementation(model),
                        "warmup": "none: every optimiser step is timed, the first ones included",
                        "seeds": args.seeds, "eval_limit": args.eval_limit}, key="runs")
    for seed in args.seeds:  # both recipes per seed, so that a slow spell of the machine hits both
        res.add({"seed": seed, "peft": peft_recipe(model, tok, args, dev, seed),
                 "softprompt": softprompt_recipe(model, tok, args, seed)})  # kept, should a time limit stop the next
    summarize(res.doc)
    print(f"wrote {res.save()}")


if __name__ == "__main__":
    entry(main)
