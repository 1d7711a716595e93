"""Training: one explicit loop that updates only the soft prompt (or, with `method="full"`, every
model weight instead: the full fine-tuning baseline, trained by the same loop on the same batches).

Data-parallel through Accelerate: under `accelerate launch`/`torchrun` each process takes its share
of every global batch and the prompt's gradient is all-reduced, so N processes produce the prompt
one process would with the combined batch. The run folder gets the prompt (best or last),
run_config.json, metrics.jsonl, loss.png, summary.json and a resumable checkpoint.
"""
from __future__ import annotations

import json
import math
import string
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .config import FULL_FT_LR, DataConfig, ModelConfig, PromptConfig, TrainConfig, to_dict
from .batching import Example, batch_order, collate, pad_id
from .classify import class_token_ids, single_token_classes
from .data import Formatter, load_splits
from .evaluate import evaluate
from .forward import batch_loss
from .models import load_model
from .prompt import init_prompt, load_prompt, save_prompt
from .utils import SoftpromptError, atomic_dir, count_params, seed_everything, weights_hash, write_json


def default_init_text(fmt: Formatter) -> str:
    """Text for `--init text` when none is given: what the task is, in words."""
    if fmt.label_words:
        return "Classify the text as " + " or ".join(fmt.label_words) + "."
    literal = "".join(part for part, *_ in string.Formatter().parse(fmt.template)).strip()
    return literal or "Continue the text in the same style."


def lr_lambda(cfg: TrainConfig, total: int):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.schedule == "constant":
            return 1.0
        frac = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        return max(0.0, 1 - frac) if cfg.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
    return f


