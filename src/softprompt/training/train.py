"""Training, as a recipe (after torchtune's single-device recipes): `setup` builds everything a run
needs, `loss_step` is one optimiser step, `evaluate_run` scores the held-out data, and `train` is
the loop that calls them, top to bottom. What is trained, a soft prompt or (`--method full`) every
model weight, is a method object (methods.py), so the loop never asks which; the run folder, its
checkpoint and metrics log are rundir.py's.

Data-parallel through Accelerate: under `accelerate launch`/`torchrun` each process takes its share
of every global batch and the prompt's gradient is all-reduced, so N processes produce the prompt
one process would with the combined batch. The run folder gets the prompt (best or last),
run_config.json, metrics.jsonl, loss.png, summary.json and a resumable checkpoint.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import string
import sys
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import torch
from tqdm.auto import tqdm

from ..base.families import check_positions
from ..base.models import cpu_bf16_method, dtype_reason, load_model, resolve_device, set_checkpointing
from ..base.shard import local_bytes, shard_decoder
from ..base.training_setup import prepare_for_training
from ..core.config import (EVAL_EVERY, DataConfig, ModelConfig, PromptConfig, TrainConfig, check_warmup, from_args,
                           to_dict)
from ..core.inits import resolve
from ..core.utils import (SoftpromptError, count_params, dtype_name, live_output, round_floats, seed_everything,
                          warn, weights_hash, write_json)
from ..data.batching import Batch, Example, batch_order, collate, pad_id
from ..data.formatting import Formatter
from ..data.mixture import load_data
from ..evaluation.evaluate import evaluate_tasks, format_eval
from ..forward.classify import class_token_ids, several_token_words, task_class_ids
from ..forward.cuda_graphs import GraphedStep
from ..forward.hidden import batch_loss
from ..forward.paths import choose_path
from ..prompts.prompt import load_source
from ..prompts.transfer import adopt
from . import trackers as tracking
from .auto_method import resolve_method
from .methods import METHODS, Method
from .rundir import (RUN_CONFIG, RunLock, append_metrics, check_out, check_same_run, clear_run, load_checkpoint,
                     plot_metrics, recorded_evals, save_checkpoint, start_metrics, tidy_checkpoint)


PROGRESS_EVERY_S = 60  # off a terminal (a log file), a progress line this often in place of the bar


def default_init_text(fmt: Formatter) -> str:
    """Text for `--init text` when none is given: what the task is, in words."""
    if fmt.label_words:
        return "Classify the text as " + " or ".join(fmt.label_words) + "."
    literal = "".join(part for part, *_ in string.Formatter().parse(fmt.template)).strip()
    return literal or "Continue the text in the same style."


def schedule_factor(step: int, kind: str, warmup: int, total: int) -> float:
    """transformers' linear, cosine (half a cycle) and constant_with_warmup schedules, as their
    get_scheduler computes them: a warm-up from 0, then the decay to 0 at `total`. Written out here
    because importing transformers.optimization imports its trainer, PEFT and bitsandbytes (whose
    CPU backend prints a line on every run)."""
    if step < warmup:
        return float(step) / float(max(1, warmup))
    if kind == "constant":
        return 1.0
    progress = float(step - warmup) / float(max(1, total - warmup))
    if kind == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return max(0.0, 1.0 - progress)


def make_scheduler(cfg: TrainConfig, opt: torch.optim.Optimizer, total: int):
    """transformers' schedule entered one step in. Its warm-up starts at lr 0, which would spend the
    first step on nothing; with W+1 warm-up steps out of total+1, entered at step 1, step s gets
    (s+1)/(W+1) of the peak during warm-up and then HF's decay unchanged, the schedule softprompt
    always had (the drift test's recorded losses). A checkpoint restores it exactly."""
    factor = functools.partial(schedule_factor, kind=cfg.schedule, warmup=cfg.warmup_steps + 1, total=total + 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    with warnings.catch_warnings():  # the step before any optimiser step is the point here
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
        sched.step()
    return sched


def make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        # The paper's setting: fixed lr, no relative step or parameter scaling.
        return Adafactor(params, lr=cfg.lr, scale_parameter=False, relative_step=False, warmup_init=False,
                         weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def eval_stride(batch_size: int, held_out: int) -> int:
    """--eval-every auto: every EVAL_EVERY steps, or as seldom as keeps scoring the held-out rows to
    about a fifth of the run (a row scored costs about a third of a row trained: forward against
    forward and backward). 1000 rows at batch 8: every 209 steps."""
    return max(EVAL_EVERY, math.ceil(5 * held_out / (3 * batch_size)))


def resolve_auto(pcfg: PromptConfig, tcfg: TrainConfig, fmt: Formatter, train_ex: list[Example], held_out: int):
    """Replace the 'auto' choices by what they mean for this data (`held_out` rows scored at each evaluation)."""
    # A prefix starts from a text's keys and values: auto is text for it, label words or not.
    pcfg = replace(pcfg, init=resolve(pcfg.init, fmt.label_words if tcfg.method != "prefix" else None))
    if tcfg.loss == "auto":
        # The label-word softmax trains only what rank classification scores; it needs one-token
        # words, tokenised the same after every input (what class_token_ids demands).
        single = fmt.task == "classify" and task_class_ids(fmt, train_ex) is not None
        tcfg = replace(tcfg, loss="classes" if single else "lm")
        if fmt.task == "classify" and not single:
            several = several_token_words(fmt, train_ex)
            why = (f"label words of several tokens ({several})" if several else
                   "label words tokenised otherwise after some inputs")
            warn(f"--loss auto: {why}, so the loss is the whole vocabulary's (lm); label words of one token each "
                 "train over themselves alone (--loss classes)")
    if tcfg.lr == 0:
        tcfg = replace(tcfg, lr=METHODS[tcfg.method].default_lr(tcfg.loss))
    if tcfg.eval_every < 0:
        tcfg = replace(tcfg, eval_every=eval_stride(tcfg.batch_size, held_out))
    return pcfg, tcfg


def warn_unseen_labels(fmt, train_ex: list[Example]) -> None:
    """A label word no training row has (--labels a,b,c on 0/1 data) is still a class every row is
    scored against, learnt from nothing."""
    for f, rows in fmt.parts(train_ex):
        seen = {e.label for e in rows}
        unseen = [w for i, w in enumerate(f.label_words) if i not in seen]
        if f.label_words and unseen:
            warn(f"no training row has the label word(s) {', '.join(map(repr, unseen))}, yet each is a class every "
                 f"row is scored against: does --labels match the values of --label-col {f.cfg.label_col!r}?")


def mixture_obstacle(fmt) -> str | None:
    """Why a --mix run's step is not graphed: the graph's label-word loss holds one set of words."""
    return "a task mixture (each task has its own label words)" if fmt.cfg.mix else None


@dataclass(kw_only=True)
class Run:
    """What one training run holds; `setup` builds it (by keyword: its fields are many and alike)."""
    cfg: TrainConfig                # resolved: no 'auto' left
    acc: Any                        # accelerate.Accelerator
    model: Any
    tok: Any
    method: Method                  # one of methods.METHODS (PromptTuning, PrefixTuning, PTuning, ...)
    params: list[torch.nn.Parameter]
    fmt: Formatter
    train_ex: list[Example]
    eval_ex: list[Example]
    class_ids: torch.Tensor | None  # [C] the label words' ids, for --loss classes
    opt: Any
    sched: Any
    per_epoch: int                  # optimiser steps per pass over the data
    total: int                      # optimiser steps in all
    meta: dict[str, Any]            # recorded with every saved prompt or model
    hash_before: str
    # What a checkpoint restores: step, best score, evaluations without improvement, time, tokens.
    state: dict[str, Any]
    path: str = "auto"                   # the forward path taken (paths.choose_path) ...
    path_reason: str = ""                # ... and why
    graphed: GraphedStep | None = None   # the CUDA-graph step, when path == "graphed"
    trackers: list[str] = field(default_factory=list)  # --report-to's (trackers.py)
    scaler: Any = None  # torch.amp.GradScaler: loss scaling over a float16 base, else a pass-through
    lock: RunLock | None = None  # the main process's hold on --out (rundir.RunLock)
    quiet: bool = False  # no progress bars and no evaluation lines

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    @property
    def main(self) -> bool:
        return self.acc.is_main_process

    def log(self, rec: dict[str, Any]) -> None:
        if self.main:
            append_metrics(self.out, rec)
            tracking.log(self.acc, self.trackers, rec)


def check_init(pcfg: PromptConfig, method: str) -> None:
    """--init is one this method starts from (a method's `inits`; none listed: every one), before loading."""
    takes = getattr(METHODS[method], "inits", None)
    if takes is not None and pcfg.init not in ("auto", *takes):
        raise SoftpromptError(f"--method {method} starts from --init {', '.join(takes)} (or auto), not --init "
                              f"{pcfg.init}")


def setup(mcfg: ModelConfig, dcfg: DataConfig, pcfg: PromptConfig, tcfg: TrainConfig, model=None, tok=None,
          splits: tuple[Formatter, list[Example], list[Example]] | None = None) -> Run:
    """Check everything, then load, resolve, initialise and (on --resume) restore; write the run
    folder's config only once nothing is left to fail on the user's input."""
    from accelerate import Accelerator

    mcfg, dcfg, pcfg, tcfg = (replace(c) for c in (mcfg, dcfg, pcfg, tcfg))  # their checks, after any change
    check_out(Path(tcfg.out), tcfg.resume, tcfg.overwrite, (pcfg.init_from, pcfg.init_file))
    tcfg, method_reason = resolve_method(pcfg, tcfg)
    if tcfg.method == "full" and mcfg.quantize != "none":  # before the model loads
        raise SoftpromptError(f"--method full trains every weight, and a --quantize {mcfg.quantize} base holds "
                              "integer weights that take no gradient: drop --quantize, or train a prompt")
    check_init(pcfg, tcfg.method)
    trackers = tracking.names(tcfg.report_to)  # before the model loads: an extra not installed fails at once
    # On the CPU (--device cpu, or auto without CUDA): accelerate then joins torchrun's processes over
    # gloo; not told so, each process found no GPU, ran alone as the main one, and two took --out's lock.
    acc = Accelerator(cpu=resolve_device(mcfg.device).type == "cpu", gradient_accumulation_steps=tcfg.grad_accum,
                      **({"log_with": trackers, "project_dir": tcfg.out} if trackers else {}))
    lock = RunLock(Path(tcfg.out)) if acc.is_main_process else None
    try:
        if lock is not None:  # again, now that no other run can write; by the holder alone, as the other
            # ranks would find the holder's own files (its write probe, say) and take them for another run's
            check_out(Path(tcfg.out), tcfg.resume, tcfg.overwrite, held=True)
        run = build_run(acc, lock, trackers, mcfg, dcfg, pcfg, tcfg, model, tok, splits, method_reason)
    except BaseException:
        if lock is not None:
            lock.release(failed=True)
        raise
    return run


def build_run(acc, lock, trackers, mcfg, dcfg, pcfg, tcfg, model, tok, splits, method_reason: str) -> Run:
    """setup's work once --out is held: load, resolve, initialise, restore, record."""
    seed_everything(tcfg.seed)
    pcfg = adopt(pcfg, tcfg.method, mcfg.model)  # --init-from: its checks that need no model, its P
    handed_in = model is not None  # loaded by the caller (the Python API, compare): its dtype is the caller's
    if model is None:
        model, tok = load_model(mcfg, cpu_bf16=cpu_bf16_method(tcfg.method))
    if pcfg.init_from:  # the source fits this base (hidden size, layers, heads) before the data is read
        load_source(pcfg.init_from, model, pcfg)
    # A prefix takes positions too: the text after its P cached keys and values starts at position P.
    P = 0 if tcfg.method == "full" else pcfg.virtual_tokens
    check_positions(model, P)  # before the data is read
    model.to(acc.device)
    # FSDP frees a layer's gathered weights after its forward, and FrozenLinearFn keeps them for backward
    obstacle = ("--method full trains the weights" if tcfg.method == "full" else
                "the base is sharded (--shard fsdp)" if tcfg.shard != "none" else "")
    prepared = prepare_for_training(model, tcfg.linear_kernel, obstacle)  # loaded here or handed in
    fmt, train_ex, eval_ex = splits if splits is not None else load_data(dcfg, tok, tcfg.seed)
    check_positions(model, P, max(len(e.ids) for e in train_ex + eval_ex))
    dcfg = fmt.cfg  # as resolved for the rows: a `messages` column found, chat data made a chat prompt
    warn_unseen_labels(fmt, train_ex)
    asked = to_dict(mcfg, dcfg, pcfg, tcfg) if tcfg.resume else None  # before auto is resolved
    pcfg, tcfg = resolve_auto(pcfg, tcfg, fmt, train_ex, len(eval_ex))  # the saved config records what ran
    if tcfg.resume:
        check_same_run(Path(tcfg.out), to_dict(mcfg, dcfg, pcfg, tcfg), asked, (len(train_ex), len(eval_ex)))
    method = METHODS[tcfg.method].setup(model, tok, pcfg, tcfg, fmt.label_words, default_init_text(fmt),
                                        fmt.render_input(train_ex[0].text))
    if tcfg.loss == "classes" and fmt.task != "classify":
        raise SoftpromptError("--loss classes needs classification data (--labels)")
    class_ids = class_token_ids(fmt, train_ex).to(acc.device) if tcfg.loss == "classes" else None
    if tcfg.batch_size % acc.num_processes:
        raise SoftpromptError(f"--batch-size {tcfg.batch_size} is not divisible by {acc.num_processes} processes")
    if tcfg.batch_size < acc.num_processes * tcfg.grad_accum:
        raise SoftpromptError(f"--batch-size {tcfg.batch_size} gives fewer rows than {acc.num_processes} processes x "
                              f"--grad-accum {tcfg.grad_accum} micro-batches")
    per_epoch = math.ceil(len(train_ex) / tcfg.batch_size)
    total = tcfg.max_steps if tcfg.max_steps > 0 else max(1, math.ceil(tcfg.epochs * per_epoch))
    check_warmup(tcfg, total)
    params = method.parameters()
    opt = make_optimizer(tcfg, params)
    sched = make_scheduler(tcfg, opt, total)
    method.distribute(acc)
    meta = {"model": mcfg.model, "template": dcfg.template, "target": dcfg.target, "text_col": dcfg.text_col,
            "labels": dcfg.label_words, "label_col": dcfg.label_col, "chat": dcfg.chat, "task": fmt.task,
            "dtype": dtype_name(model.dtype),  # what its held-out figures were scored in (eval compares)
            "config": to_dict(mcfg, dcfg, pcfg, tcfg)}
    state = {"step": 0, "best": -math.inf, "bad_evals": 0, "train_seconds": 0.0, "tokens": 0}
    hash_before = weights_hash(model)  # before any sharding
    if tcfg.shard == "fsdp":
        shard_decoder(model, acc.num_processes)
    deep = method.prompt is not None and method.prompt.input_embeds() is None  # a prefix: kv only
    path, why = choose_path(model, tcfg.forward_path, processes=acc.num_processes,
                            prompt_tuning=method.prompt is not None, checkpointing=tcfg.gradient_checkpointing,
                            deep=deep, method_obstacle=method.graph_obstacle or mixture_obstacle(fmt))
    if tcfg.gradient_checkpointing:
        set_checkpointing(model, True)
    # float16 gradients below ~6e-8 flush to zero: scale the loss (the prompt's own gradient is float32).
    fp16 = model.dtype == torch.float16 and all(p.dtype == torch.float32 for p in params)
    scaler = torch.amp.GradScaler(acc.device.type, enabled=fp16)
    graphed = GraphedStep(model, method.prompt.input_embeds(), pad_id(tok), class_ids) if path == "graphed" else None
    run = Run(cfg=tcfg, acc=acc, model=model, tok=tok, method=method, params=params, fmt=fmt, train_ex=train_ex,
              eval_ex=eval_ex, class_ids=class_ids, opt=opt, sched=sched, per_epoch=per_epoch, total=total, meta=meta,
              hash_before=hash_before, state=state, path=path, path_reason=why, graphed=graphed, trackers=trackers,
              scaler=scaler, lock=lock)
    if tcfg.resume:
        run.state = load_checkpoint(run.out, method, opt, sched)
    acc.wait_for_everyone()  # every process has checked --out before the main one writes into it
    if run.main:
        if tcfg.overwrite:
            clear_run(run.out)
        if tcfg.resume:
            tidy_checkpoint(run.out)
        run.out.mkdir(parents=True, exist_ok=True)
        # Replayable (`train --config RUN/run_config.json --out NEW`): how --out was treated is not the run's.
        record = {
            **to_dict(mcfg, dcfg, pcfg, replace(tcfg, resume=False, overwrite=False)),
            "world_size": acc.num_processes, "train_examples": len(train_ex), "eval_examples": len(eval_ex),
            "total_steps": total, "truncated": fmt.truncated, "method_reason": method_reason,
            "forward_path_taken": path, "forward_path_reason": why, "device": str(acc.device),
            "dtype": dtype_name(model.dtype),
            "dtype_reason": dtype_reason(mcfg.dtype, model, tcfg.method, handed_in),
            **prepared,
            "base_bytes_per_process": local_bytes(model)}
        write_json(run.out / RUN_CONFIG, record)
        start_metrics(run.out, run.state["step"] if tcfg.resume else None)
        tracking.start(acc, trackers, run.out, record)
    return run


def batches(run: Run) -> Iterator[list[tuple[Batch, bool]]]:
    """This process's share of each global batch from the run's current step on (on the host), as
    --grad-accum micro-batches, each with whether it holds any rows. One shuffle per epoch, seeded by
    it, so a resumed run sees the same batches."""
    lengths = [len(e.ids) for e in run.train_ex]
    world, rank, n = run.acc.num_processes, run.acc.process_index, run.cfg.grad_accum
    step = run.state["step"]
    while True:
        order = batch_order(lengths, run.cfg.batch_size, run.cfg.seed + step // run.per_epoch)
        for full in order[step % run.per_epoch:]:
            idx = full[rank::world]
            micro = []
            for k in range(n):  # contiguous slices: batch_order keeps rows of similar length together
                part = idx[k * len(idx) // n:(k + 1) * len(idx) // n]
                # A short last batch can leave a rank or a micro-batch with no rows: it still joins every
                # collective, with a stand-in row whose targets are all masked (zero loss, zero gradient).
                batch = collate([run.train_ex[i] for i in part or full[:1]], pad_id(run.tok))
                if not part:
                    batch.targets.fill_(-100)
                micro.append((batch, bool(part)))
            yield micro
            step += 1


def micro_loss(run: Run, batch: Batch, n_global: torch.Tensor) -> torch.Tensor:
    """Backward of one micro-batch's share of the global mean loss; returns that share. The gradients
    add up in the prompt's .grad; under several processes the last micro-batch all-reduces them
    (accelerate's accumulate: no_sync before it)."""
    acc, world, scale = run.acc, run.acc.num_processes, run.scaler.get_scale() if run.scaler.is_enabled() else 1.0
    if run.graphed is not None:  # one process: the local token count is the global one
        loss = run.graphed(batch.input_ids, batch.attention_mask, batch.targets, scale / float(n_global.clamp(min=1)))
        if loss is not None:
            return loss / scale
    with acc.accumulate(run.method.synced()):
        # A batch the graph cannot take runs eagerly: choose_path packs it as auto does.
        loss_sum, _ = batch_loss(run.model, run.method.embeds(), batch.to(acc.device), run.path, run.class_ids)
        # Normalised by the global token count so that micro-batches and N processes add up to the
        # 1-process loss of the whole batch (DDP averages over processes: hence x world; accelerate's
        # backward divides by the accumulation steps, which these shares already are: hence x steps).
        loss = loss_sum / n_global.clamp(min=1) * world
        acc.backward(run.scaler.scale(loss) * acc.gradient_accumulation_steps)
    return loss.detach()


def loss_step(run: Run, micro: list[tuple[Batch, bool]]) -> tuple[float, int]:
    """One optimiser step on a global batch's host micro-batches; returns the global batch's mean loss
    and its tokens (all processes). The CUDA-graph step computes loss and gradient in one replay; a
    batch it cannot take (too long for its dense mask) goes the eager way."""
    acc, world = run.acc, run.acc.num_processes
    n_local = torch.tensor(float(sum(b.num_targets for b, _ in micro)), device=acc.device)
    n_global = acc.reduce(n_local, reduction="sum") if world > 1 else n_local
    loss = sum(micro_loss(run, batch, n_global) for batch, _ in micro)
    run.scaler.unscale_(run.opt)
    if run.cfg.grad_clip > 0:
        acc.clip_grad_norm_(run.params, run.cfg.grad_clip)
    run.scaler.step(run.opt)  # skipped when a scaled float16 gradient overflowed
    run.scaler.update()
    run.sched.step()
    run.opt.zero_grad(set_to_none=True)
    tokens = float(sum(b.attention_mask.sum() for b, rows in micro if rows))
    stats = torch.stack([loss / world, loss.new_tensor(tokens)])
    if world > 1:
        stats = acc.reduce(stats, reduction="sum")
    return float(stats[0]), int(stats[1])


TASKS = {"classify": "classification", "target": "input/target generation", "lm": "language modelling",
         "chat": "chat conversations", "mixed": "a task mixture"}


def plan(run: Run) -> str:
    """What the run will do, said before it starts: long runs on large files were silent for minutes."""
    cfg, epochs = run.cfg, run.total / run.per_epoch
    # A stride past the run's end scores at the end alone (hunt 12: "every 50 steps" of a 30-step run).
    scored = f"scored every {cfg.eval_every} steps" if 0 < cfg.eval_every < run.total else "scored at the end"
    held = f"{len(run.eval_ex)} held out, {scored}" if run.eval_ex else "none held out"
    # hunt 13: --save-every did nothing, unsaid, for a method that writes no checkpoint
    unsaved = "" if not cfg.save_every or run.method.resumable else (
        "; no checkpoints" + (" (--keep-encoder writes them)" if cfg.method in ("ptuning", "residual") else "")
        + ": an interrupted run starts over")
    return (f"training {cfg.method} ({TASKS.get(run.fmt.task, run.fmt.task)}, {cfg.loss} loss, lr {cfg.lr:g}) on "
            f"{len(run.train_ex)} rows, {held}: {run.total} steps at batch {cfg.batch_size} ({epochs:.2g} "
            f"epoch{'' if epochs == 1 else 's'}){unsaved}")


def say(run: Run, line: str) -> None:
    """One line above the progress bar (the main process, unless quiet)."""
    if run.main and not run.quiet:
        tqdm.write(line, file=sys.stderr)


def evaluate_run(run: Run, step: int) -> dict[str, float] | None:
    """Score the held-out data; save the best result so far (--keep-best) and count evaluations
    without improvement (--patience)."""
    if not run.eval_ex:
        return None
    m = evaluate_tasks(run.model, run.tok, run.method.prompt, run.fmt, run.eval_ex, batch_size=max(run.cfg.batch_size, 16),
                 path=run.cfg.forward_path, progress=run.main and not run.quiet)
    run.log({"step": step, "split": "eval", "seconds": round(run.state["train_seconds"], 3), **m})
    say(run, f"step {step}/{run.total} held-out: {format_eval(m)}")
    score = m["accuracy"] if "accuracy" in m else -m["loss"]  # higher is better
    if score > run.state["best"]:
        run.state["best"], run.state["bad_evals"] = score, 0
        if run.cfg.keep_best and run.main:
            run.method.save(run.out, {**run.meta, "step": step, "eval": m})
    else:
        run.state["bad_evals"] += 1
    return m


def train(mcfg: ModelConfig, dcfg: DataConfig, pcfg: PromptConfig, tcfg: TrainConfig,
          model=None, tok=None, stop_after: int = 0, quiet: bool = False,
          splits: tuple[Formatter, list[Example], list[Example]] | None = None) -> dict[str, Any]:
    """Train a soft prompt (or fine-tune the model: `tcfg.method == "full"`); return the run summary.
    `stop_after` > 0 simulates an interruption after that many steps (for resume tests). `splits`
    gives already loaded (formatter, train, eval) examples instead of loading `dcfg`: the method
    comparison passes one split to every method (an empty eval list skips evaluation)."""
    run = setup(mcfg, dcfg, pcfg, tcfg, model, tok, splits)
    run.quiet = quiet
    try:
        return loop(run, stop_after, quiet)
    finally:
        if run.lock is not None:
            run.lock.release()


def loop(run: Run, stop_after: int, quiet: bool) -> dict[str, Any]:
    """The training loop of a set-up run, to its end or to `stop_after` steps."""
    cfg, state = run.cfg, run.state
    untuned, last_eval = recorded_evals(run.out) if cfg.resume and run.main else (None, None)
    say(run, plan(run) + (f", from step {state['step']}" if cfg.resume else ""))
    if cfg.eval_untuned and run.eval_ex and not cfg.resume:
        untuned = evaluate_tasks(run.model, run.tok, None, run.fmt, run.eval_ex, batch_size=max(cfg.batch_size, 16),
                           progress=run.main and not quiet)
        run.log({"step": 0, "split": "eval_untuned", **untuned})
        say(run, f"untuned model held-out: {format_eval(untuned)}")
    # Closed on the way out of an error too: else its last state prints after the error line.
    live = live_output()  # else (a log file) a line a minute stands for the bar
    with tqdm(total=run.total, initial=state["step"], desc="train", disable=not run.main or quiet or not live,
              dynamic_ncols=True) as bar:
        stopped_early, said_at = False, time.monotonic()
        stream = batches(run)
        while state["step"] < run.total:
            t0 = time.perf_counter()
            train_loss, tokens = loss_step(run, next(stream))
            state["step"] = step = state["step"] + 1
            state["tokens"] += tokens
            # Optimiser-step time only: evaluation and checkpoints are not training throughput.
            state["train_seconds"] = elapsed = state["train_seconds"] + time.perf_counter() - t0
            tok_s = f"{state['tokens'] / max(elapsed, 1e-9):.0f}"
            bar.set_postfix(loss=f"{train_loss:.4f}", tok_s=tok_s)
            bar.update(1)
            if not live and time.monotonic() - said_at >= PROGRESS_EVERY_S and step < run.total:
                said_at = time.monotonic()
                say(run, f"step {step}/{run.total}: loss {train_loss:.4f}, {tok_s} tokens/s")
            if step % cfg.log_every == 0 or step == run.total:
                run.log({"step": step, "split": "train", "loss": train_loss, "lr": run.sched.get_last_lr()[0],
                         "tokens": state["tokens"], "seconds": round(elapsed, 3)})
            if (cfg.eval_every and step % cfg.eval_every == 0) or step == run.total:
                last_eval = evaluate_run(run, step)
                stopped_early = bool(cfg.patience) and state["bad_evals"] >= cfg.patience
            if (run.main and cfg.save_every and run.method.resumable
                    and (step % cfg.save_every == 0 or step == run.total or stopped_early)):
                save_checkpoint(run.out, run.method, run.opt, run.sched, state, run.meta)
            if stopped_early or (stop_after and stop_after <= step < run.total):
                break
    if stop_after and state["step"] < run.total and not stopped_early:
        return {"interrupted_at": state["step"]}
    return finish(run, last_eval, stopped_early, untuned)


def best_eval(run: Run) -> dict[str, Any]:
    """The best held-out result, by the metric it was chosen on (the loop keeps -loss as its score)."""
    if run.state["best"] == -math.inf:
        return {"best_eval_metric": None}
    if run.fmt.task == "classify":
        return {"best_eval_metric": "accuracy", "best_eval_accuracy": run.state["best"]}
    return {"best_eval_metric": "loss", "best_eval_loss": -run.state["best"]}


def finish(run: Run, last_eval: dict[str, float] | None, stopped_early: bool,
           untuned: dict[str, float] | None) -> dict[str, Any]:
    """Save the last result unless the best one is kept; write summary.json and the loss plot."""
    state = run.state
    hash_after = weights_hash(run.model)
    trainable = run.method.trainable_params()
    run.method.finish()
    if run.cfg.gradient_checkpointing:  # hand the model back as it came (compare trains on it again)
        set_checkpointing(run.model, False)
    run.opt = run.sched = None  # the optimiser state (twice the model, for full fine-tuning) is not needed to save
    summary = {"steps": state["step"]}
    if run.main:
        if not (run.cfg.keep_best and run.eval_ex) or state["best"] == -math.inf:
            run.method.save(run.out, {**run.meta, "step": state["step"], "eval": last_eval})
        seconds = state["train_seconds"]
        summary = {"steps": state["step"], "total_steps": run.total, "stopped_early": stopped_early,
                   "train_seconds": round(seconds, 2), "tokens": state["tokens"],
                   "tokens_per_second": round(state["tokens"] / max(seconds, 1e-9), 1),
                   "method": run.cfg.method, "lr": run.cfg.lr, "trainable_params": trainable,
                   "base_params": count_params(run.model),
                   "base_weights_sha256_before": run.hash_before, "base_weights_sha256_after": hash_after,
                   "base_weights_unchanged": run.hash_before == hash_after,
                   **best_eval(run),
                   "final_eval": last_eval, "untuned_eval": untuned,
                   # The evaluations above ran on the base as trained (bf16 where auto chose it on a CPU);
                   # `softprompt eval` runs in float32 on a CPU, so its figures differ (by rows, on small sets).
                   "eval_dtype": dtype_name(run.model.dtype), "world_size": run.acc.num_processes,
                   "forward_path": run.path, "prompt_dir": str(run.method.saved_in(run.out))}
        if run.graphed is not None:
            g = run.graphed
            summary["cuda_graphs"] = {"buckets": len(g.graphs), "replays": g.replays,
                                      "capture_seconds": round(g.capture_seconds, 3), "disabled": g.disabled}
        summary = round_floats(summary)
        write_json(run.out / "summary.json", summary)
        plot_metrics(run.out)
        tracking.finish(run.acc)
    run.acc.wait_for_everyone()
    if run.acc.num_processes > 1:  # a Python caller gets the run's summary on every process, not only the main one
        from accelerate.utils import broadcast_object_list

        summary = broadcast_object_list([summary])[0]
    return summary


# ---------------------------------------------------------------- the `train` command

def run(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    s = train(*(from_args(cls, args) for cls in (ModelConfig, DataConfig, PromptConfig, TrainConfig)))
    if PartialState().is_main_process:  # every process has the summary; one prints it
        keys = ("method", "steps", "train_seconds", "tokens_per_second", "final_eval", "best_eval_metric", "best_eval_accuracy",
                "best_eval_loss", "base_weights_unchanged", "prompt_dir")
        print(json.dumps({k: s[k] for k in keys if k in s}))
    return 0
