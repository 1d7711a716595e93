"""The method comparison: prompt engineering vs prompt tuning vs full fine-tuning, measured on one
model, one data split and one evaluation.

Rows (any subset, `--methods`):
- untuned: the bare input, no instruction (what `train` reports as "untuned");
- zero-shot: a written instruction before the input;
- k-shot: the instruction plus K training examples with their answers, in the same template (on chat
  data, earlier conversations: engineering.py);
- prompt: prompt tuning by the core trainer (`train(method="prompt")`), at --lr (0: its default);
- prefix, ptuning, residual: prefix tuning, P-tuning and residual prompt tuning by the same trainer,
  each at its own default rate (Method.default_lr: --lr is a soft prompt's rate, far from an
  encoder's) and its default settings (no --prefix-projection, the default encoder), from --init
  where the method takes it, else from its own default start (the row records which);
- full: every weight trained by the same loop and batches (`train(method="full")`), its own lr.
The trained rows differ only in their method object (methods.py): what it saves where, and
whether it changes the model (then it trains a copy, so the other rows keep the frozen base).
Every row is scored by the same `evaluate()` on the same held-out examples (accuracy by rank
classification for --labels data, held-out loss/perplexity of the target tokens otherwise), with
the last training step's weights: no checkpoint is picked on the data it is scored on.

Measured per row: trainable parameters, artifact bytes on disk (the instruction/context text, the
prompt.safetensors, or the fine-tuned model's safetensors), peak memory, training seconds
(optimiser steps only, as `train` counts them; the JSON also has the whole call's wall time, with
weight hashing and saving, as train_wall_seconds), and inference time per example (wall time of
scoring the held-out set divided by its rows, batch `--eval-batch-size`).

Peak memory is measure.PeakMemory's: CUDA's allocation, or on CPU the process's resident memory,
above the phase's start.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..base.families import check_positions
from ..base.models import load_model
from ..core.config import (COMPARE_METHODS, DTYPES, ENCODER_METHODS, CompareConfig, DataConfig, ModelConfig,
                           PromptConfig, TrainConfig, from_args, to_dict)
from ..core.utils import (SoftpromptError, atomic_write_text, check_dest, count_params, dtype_name, seed_everything,
                          write_json)
from ..data.batching import Example
from ..data.formatting import Formatter, load_splits
from ..evaluation.evaluate import evaluate
from ..forward.paths import DEEP_PATHS
from ..prompts.hub import local_sources
from ..prompts.transfer import adopt
from .measure import PeakMemory, release_memory, resident
from .methods import METHODS
from .engineering import default_instruction, engineered, pick_shots
from .train import train

LABELS = {"untuned": "untuned model, bare input", "zero-shot": "prompt engineering, zero-shot",
          "k-shot": "prompt engineering, {k}-shot", "prompt": "prompt tuning (P={P})",
          "prefix": "prefix tuning (P={P})", "ptuning": "P-tuning (P={P})",
          "residual": "residual prompt tuning (P={P})", "full": "full fine-tuning"}
SUMMARY_FILES = ("compare.json", "compare.md", "compare.png")  # written once every row is done
# The trained methods whose prompt occupies P input positions (a prefix's keys and values take none).
EMBEDDING_METHODS = ("prompt", "ptuning", "residual")


# ---------------------------------------------------------------- measuring

def timed_eval(model, tok, prompt, fmt: Formatter, examples: list[Example], batch_size: int):
    """evaluate() plus its peak memory and wall seconds."""
    with PeakMemory(model.device) as mem:
        t0 = time.perf_counter()
        m = evaluate(model, tok, prompt, fmt, examples, batch_size=batch_size)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    return m, seconds, mem.extra_mb


# ---------------------------------------------------------------- the runner

def method_configs(kind, pcfg: PromptConfig, tcfg: TrainConfig, ccfg: CompareConfig,
                   run_dir: Path) -> tuple[PromptConfig, TrainConfig]:
    """The prompt and train configs method `kind` runs with in the comparison: the shared flags, its
    own rate, its own flags at their defaults unless they are its, its own start where --init is
    not one it takes (full fine-tuning: without --init-from, as it has no prompt), and its own path
    where --forward-path is not one it takes (a prefix has no input embeddings to pack or prepend)."""
    name = kind.name
    # --out is the comparison's own folder: its per-method runs are replaced on a rerun.
    cfg = replace(tcfg, out=str(run_dir), method=name, eval_untuned=False, keep_best=False, save_every=0,
                  eval_every=0, resume=False, overwrite=True,
                  prefix_projection=tcfg.prefix_projection and name == "prefix",
                  prefix_scaled_steps=tcfg.prefix_scaled_steps or name != "prefix",
                  encoder=tcfg.encoder if name == "ptuning" else "auto",
                  encoder_hidden_size=tcfg.encoder_hidden_size if name in ENCODER_METHODS else 0,
                  keep_encoder=tcfg.keep_encoder and name in ENCODER_METHODS)
    if name == "prefix" and cfg.forward_path not in DEEP_PATHS:
        cfg = replace(cfg, forward_path="auto")
    if name == "full":  # full fine-tuning has its own rate, steps and batch size
        cfg = replace(cfg, lr=ccfg.ft_lr, max_steps=ccfg.ft_steps or tcfg.max_steps,
                      batch_size=ccfg.ft_batch_size or tcfg.batch_size)
        pcfg = replace(pcfg, init_from="")
    elif name != "prompt":  # 0: train resolves the method's default_lr
        cfg = replace(cfg, lr=0.0)
    takes = getattr(kind, "inits", None)  # None: every --init (prompt tuning; full fine-tuning has no prompt)
    if takes is not None and pcfg.init not in takes:
        pcfg = replace(pcfg, init="auto")
    return pcfg, cfg


def trained_row(kind, mcfg: ModelConfig, dcfg: DataConfig, pcfg: PromptConfig, tcfg: TrainConfig,
                ccfg: CompareConfig, model, tok, quiet: bool, split, run_dir: Path) -> dict[str, Any]:
    """Train method `kind` (methods.py) on the split's training rows with the last step's result kept,
    then score what it saved on the held-out rows."""
    fmt, train_ex, eval_ex = split
    pcfg, cfg = method_configs(kind, pcfg, tcfg, ccfg, run_dir)
    trained = copy.deepcopy(model) if kind.changes_model else model  # the other rows keep the frozen base
    # Every row trains on the one base compare loaded (auto is float32 on a CPU, for full fine-tuning); the
    # run's record names that dtype, or `train --config RUN/run_config.json` would replay it in auto's.
    dtype = dtype_name(model.dtype)
    ran = replace(mcfg, dtype=dtype) if mcfg.dtype == "auto" and dtype in DTYPES else mcfg
    with PeakMemory(model.device) as tmem:
        t0 = time.perf_counter()
        s = train(ran, dcfg, pcfg, cfg, model=trained, tok=tok, quiet=quiet, splits=(fmt, train_ex, []))
        wall = round(time.perf_counter() - t0, 2)
    del trained
    release_memory()
    scored, prompt = kind.load_trained(run_dir, model, mcfg)  # scored from the saved files
    m, sec, mem = timed_eval(resident(scored), tok, prompt, fmt, eval_ex, ccfg.eval_batch_size)
    del scored
    artifact = kind.artifact(run_dir)
    # How the prompt started, as its prompt_config.json records it (none for full fine-tuning)
    start = {"init": "file", "init_from": pcfg.init_from} if pcfg.init_from else {"init": pcfg.init}
    return dict(eval=m, eval_seconds=sec, eval_peak_mb=mem, train_peak_mb=tmem.extra_mb,
                trainable_params=s["trainable_params"], train_seconds=s["train_seconds"], train_wall_seconds=wall,
                steps=s["steps"], lr=s["lr"], artifact=str(artifact), artifact_bytes=_bytes(artifact),
                **({} if kind.changes_model else {**start, "base_weights_unchanged": s["base_weights_unchanged"]}))


def _bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.glob("*.safetensors"))


def compare(mcfg: ModelConfig, dcfg: DataConfig, pcfg: PromptConfig, tcfg: TrainConfig, ccfg: CompareConfig,
            model=None, tok=None, quiet: bool = False) -> dict[str, Any]:
    """Run the chosen methods on one split; write compare.json, compare.md and compare.png into
    `ccfg.out`; return the JSON object."""
    ccfg = replace(ccfg)  # its own checks again, in case a field was changed since
    if dcfg.mix:  # every method is scored on one split of one task
        raise SoftpromptError("compare runs one task: give it without --mix")
    methods = ccfg.method_list
    # A previous comparison in --out is replaced, file by file; anything else there is the user's, and
    # --init-from's prompt may not be there (a row would replace it while the later rows read it).
    check_dest(ccfg.out, "--out", True, {*SUMMARY_FILES, *COMPARE_METHODS}, local_sources(pcfg.init_from))
    # --init-from starts every prompt method: its source exists and is of a kind each can start from
    # (train's checks, before the model loads), and its length is theirs.
    P = pcfg.virtual_tokens
    prompt_methods = [name for name in methods if name in METHODS and name != "full"]
    if pcfg.init_from and not prompt_methods:
        raise SoftpromptError(f"--init-from starts a prompt, and --methods {','.join(methods)} trains none: add "
                              "prompt, prefix, ptuning or residual")
    for name in prompt_methods if pcfg.init_from else ():
        P = adopt(pcfg, name, mcfg.model).virtual_tokens
    if model is None:
        model, tok = load_model(mcfg)
    resident(model)
    seed_everything(tcfg.seed)
    positions = any(m in EMBEDDING_METHODS for m in methods)
    if positions:
        check_positions(model, P)  # before the data is read
    fmt, train_ex, eval_ex = load_splits(dcfg, tok, tcfg.seed)
    if not eval_ex:
        raise SoftpromptError("compare needs held-out data: --eval-data FILE or --eval-fraction > 0")
    if positions:
        check_positions(model, P, max(len(e.ids) for e in train_ex + eval_ex))
    out = Path(ccfg.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in SUMMARY_FILES:  # a previous comparison's: its rows are replaced one by one from here on, and
        (out / name).unlink(missing_ok=True)  # an interrupted run must not leave it naming them
    bs = ccfg.eval_batch_size
    instruction = (ccfg.instruction or default_instruction(fmt)).replace("\\n", "\n")
    say = (lambda *a: None) if quiet else (lambda *a: print("[compare]", *a, flush=True))
    say(f"{len(train_ex)} training / {len(eval_ex)} held-out examples; methods: {', '.join(methods)}")
    rows = []

    def title(method: str) -> str:
        return LABELS[method].format(k=ccfg.k_shot, P=P)

    def row(method: str, **kw: Any) -> dict[str, Any]:
        r = {"method": method, "name": title(method),
             "trainable_params": 0, "artifact": None, "artifact_bytes": 0, "train_seconds": 0.0,
             "train_peak_mb": None, **kw}
        r["ms_per_example"] = 1000 * r["eval_seconds"] / len(eval_ex)  # unrounded: tiny models score in microseconds
        rows.append(r)
        q = r["eval"]
        say(f"{r['name']}: " + (f"accuracy {100 * q['accuracy']:.2f}%  " if "accuracy" in q else "")
            + f"loss {q['loss']:.4f}  ({r['ms_per_example']:.2f} ms/example, {r['train_seconds']} s training)")
        return r

    for method in methods:  # each row's work said before it starts: scoring hundreds of rows takes minutes
        say(f"{title(method)}: {'training, then ' if method in METHODS else ''}scoring {len(eval_ex)} held-out rows")
        if method == "untuned":
            m, sec, mem = timed_eval(model, tok, None, fmt, eval_ex, bs)
            row(method, eval=m, eval_seconds=sec, eval_peak_mb=mem)
        elif method in ("zero-shot", "k-shot"):
            shots = pick_shots(fmt, train_ex, ccfg.k_shot, tcfg.seed) if method == "k-shot" else []
            context, exs, size = engineered(fmt, tok, instruction, shots, eval_ex)
            path = out / method / ("context.jsonl" if fmt.task == "chat" else "context.txt")  # its whole artifact
            atomic_write_text(path, context)
            m, sec, mem = timed_eval(model, tok, None, fmt, exs, bs)
            row(method, eval=m, eval_seconds=sec, eval_peak_mb=mem, artifact=str(path),
                artifact_bytes=_bytes(path), context_tokens=size)
        else:  # a trained method: prompt, prefix, ptuning, residual or full
            row(method, **trained_row(METHODS[method], mcfg, dcfg, pcfg, tcfg, ccfg, model, tok, quiet,
                                      (fmt, train_ex, eval_ex), out / method))
    result = {"model": mcfg.model, "data": dcfg.data, "eval_data": dcfg.eval_data or f"{dcfg.data} (held out)",
              "task": fmt.task, "train_examples": len(train_ex), "eval_examples": len(eval_ex),
              "instruction": instruction, "base_params": count_params(model),
              "device": str(model.device), "threads": torch.get_num_threads(),
              "memory_note": "CUDA max_memory_allocated" if model.device.type == "cuda" else
              "peak process RSS above the phase's start, sampled every 10 ms",
              "config": to_dict(mcfg, dcfg, replace(pcfg, virtual_tokens=P), tcfg, ccfg), "rows": rows}
    write_json(out / "compare.json", result)
    atomic_write_text(out / "compare.md", markdown_table(result))
    plot_compare(result, out / "compare.png")
    say(f"wrote {out / 'compare.md'}, compare.json, compare.png")
    return result


# ---------------------------------------------------------------- reporting

def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _mb(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f} MB"


def markdown_table(result: dict[str, Any]) -> str:
    cls = result["task"] == "classify"
    head = ["method", "trainable params", "artifact on disk", "train peak mem", "eval peak mem", "train time",
            "inference / example"] + (["accuracy", "loss"] if cls else ["held-out loss", "perplexity"])
    lines = [f"Model `{result['model']}`, {result['train_examples']} training examples from `{result['data']}`, "
             f"scored on {result['eval_examples']} examples of `{result['eval_data']}` ({result['device']}, "
             f"{result['threads']} thread{'s' if result['threads'] != 1 else ''}). Memory: {result['memory_note']}.",
             "",
             "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in result["rows"]:
        q = r["eval"]
        quality = [f"{100 * q['accuracy']:.2f}%", f"{q['loss']:.4f}"] if cls else \
            [f"{q['loss']:.4f}", f"{q['perplexity']:.2f}"]
        cells = [r["name"], f"{r['trainable_params']:,}", human_bytes(r["artifact_bytes"]) if r["artifact"] else "-",
                 _mb(r["train_peak_mb"]), _mb(r["eval_peak_mb"]),
                 f"{r['train_seconds']:.0f} s ({r['steps']} steps)" if r.get("steps") else "-",
                 f"{r['ms_per_example']:.1f} ms"] + quality
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_compare(result: dict[str, Any], dest: Path) -> Path | None:
    """Four panels of bars, one bar per method: quality, artifact size (log), training time, inference time."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = result["rows"]
    cls = result["task"] == "classify"
    names = [r["method"] for r in rows]
    colors = [f"C{i}" for i in range(len(rows))]
    panels = [("accuracy (%)" if cls else "held-out loss (lower is better)",
               [100 * r["eval"]["accuracy"] if cls else r["eval"]["loss"] for r in rows], False),
              ("artifact on disk (bytes, log)", [max(r["artifact_bytes"], 1) for r in rows], True),
              ("training time (s)", [r["train_seconds"] for r in rows], False),
              ("inference (ms / example)", [r["ms_per_example"] for r in rows], False)]
    fig, axes = plt.subplots(1, 4, figsize=(16, 4))
    for ax, (title, vals, log) in zip(axes, panels):
        bars = ax.bar(names, vals, color=colors)
        if log:
            ax.set_yscale("log")
        ax.bar_label(bars, fontsize=7, labels=[(human_bytes(v) if r["artifact"] else "none") if log else f"{v:.3g}"
                                               for v, r in zip(vals, rows)])
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", rotation=30, labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    if cls:
        lo = min(panels[0][1])
        axes[0].set_ylim(max(0.0, lo - 10), 100)
    fig.suptitle(f"{Path(result['data']).name}: prompt engineering vs prompt tuning vs full fine-tuning "
                 f"({result['model']})", fontsize=10)
    fig.tight_layout()
    tmp = dest.with_name(f".{dest.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(dest)
    return dest


def load_result(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / "compare.json").read_text())


# ---------------------------------------------------------------- the `compare` command (its flags: flags.py)

def run(args: argparse.Namespace) -> int:
    # --out is the comparison's folder; each method's run folder is made inside it.
    print(markdown_table(compare(*(from_args(cls, args) for cls in (ModelConfig, DataConfig, PromptConfig,
                                                                     TrainConfig, CompareConfig)))))
    return 0