def make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        # The paper's setting: fixed lr, no relative step or parameter scaling.
        return Adafactor(params, lr=cfg.lr, scale_parameter=False, relative_step=False, warmup_init=False,
                         weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def resolve_auto(pcfg: PromptConfig, tcfg: TrainConfig, fmt: Formatter, train_ex: list[Example]):
    """Replace the 'auto' choices by what they mean for this data."""
    from dataclasses import replace

    from .inits import resolve

    pcfg = replace(pcfg, init=resolve(pcfg.init, fmt.label_words))
    if tcfg.loss == "auto":
        # The label-word softmax trains only what rank classification scores; it needs one-token
        # words, tokenised the same after every input (what class_token_ids demands).
        single = fmt.task == "classify" and single_token_classes(fmt, train_ex) is not None
        tcfg = replace(tcfg, loss="classes" if single else "lm")
    if tcfg.lr == 0:
        # PEFT's classic 3e-2 moves an Adam step ~0.03 per coordinate, a quarter of SmolLM2's
        # embedding RMS (0.136): from the label words' embeddings, with the two-way softmax, that
        # threw one SST-2 seed in three onto the majority class; 1e-2 trained all three to ~88%.
        tcfg = replace(tcfg, lr=FULL_FT_LR if tcfg.method == "full" else 1e-2 if tcfg.loss == "classes" else 3e-2)
    return pcfg, tcfg


def _score(metrics: dict[str, float]) -> float:
    # Higher is better: accuracy for classification, negative loss otherwise.
    return metrics["accuracy"] if "accuracy" in metrics else -metrics["loss"]


MODEL_DIR = "model"  # where a full fine-tuning run saves its model, inside the run folder


def save_model(model, tok, dest: Path, meta: dict[str, Any]) -> Path:
    """The whole fine-tuned model as safetensors (+ tokenizer), loadable with --model DEST; atomic."""
    with atomic_dir(dest) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        write_json(tmp / "softprompt_run.json", meta)
    return dest


def train(mcfg: ModelConfig, dcfg: DataConfig, pcfg: PromptConfig, tcfg: TrainConfig,
          model=None, tok=None, stop_after: int = 0, quiet: bool = False,
          splits: tuple[Formatter, list[Example], list[Example]] | None = None) -> dict[str, Any]:
    """Train a soft prompt (or fine-tune the model: `tcfg.method == "full"`); return the run summary.
    `stop_after` > 0 simulates an interruption after that many steps (for resume tests). `splits`
    gives already loaded (formatter, train, eval) examples instead of loading `dcfg`: the method
    comparison passes one split to every method (an empty eval list skips evaluation)."""
    from accelerate import Accelerator

    from dataclasses import replace

    mcfg, dcfg, pcfg, tcfg = (replace(c) for c in (mcfg, dcfg, pcfg, tcfg))  # their checks, after any change
    acc = Accelerator(cpu=mcfg.device == "cpu")
    seed_everything(tcfg.seed)
    if model is None:
        model, tok = load_model(mcfg)
    model.to(acc.device)
    fmt, train_ex, eval_ex = splits if splits is not None else load_splits(dcfg, tok, tcfg.seed)
    out = Path(tcfg.out)
    ckpt = out / "checkpoint"
    finetune = tcfg.method == "full"
    if finetune and (tcfg.resume or acc.num_processes > 1):
        # Its checkpoint would be the whole model plus 2x its size of optimiser state, and the
        # forward pass below calls the decoder directly, which DDP's hooks would not see.
        raise SoftpromptError("--method full runs in one process and cannot --resume")
    if tcfg.resume and not (ckpt / "state.json").is_file():
        raise SoftpromptError(f"--resume: no checkpoint in {ckpt}")
    pcfg, tcfg = resolve_auto(pcfg, tcfg, fmt, train_ex)  # the saved config records what ran
    if finetune:
        if tcfg.lr > 1e-3:
            print(f"[softprompt] warning: --lr {tcfg.lr} is a prompt-tuning rate; full fine-tuning wants ~1e-5..5e-5",
                  file=sys.stderr)
        prompt = None  # P = 0: the text alone, through weights that all learn
        model.requires_grad_(True)
        params = list(model.parameters())
    else:
        prompt = init_prompt(model, tok, pcfg, fmt.label_words, default_init_text(fmt), tcfg.seed,
                             fmt.render_input(train_ex[0].text))
        prompt.to(acc.device)
        params = list(prompt.parameters())
    if tcfg.loss == "classes" and fmt.task != "classify":
        raise SoftpromptError("--loss classes needs classification data (--labels)")
    class_ids = class_token_ids(fmt, train_ex).to(acc.device) if tcfg.loss == "classes" else None

    world, rank = acc.num_processes, acc.process_index
    if tcfg.batch_size % world:
        raise SoftpromptError(f"--batch-size {tcfg.batch_size} is not divisible by {world} processes")
    per_epoch = math.ceil(len(train_ex) / tcfg.batch_size)
    total = tcfg.max_steps if tcfg.max_steps > 0 else max(1, math.ceil(tcfg.epochs * per_epoch))
    opt = make_optimizer(tcfg, params)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(tcfg, total))
    ddp_prompt = acc.prepare_model(prompt) if world > 1 and not finetune else prompt
    trainable = count_params(model, trainable_only=True) if finetune else count_params(prompt)

    hash_before = weights_hash(model)
    meta = {"model": mcfg.model, "template": dcfg.template, "target": dcfg.target, "text_col": dcfg.text_col,
            "labels": fmt.label_words, "label_col": dcfg.label_col, "chat": dcfg.chat, "task": fmt.task,
            "config": to_dict(mcfg, dcfg, pcfg, tcfg)}
    state = {"step": 0, "best": -math.inf, "bad_evals": 0, "train_seconds": 0.0, "tokens": 0}
    if tcfg.resume:
        state = json.loads((ckpt / "state.json").read_text())
        prompt.embeds.data.copy_(load_prompt(ckpt).embeds.data)
        opt.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
        sched.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
    main = acc.is_main_process
    if main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "run_config.json", {**to_dict(mcfg, dcfg, pcfg, tcfg), "world_size": world,
                                             "train_examples": len(train_ex), "eval_examples": len(eval_ex),
                                             "total_steps": total, "truncated": fmt.truncated})
        metrics_path = out / "metrics.jsonl"
        kept = [l for l in (metrics_path.read_text().splitlines() if tcfg.resume and metrics_path.exists() else [])
                if json.loads(l).get("step", 0) <= state["step"]]
        metrics_path.write_text("".join(l + "\n" for l in kept))

    def log(rec: dict[str, Any]) -> None:
        if main:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")

    def save_artifact(dest: Path, step: int, m: dict[str, float] | None) -> None:
        if finetune:
            save_model(model, tok, dest / MODEL_DIR, {**meta, "step": step, "eval": m})
        else:
            save_prompt(prompt, dest, {**meta, "step": step, "eval": m})

    def run_eval(step: int) -> dict[str, float] | None:
        if not eval_ex:
            return None
        m = evaluate(model, tok, prompt, fmt, eval_ex, batch_size=max(tcfg.batch_size, 16),
                     path=tcfg.forward_path)
        log({"step": step, "split": "eval", "seconds": round(state["train_seconds"], 3), **m})
        score = _score(m)
        if score > state["best"]:
            state["best"], state["bad_evals"] = score, 0
            if tcfg.keep_best and main:
                save_artifact(out, step, m)
        else:
            state["bad_evals"] += 1
        return m

    untuned = None
    if tcfg.eval_untuned and eval_ex and not tcfg.resume:
        untuned = evaluate(model, tok, None, fmt, eval_ex, batch_size=max(tcfg.batch_size, 16))
        log({"step": 0, "split": "eval_untuned", **untuned})

    pad = pad_id(tok)
    lengths = [len(e.ids) for e in train_ex]
    bar = tqdm(total=total, initial=state["step"], desc="train", disable=not main or quiet, dynamic_ncols=True)
    last_eval, stopped_early = None, False
    epoch, order = -1, []
    while state["step"] < total:
        t0 = time.perf_counter()
        step = state["step"]
        if step // per_epoch != epoch:  # one shuffle per epoch (seeded by it, so resume sees the same)
            epoch = step // per_epoch
            order = batch_order(lengths, tcfg.batch_size, tcfg.seed + epoch)
        full = order[step % per_epoch]
        idx = full[rank::world]
        # A short last batch can leave a rank with no rows: it still joins every collective, with a
        # stand-in row whose targets are all masked (zero loss, zero gradient).
        batch = collate([train_ex[i] for i in idx or full[:1]], pad)
        if not idx:
            batch.targets.fill_(-100)
        batch = batch.to(acc.device)
        # Normalise by the global token count so N processes average to the 1-process loss.
        n_local = torch.tensor(float(batch.num_targets), device=acc.device)
        n_global = acc.reduce(n_local, reduction="sum") if world > 1 else n_local
        loss_sum, _ = batch_loss(model, ddp_prompt() if prompt is not None else None, batch, tcfg.forward_path,
                                 class_ids)
        loss = loss_sum / n_global.clamp(min=1) * world
        acc.backward(loss)
        if tcfg.grad_clip > 0:
            acc.clip_grad_norm_(params, tcfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        state["step"] = step = step + 1
        stats = torch.stack([loss.detach() / world,
                             batch.attention_mask.sum().float() if idx else loss.new_zeros(())])
        if world > 1:
            stats = acc.reduce(stats, reduction="sum")
        state["tokens"] += int(stats[1])
        # Optimiser-step time only: evaluation and checkpoints are not training throughput.
        state["train_seconds"] = elapsed = state["train_seconds"] + time.perf_counter() - t0
        train_loss = float(stats[0])
        bar.set_postfix(loss=f"{train_loss:.4f}", tok_s=f"{state['tokens'] / max(elapsed, 1e-9):.0f}")
        bar.update(1)
        if step % tcfg.log_every == 0 or step == total:
            log({"step": step, "split": "train", "loss": train_loss, "lr": sched.get_last_lr()[0],
                 "tokens": state["tokens"], "seconds": round(elapsed, 3)})
        if (tcfg.eval_every and step % tcfg.eval_every == 0) or step == total:
            last_eval = run_eval(step)
            if tcfg.patience and state["bad_evals"] >= tcfg.patience:
                stopped_early = True
        if main and tcfg.save_every and not finetune and (step % tcfg.save_every == 0 or step == total or stopped_early):
            with atomic_dir(ckpt) as tmp:
                save_prompt(prompt, tmp, meta)
                torch.save(opt.state_dict(), tmp / "optimizer.pt")
                torch.save(sched.state_dict(), tmp / "scheduler.pt")
                (tmp / "state.json").write_text(json.dumps(state))
        if stopped_early or (stop_after and step >= stop_after and step < total):
            break
    bar.close()
    train_seconds = state["train_seconds"]
    if stop_after and state["step"] < total and not stopped_early:
        return {"interrupted_at": state["step"]}
    hash_after = weights_hash(model)
    if finetune:  # leave the (now fine-tuned) model frozen again, like every model this package hands out
        model.requires_grad_(False)
        del opt
    if main:
        if not (tcfg.keep_best and eval_ex) or state["best"] == -math.inf:
            save_artifact(out, state["step"], last_eval)
        summary = {"steps": state["step"], "total_steps": total, "stopped_early": stopped_early,
                   "train_seconds": round(train_seconds, 2), "tokens": state["tokens"],
                   "tokens_per_second": round(state["tokens"] / max(train_seconds, 1e-9), 1),
                   "method": tcfg.method, "lr": tcfg.lr, "trainable_params": trainable,
                   "base_params": count_params(model),
                   "base_weights_sha256_before": hash_before, "base_weights_sha256_after": hash_after,
                   "base_weights_unchanged": hash_before == hash_after,
                   "best_eval_score": state["best"] if state["best"] != -math.inf else None,
                   "final_eval": last_eval, "untuned_eval": untuned, "world_size": world,
                   "prompt_dir": str(out / MODEL_DIR if finetune else out)}
        write_json(out / "summary.json", summary)
        plot_metrics(out)
    else:
        summary = {"steps": state["step"]}
    acc.wait_for_everyone()
    return summary


def plot_metrics(out: Path) -> Path | None:
    """loss.png: training loss and held-out metrics against steps (skipped without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
    tr = [r for r in recs if r["split"] == "train"]
    ev = [r for r in recs if r["split"] == "eval"]
    fig, ax = plt.subplots(1, 2 if ev and "accuracy" in ev[0] else 1, figsize=(10, 4), squeeze=False)
    a = ax[0][0]
    a.plot([r["step"] for r in tr], [r["loss"] for r in tr], label="train loss", alpha=0.7)
    if ev:
        a.plot([r["step"] for r in ev], [r["loss"] for r in ev], "o-", label="held-out loss")
    a.set_xlabel("step"), a.set_ylabel("cross-entropy"), a.legend(), a.grid(alpha=0.3)
    a.set_title("soft prompt training")
    if ev and "accuracy" in ev[0]:
        b = ax[0][1]
        b.plot([r["step"] for r in ev], [100 * r["accuracy"] for r in ev], "o-", color="tab:green")
        b.set_xlabel("step"), b.set_ylabel("held-out accuracy (%)"), b.grid(alpha=0.3)
    fig.tight_layout()
    tmp = out / ".loss.png.tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out / "loss.png")
    return out / "loss.png"
