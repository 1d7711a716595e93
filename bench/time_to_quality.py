"""Time to quality on SST-2: PEFT's prompt-tuning recipe against softprompt's default recipe, in
one process, on the same model, data and dev set.

- PEFT's recipe: `get_peft_model(PromptTuningConfig(20 virtual tokens, TEXT init))`, AdamW lr 3e-2,
  batch 8, linear decay without warm-up and gradient clipping at 1.0 (Trainer's defaults), random
  batches padded to their longest row, the loss on the label word; 300 steps.
- softprompt: `softprompt train` with nothing but the data flags (`--data --eval-data --template
  --labels`): its defaults pick the label-word init and the label-word softmax for classification.
Both are scored by the same rank classification on all 872 dev rows; only optimiser steps are
timed. The result: the seconds each needs to reach PEFT's final accuracy, and their ratio.

    python bench/time_to_quality.py
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
from common import RESULTS, SHARED, device_and_dtype, load_bench_model, machine, sync, write_result  # noqa: E402

from softprompt.config import DataConfig, ModelConfig, PromptConfig, TrainConfig  # noqa: E402
from softprompt.data import collate, load_splits, pad_id  # noqa: E402
from softprompt.evaluate import evaluate  # noqa: E402
from softprompt.prompt import SoftPrompt, init_prompt  # noqa: E402
from softprompt.train import train  # noqa: E402

DATA = dict(data=str(SHARED / "sst2" / "train.tsv"), eval_data=str(SHARED / "sst2" / "dev.tsv"),
            template="Review: {sentence}\nSentiment:", labels="negative,positive")
INIT_TEXT = "Classify if the movie review is negative or positive."


def peft_recipe(model, tok, args, dev) -> dict:
    from peft import PromptTuningConfig, get_peft_model

    fmt, train_ex, dev_ex = load_splits(DataConfig(**DATA), tok, args.seed)
    pm = get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=args.virtual_tokens))
    emb = pm.prompt_encoder["default"].embedding.weight
    # PEFT's TEXT init (the init text's token embeddings, repeated to fill P), built by softprompt's
    # identical init so that no Hub tokenizer download is needed.
    emb.data.copy_(init_prompt(model, tok, PromptConfig(args.virtual_tokens, "text", init_text=INIT_TEXT)).embeds)
    opt = torch.optim.AdamW([emb], lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / args.peft_steps))
    g = torch.Generator().manual_seed(args.seed)
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
            print(f"peft step {step}: {seconds:.0f} s, dev accuracy {100 * m['accuracy']:.2f}%", flush=True)
    del pm
    return {"steps": args.peft_steps, "train_seconds": seconds, "final_accuracy": curve[-1]["accuracy"],
            "curve": curve}


def softprompt_recipe(model, tok, args, target: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        summary = train(ModelConfig(device=args.device), DataConfig(**DATA),
                        PromptConfig(), TrainConfig(out=tmp, max_steps=args.sp_steps, eval_every=args.sp_eval_every,
                                                    save_every=0, seed=args.seed),
                        model=model, tok=tok, quiet=True)
        recs = [json.loads(l) for l in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
        cfg = json.loads((Path(tmp) / "run_config.json").read_text())
    curve = [{"step": r["step"], "seconds": r["seconds"], "accuracy": r["accuracy"]} for r in recs if r["split"] == "eval"]
    for c in curve:
        print(f"softprompt step {c['step']}: {c['seconds']:.0f} s, dev accuracy {100 * c['accuracy']:.2f}%")
    hit = next((c for c in curve if c["accuracy"] >= target), None)
    return {"resolved_config": {k: cfg[k] for k in ("PromptConfig", "TrainConfig")}, "curve": curve,
            "untuned_accuracy": summary["untuned_eval"]["accuracy"], "train_seconds": summary["train_seconds"],
            "reached_target_at": hit}


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
    ap.add_argument("--sp-steps", type=int, default=200)
    ap.add_argument("--sp-eval-every", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    dev, dtype = device_and_dtype(args.device, args.dtype)
    model, tok = load_bench_model(args.model, dev, dtype)
    res = {"bench": "time_to_quality", "model": args.model, "device": str(dev), "machine": machine()}
    res["peft"] = peft = peft_recipe(model, tok, args, dev)
    res["softprompt"] = sp = softprompt_recipe(model, tok, args, peft["final_accuracy"])
    target = peft["final_accuracy"]
    print(f"\nPEFT's recipe: {100 * target:.2f}% after {peft['steps']} steps, {peft['train_seconds']:.0f} s of training")
    if sp["reached_target_at"]:
        hit = sp["reached_target_at"]
        res["time_ratio"] = hit["seconds"] / peft["train_seconds"]
        print(f"softprompt's default recipe: {100 * hit['accuracy']:.2f}% (>= {100 * target:.2f}%) at step {hit['step']}, "
              f"{hit['seconds']:.0f} s: {res['time_ratio']:.2f}x PEFT's time ({1 / res['time_ratio']:.1f}x faster)")
    else:
        res["time_ratio"] = None
        print(f"softprompt's default recipe did not reach {100 * target:.2f}% in {args.sp_steps} steps")
    print(f"wrote {write_result(args.out or RESULTS / f'time_to_quality_{dev.type}.json', res)}")


if __name__ == "__main__":
    main()
