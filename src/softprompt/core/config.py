"""Configuration: small dataclasses whose fields map one-to-one onto CLI flags.

`field_name` becomes `--field-name`; the help text lives in the field's metadata so that the
Python API and `--help` never drift apart. Each dataclass checks its own fields, and how they go
together, in `__post_init__` (as litgpt's args and PEFT's PromptTuningConfig do), raising a
one-line SoftpromptError that names the flag; `dataclasses.replace(cfg)` checks a config again
after its fields were changed. Every run and every saved prompt stores the resolved dataclasses
as JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from . import inits
from .utils import SoftpromptError, cache_root, local_path, local_patterns, same_model, short, warn

BUILTIN_MODEL = "smollm2-135m-instruct"


def model_name(name: str) -> str:
    """A --model as runs record it: a local path made absolute, and the built-in model's own cache folder
    by the built-in's name (one machine's cache path names nothing on another, where a pushed prompt goes)."""
    name = local_path(name)
    if not name or name == BUILTIN_MODEL:
        return name
    ours = same_model(name, str(cache_root() / "models" / BUILTIN_MODEL))
    # Another machine's cache (a prompt trained there): a path not on this one, in the cache's layout.
    theirs = not os.path.exists(os.path.expanduser(name)) and Path(name).parts[-2:] == ("models", BUILTIN_MODEL)
    return BUILTIN_MODEL if ours or theirs else name
ENCODERS = ("mlp", "lstm")  # --method ptuning's --encoder choices (prompts/ptuning_encoder.PromptEncoder)
ENCODER_METHODS = ("ptuning", "residual")  # methods whose prompt an encoder produces (training/encoder_method.py)
FULL_FT_LR = 2e-5  # full fine-tuning's default rate: `train --method full` (auto) and `compare --ft-lr`
DTYPES = ("auto", "float32", "bfloat16", "float16")  # auto: models.resolve_dtype's choice for the device
COMPARE_METHODS = ("untuned", "zero-shot", "k-shot", "prompt", "prefix", "ptuning", "residual", "full")
TRACKERS = ("none", "tensorboard", "wandb", "mlflow", "all")  # --report-to (trackers.py)
# The choices of flags whose code lives above this module (which imports none of it): --quantize
# (quantize.py), --shard (shard.py), --forward-path (forward/paths.py's choose_path picks among them).
QUANTIZE = ("none", "8bit", "4bit")
SHARD = ("none", "fsdp")
FORWARD_PATHS = ("auto", "graphed", "packed", "kv", "concat")
LINEAR_KERNELS = ("auto", "onednn", "default")
MAX_SEED = 2 ** 32 - 1  # numpy's seeds; generate seeds row i with --seed + i, which must stay in torch's 64 bits
MAX_LR = 1e3  # beyond it a step only diverges; 1e308 overflowed float32 inside the optimiser
# Sampling settings past these only overflow the scores (1e-300 as a repetition penalty divides logits
# into inf) without changing the choice any further; the server's request fields take the same bounds.
REPETITION_PENALTY_RANGE = (0.01, 100.0)
PENALTY_RANGE = (-2.0, 2.0)  # OpenAI's presence and frequency penalties
TEMPERATURE_MAX = 100.0


def opt(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def require(ok: bool, message: str) -> None:
    """Raise `message` as the user's error unless `ok` (written so that NaN fails every check)."""
    if not ok:
        raise SoftpromptError(message)


def check_fields(cfg: Any, at_least: dict[str, float] | None = None) -> None:
    """Every field has one of its `choices`, every float is finite, and each field named in
    `at_least` is at least its value."""
    for f in dataclasses.fields(cfg):
        v, choices = getattr(cfg, f.name), f.metadata.get("choices")
        require(not choices or v in choices, f"unknown {flag(f.name)} {v!r}: choose from {', '.join(choices or [])}")
        require(not isinstance(v, float) or math.isfinite(v), f"{flag(f.name)} must be a finite number (got {v})")
        if at_least and f.name in at_least:
            require(v >= at_least[f.name], f"{flag(f.name)} must be at least {at_least[f.name]} (got {v})")


def check_seed(seed: int) -> None:
    require(0 <= seed <= MAX_SEED, f"--seed {seed} must be in 0..{MAX_SEED}")


def check_text(cfg: Any, *names: str) -> None:
    """Text fields hold valid Unicode: argv decodes undecodable bytes to lone surrogates, which no
    tokenizer takes."""
    for name in names:
        require(is_unicode(getattr(cfg, name)), f"{flag(name)} {getattr(cfg, name)!r} is not valid Unicode text")


def is_unicode(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def template_fields(template: str) -> list[str]:
    """The column names a template fills, in order, once each; [] when it does not parse."""
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f]
    except ValueError:
        return []
    return list(dict.fromkeys(names))


def unescape(s: str) -> str:
    # Shells pass "\n" literally inside double quotes; templates mean a newline.
    return s.replace("\\n", "\n").replace("\\t", "\t")


def check_template(name: str, template: str) -> None:
    """A template parses, and each {...} is a plain column name: `{}` and `{0}` name none, and an
    attribute, index, conversion or format spec ({x.__class__}, {x[0]}, {x!r}, {x:>100000000}) would
    reach into Python objects or pad a row to any size."""
    where = f"{flag(name)} {short(template)}"
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as e:
        raise SoftpromptError(f"{where}: {e} (write {{{{ and }}}} for literal braces)") from None
    for _, col, spec, conv in parts:
        require(col is None or (col != "" and not col.isdigit()), f"{where}: every {{...}} must name a column")
        require(conv in (None, "r", "s", "a"), f"{where}: unknown conversion '!{conv}'")
        require(col is None or not (conv or spec or any(c in col for c in ".[]")),
                f"{where}: write each column as a plain {{name}} (no attribute, index, !conversion or :format)")


@dataclass
class ModelConfig:
    model: str = opt(BUILTIN_MODEL, "Hub id, local folder, .gguf file, or the built-in 'smollm2-135m-instruct'")
    dtype: str = opt("auto", "the frozen base's dtype: auto (bfloat16 on GPUs that support it, and for training a "
                             "soft prompt or a prefix (--method prompt|prefix) on CPUs with native bf16 matmuls; "
                             "float32 elsewhere), float32, bfloat16 or float16; the soft prompt and its optimiser "
                             "state stay float32", choices=list(DTYPES))
    device: str = opt("auto", "cpu, cuda, cuda:1... ('auto' picks cuda when present)")
    quantize: str = opt("none", "hold the frozen base's linear layers in 8 or 4 bits (bitsandbytes: 8bit is "
                                "LLM.int8(), 4bit is NF4); needs pip install 'softprompt[quant]'",
                        choices=list(QUANTIZE))

    def __post_init__(self):
        # "" would be read as the current folder (a model folder run from inside it loads in the prompt's stead)
        require(isinstance(self.model, str) and bool(self.model.strip()),
                "--model is empty: name a Hub id, a local folder, a .gguf file or the built-in model")
        require(self.dtype in DTYPES, f"unknown --dtype {self.dtype!r}: use auto, float32, bfloat16 or float16")
        check_fields(self)
        # export-peft's base_model_name_or_path and the check of a prompt against its base read it too.
        self.model = model_name(self.model)


EVAL_EVERY = 50  # steps between evaluations where scoring the held-out rows is cheap (--eval-every auto)
# Rows held out of --data by default (--eval-fraction of a large file, else): enough to tell prompts apart,
# few enough to score every --eval-every steps. Every row beyond them trains.
HELD_OUT_MAX = 1000
HELD_OUT_FRACTION = 0.1  # --eval-fraction's default
# datasets' builders that read local files (`--data csv --data-files 'parts/*.csv'`), where --data names no source.
FILE_BUILDERS = ("csv", "json", "parquet", "text", "arrow", "pandas", "xml")
# The DataConfig fields a --mix task sets for itself (the rest are shared: --max-length, --chat, ...).
MIX_KEYS = ("data", "data_config", "data_files", "columns", "split", "template", "target", "text_col", "labels",
            "label_col", "messages_col", "eval_data", "eval_split", "limit", "eval_limit")


@dataclass
class DataConfig:
    data: str = opt("", "Hub dataset id (NAME or NAME:CONFIG, e.g. stanfordnlp/sst2, nyu-mll/glue:sst2), a builder "
                        "such as parquet or json with --data-files, a local folder of data files, or a local "
                        ".csv/.tsv/.json/.jsonl/.parquet/.arrow file")
    data_config: str = opt("", "configuration (subset) of the Hub dataset, e.g. sst2 for nyu-mll/glue (same as "
                               "NAME:CONFIG)")
    data_files: str = opt("", "comma-separated files or glob patterns that --data reads (a Hub dataset's files, or "
                              "local ones for a builder: --data parquet --data-files 'train-*.parquet')")
    columns: str = opt("", "comma-separated names for the columns of a header-less .csv/.tsv --data or --eval-data "
                           "(row 1 is then a row of data), e.g. text,label")
    template: str = opt("", "input template naming columns in braces, e.g. 'Review: {sentence}\\nSentiment:'")
    target: str = opt("", "target template appended after --template (loss on target tokens only)")
    text_col: str = opt("", "train on this plain text column as language modelling (the classic recipe)")
    labels: str = opt("", "comma-separated label words; the row's --label-col value picks the target word (the "
                          "word itself or its index); VALUE=WORD maps a value of the data to another word, e.g. "
                          "entailment=yes,not_entailment=no (one-token words train over themselves alone)")
    label_col: str = opt("label", "column holding the label (an index into --labels or the word itself)")
    max_length: int = opt(256, "truncate each example to this many tokens (virtual tokens not counted)")
    eval_data: str = opt("", "held-out file or dataset id; default: hold out --eval-fraction of --data")
    eval_fraction: float = opt(HELD_OUT_FRACTION, "fraction of --data held out for evaluation when --eval-data is "
                                                  f"not given, at most --eval-limit rows ({HELD_OUT_MAX} when it is 0)")
    split: str = opt("train", "split to read from a Hub dataset")
    eval_split: str = opt("", "split for evaluation: of --eval-data (default: validation when --split is train, "
                              "else --split), or without --eval-data of --data itself instead of holding rows out")
    limit: int = opt(0, "use at most this many training rows (0 = all), taken after a seeded shuffle")
    eval_limit: int = opt(0, "use at most this many evaluation rows (0 = all of --eval-data, at most "
                             f"{HELD_OUT_MAX} held out of --data): the first N of --eval-data or --eval-split in "
                             "file order (as eval --limit N), or N rows held out of --data (the rest train)")
    chat: bool = opt(False, "wrap the input in the model's chat template (instruct models)")
    messages_col: str = opt("", "column of chat turns ([{role, content}, ...], as OpenAI's fine-tuning files): "
                                "trains through the model's chat template with the loss on the assistant turns "
                                "only (default: a 'messages' column, when no --template or --text-col is given)")

    mix: list = field(default_factory=list, metadata={"help": (
        "task mixture: another task to train the one prompt on, beside the one the flags above describe, as a JSON "
        "object of that task's own --data, --template, --labels... by their config names ("
        + ", ".join(MIX_KEYS) + "); what it leaves out is the flags' (but --eval-data and --eval-split); repeat "
        "it for more tasks (a config file: `mix: [{data: ..., template: ..., labels: ...}, ...]`). Rows are drawn "
        "examples-proportionally, each task capped by its own --limit (T5's capped mixing); each row keeps its own "
        "label words; evaluation reports every task and their mean"), "repeat": True})

    def __post_init__(self):
        self.data, self.eval_data = local_path(self.data), local_path(self.eval_data)
        if self.data in FILE_BUILDERS:  # then --data-files are this machine's files (a Hub repo's are its own)
            self.data_files = local_patterns(self.data_files)
        self.mix = [parse_task(t, i + 2) for i, t in enumerate(self.mix)]
        for i in range(len(self.mix)):
            self.task_config(i + 1)  # its own checks, each naming its flag
        check_fields(self, {"max_length": 1, "limit": 0, "eval_limit": 0})
        check_text(self, "columns", "template", "target", "text_col", "labels", "label_col", "messages_col")
        self.check_column_names()
        require(bool(self.eval_data) or not self.eval_split or self.eval_split != self.split,
                f"--eval-split {self.eval_split!r} is the training --split: evaluate on another split")
        require(not (self.messages_col and (self.template or self.text_col)),
                "--messages-col trains on whole conversations: give it without --template or --text-col")
        # Each would be dropped without a word: the label words win over a target, a template over a column.
        require(not (self.labels and self.target), "--labels makes a classifier (a label word after --template) and "
                                                   "--target a text to generate after it: give one of them")
        require(not (self.text_col and self.template), "--text-col is the input where no --template builds one: give "
                                                        "one of them")
        require(0 <= self.eval_fraction < 1, f"--eval-fraction must be in [0, 1) (got {self.eval_fraction})")
        # Dropped without a word otherwise: held-out rows come from one place.
        require(self.eval_fraction in (0, HELD_OUT_FRACTION) or not (self.eval_data or self.eval_split),
                f"--eval-fraction {self.eval_fraction} holds rows out of --data where no --eval-data or --eval-split "
                "is given: give one of them")
        check_template("template", self.template)
        check_template("target", self.target)
        words = self.label_words
        if self.labels:
            require(len(words) >= 2, f"--labels needs at least two comma-separated words (got {self.labels!r})")
            require(len(set(words)) == len(words), f"--labels {self.labels!r} names a word twice")
            require(all(self.label_values) and all(words),
                    f"--labels {self.labels!r}: each item is WORD or VALUE=WORD, neither empty")
            require(len(set(self.label_values)) == len(words), f"--labels {self.labels!r} names a value twice")
            require(bool(self.template), "--labels needs --template (the input the label word follows)")

    @property
    def label_words(self) -> list[str]:
        """The words a row's label becomes (after VALUE=, where one is given)."""
        return [word.strip() if sep else value.strip() for value, sep, word in
                (item.partition("=") for item in self.label_items)]

    @property
    def label_values(self) -> list[str]:
        """The label column's values, in --labels' order: each word's, or the VALUE of VALUE=WORD."""
        return [item.partition("=")[0].strip() for item in self.label_items]

    @property
    def label_items(self) -> list[str]:
        return [item for item in self.labels.split(",") if item.strip()]

    @property
    def header(self) -> list[str] | None:
        """--columns as names, or None: each CSV/TSV file's row 1 names its columns."""
        return [c.strip() for c in self.columns.split(",")] if self.columns else None

    def check_column_names(self) -> None:
        """--columns names each column once, and a CSV/TSV file is there to take the names: the csv module reads
        header-less tables, and a Hub dataset or a JSON file names its own columns."""
        if not self.columns:
            return
        names = self.header
        require(all(names), f"--columns {self.columns!r} has an empty name: give NAME,NAME,...")
        require(len(set(names)) == len(names), f"--columns {self.columns!r} names a column twice")
        files = [f for f in (self.data, self.eval_data) if f]
        require(not files or any(f.lower().endswith((".csv", ".tsv")) for f in files),
                f"--columns names the columns of a header-less .csv/.tsv file, and --data {self.data!r}"
                + (f" and --eval-data {self.eval_data!r} are" if self.eval_data else " is") + " not one")

    def needed_columns(self) -> list[str] | None:
        """The columns each row needs (as formatting.Formatter.columns); None where no flag says how to read
        a row (a `messages` column is looked for)."""
        if not (self.template or self.text_col or self.messages_col):
            return None
        fields = template_fields(unescape(self.template)) + template_fields(unescape(self.target))
        cols = [re.split(r"[.\[]", f)[0] for f in fields]
        cols += [self.text_col] if self.text_col and not self.template else []
        cols += [self.messages_col] if self.messages_col else []
        cols += [self.label_col] if self.labels else []
        return list(dict.fromkeys(cols))

    def task_config(self, i: int) -> "DataConfig":
        """Task i of the mixture (0: the flags' own) as a DataConfig of one task."""
        if i == 0:
            return dataclasses.replace(self, mix=[])
        task = self.mix[i - 1]
        # A task that says how it reads its rows reads them so alone: none of the first task's way (a
        # `messages` column found there, say) carries over to clash with it.
        reading = {k: "" for k in ("template", "target", "text_col", "messages_col")
                   if any(r in task for r in ("template", "text_col", "messages_col"))}
        # A target makes it a generation task, labels a classification one, and a text or messages column
        # one of language modelling (neither), whatever the first task is.
        lm = "text_col" in task or "messages_col" in task
        drop = ({"labels", "target"} if lm else {"labels"} if "target" in task else {"target"} if "labels" in task
                else set())
        kind = {k: "" for k in drop - task.keys()}
        # How a file is read belongs to that file: a task that reads its own names its own (its builder's
        # files, its dataset's configuration, a header-less table's columns).
        own = {"columns": "", "data_files": "", "data_config": ""} if "data" in task else {}
        fields = {"eval_data": "", "eval_split": "", **own, **reading, **kind, **task, "mix": []}
        try:
            return dataclasses.replace(self, **fields)
        except SoftpromptError as e:
            raise SoftpromptError(f"--mix task {i + 1}: {e}") from None

    def tasks(self) -> list["DataConfig"]:
        return [self.task_config(i) for i in range(len(self.mix) + 1)]


def parse_task(task: Any, number: int) -> dict[str, Any]:
    """A --mix value (JSON text from argv, a mapping from a config file) as a dict of MIX_KEYS."""
    where = f"--mix task {number}"
    if isinstance(task, str):
        try:
            task = json.loads(task)
        except json.JSONDecodeError as e:
            raise SoftpromptError(f"{where}: not a JSON object ({e.msg} at character {e.pos}): {short(task)}") from None
    require(isinstance(task, dict), f"{where}: expected a JSON object of its flags, got {short(task)}")
    bad = [k for k in task if k not in MIX_KEYS]
    require(not bad, f"{where}: unknown key {short(bad[0]) if bad else ''} (a task sets {', '.join(MIX_KEYS)})")
    require(isinstance(task.get("data"), str) and bool(task.get("data")), f"{where}: needs its own \"data\"")
    for k, v in task.items():
        want = int if k in ("limit", "eval_limit") else str
        require(isinstance(v, want) and not isinstance(v, bool), f"{where}: {k} must be {want.__name__}, got {short(v)}")
    return {k: local_path(v) if k in ("data", "eval_data") else v for k, v in task.items()}


@dataclass
class PromptConfig:
    virtual_tokens: int = opt(20, "number of virtual tokens P in the soft prompt")
    init: str = opt("auto", inits.HELP, choices=list(inits.CHOICES))
    init_text: str = opt("", "text for --init text (default: a task description derived from the data)")
    init_file: str = opt("", "prompt folder to start from for --init file")
    init_from: str = opt("", "prompt transfer: start from a prompt trained on another task, a run or prompt folder "
                             "written by train (or hf://REPO_ID[@REV]), for every --method: a soft prompt starts a "
                             "soft prompt, a prefix or the encoders' input; a prefix starts a prefix (a soft prompt is "
                             "converted exactly into its per-layer keys and values); its virtual-token count is "
                             "adopted while --virtual-tokens stays at its default, else they must match; takes the "
                             "place of --init")

    def __post_init__(self):
        inits.check(self.init)
        self.init_file, self.init_from = local_path(self.init_file), local_path(self.init_from)
        check_fields(self, {"virtual_tokens": 1})
        check_text(self, "init_text", "init_from")
        require(self.init != "file" or bool(self.init_file), "--init file needs --init-file DIR")
        # --init-from is the init: resolved, it reads as --init file --init-file SOURCE (transfer.adopt), which a
        # replayed run_config.json gives back; any other --init beside it would be a second start.
        require(not self.init_from or self.init == inits.AUTO or (self.init == "file" and self.init_file == self.init_from),
                f"--init-from {short(self.init_from)} is the prompt's start: give it without --init {self.init}")


@dataclass
class TrainConfig:
    out: str = opt("runs/prompt", "run folder: prompt, config, metrics.jsonl, loss curve, checkpoints")
    lr: float = opt(0.0, "peak learning rate (0 = auto: 1e-2 for --loss classes, 3e-2 for other prompt "
                         "tuning, 2e-5 for --method full; --method ptuning: 3e-4 for --loss classes, else 1e-3)")
    batch_size: int = opt(8, "examples per optimiser step (across all processes)")
    epochs: float = opt(1.0, "passes over the training data (ignored when --max-steps > 0)")
    max_steps: int = opt(0, "optimiser steps (0 = use --epochs)")
    optimizer: str = opt("adamw", "optimiser", choices=["adamw", "adafactor"])
    weight_decay: float = opt(0.0, "AdamW weight decay")
    warmup_steps: int = opt(10, "linear warm-up steps")
    schedule: str = opt("linear", "decay after warm-up", choices=["linear", "cosine", "constant"])
    grad_clip: float = opt(1.0, "clip the prompt's gradient norm (0 = off)")
    loss: str = opt("auto", "lm: cross-entropy over the vocabulary; classes: over the label words only "
                    "(auto: classes for classification with one-token label words, lm otherwise)",
                    choices=["auto", "lm", "classes"])
    eval_every: int = opt(-1, f"evaluate on held-out data every N steps (0 = only at the end; -1 = auto: every "
                              f"{EVAL_EVERY} steps, or less often where scoring the held-out rows would take over a "
                              "fifth of the run's time)")
    patience: int = opt(0, "stop after N evaluations without improvement (0 = never)")
    keep_best: bool = opt(True, "save the prompt with the best held-out score, not the last one")
    save_every: int = opt(50, "write a resumable checkpoint every N steps (0 = never)")
    resume: bool = opt(False, "continue from the checkpoint in --out")
    overwrite: bool = opt(False, "replace the previous run in --out (all of its files); without it or --resume a "
                                 "folder that holds files is refused")
    seed: int = opt(0, "random seed for init, shuffling and sampling")
    forward_path: str = opt("auto", "how the prompt meets the rows: packed (prompt and rows as one padding-free "
                            "sequence), graphed (the packed step replayed as a CUDA graph: GPUs, one process), kv "
                            "(the prompt's keys/values computed once, shared by the rows), concat (the prompt "
                            "prepended to every row, as PEFT does); auto: graphed on a GPU, else packed where the "
                            "model allows it, else kv (the run records the choice and why)",
                            choices=list(FORWARD_PATHS))
    linear_kernel: str = opt("auto", "the frozen base's float32 linear layers on a CPU while training: onednn "
                             "(oneDNN's matmul, forward and input gradient), default (torch's, MKL on x86); auto: "
                             "onednn on AMD CPUs with AVX-512, where MKL ran at half of oneDNN's speed (the run "
                             "records the choice and why); evaluation and serving keep torch's",
                             choices=list(LINEAR_KERNELS))
    log_every: int = opt(10, "append to metrics.jsonl every N steps")
    eval_untuned: bool = opt(True, "first score the untuned model on the held-out data, for comparison")
    grad_accum: int = opt(1, "run each batch as N micro-batches of --batch-size/N rows, one after another, and take "
                             "one optimiser step on their summed gradient: the same prompt in less activation "
                             "memory (--batch-size stays the global batch)")
    gradient_checkpointing: bool = opt(False, "keep only each decoder layer's input and recompute the layer in "
                                              "backward (non-reentrant): less activation memory, about one more "
                                              "forward pass of time")
    shard: str = opt("none", "fsdp: shard the frozen base's decoder layers across the processes (torch's FSDP2; "
                             "start several with torchrun or accelerate launch), what trains (prompt, prefix, "
                             "encoder) replicated",
                     choices=list(SHARD))
    method: str = opt("auto", "auto: prefix, or prompt where a flag needs a soft prompt (--init vocab or labels, "
                      "--forward-path packed, concat or graphed; the run records the choice and why); "
                      "prompt: train a soft prompt on the frozen model; prefix: train per-layer keys "
                      "and values instead (prefix tuning / P-tuning v2: a deep prompt); ptuning: "
                      "produce the soft prompt by an encoder while training (P-tuning, PEFT's PromptEncoder; see "
                      "--encoder); residual: the prompt is an embedding plus a bottleneck MLP of it (residual prompt "
                      "tuning); both save an ordinary soft prompt; full: "
                      "fine-tune every model weight instead (no prompt; saves the whole model in OUT/model; use a "
                      "small --lr such as 2e-5; one process, no --resume)",
                      choices=["auto", "prompt", "prefix", "ptuning", "residual", "full"])
    prefix_projection: bool = opt(False, "--method prefix: produce the keys and values from a [P, D] embedding "
                                         "through a two-layer MLP while training (PEFT's prefix_projection), folded "
                                         "into plain keys and values when saved")
    prefix_scaled_steps: bool = opt(True, "--method prefix: scale each optimiser step on a layer's keys, and on its "
                                          "values, by their RMS at the start (rounded to a power of two; "
                                          "Adafactor's parameter scaling), so that --lr moves every layer by the "
                                          "same fraction of itself; --no-prefix-scaled-steps steps every element "
                                          "alike, as PEFT's PrefixTuning does. Not with --prefix-projection, "
                                          "whose MLP takes plain steps")
    encoder: str = opt("auto", "--method ptuning: the encoder that produces the prompt from a [P, H] embedding "
                               "(PEFT's encoder_reparameterization_type): mlp (three Linear layers with ReLU) or lstm "
                               "(a two-layer bidirectional LSTM, then two Linear layers); auto: mlp",
                       choices=["auto", *ENCODERS])
    encoder_hidden_size: int = opt(0, "--method ptuning or residual: the encoder's width (0 = auto: the model's "
                                      "hidden size for ptuning, as PEFT's; half of it for residual's bottleneck)")
    keep_encoder: bool = opt(False, "--method ptuning or residual: also keep the encoder and its input embedding "
                                    "(OUT/encoder.safetensors and in every checkpoint), so that --resume can carry "
                                    "on training it; without it only the prompt it produces is saved")
    report_to: str = opt("none", "experiment trackers, through accelerate's: none, tensorboard (event files in "
                                 "OUT/tensorboard), wandb, mlflow, a comma-separated list, or all (every one of the "
                                 "three installed); metrics.jsonl is written either way")

    def __post_init__(self):
        require(self.batch_size >= 1, f"--batch-size must be >= 1 (got {self.batch_size})")
        bad = [t for t in self.report_to.split(",") if t.strip() not in TRACKERS]
        require(not bad, f"unknown --report-to {','.join(bad)!r}: choose from {', '.join(TRACKERS)}")
        require(self.lr >= 0, f"--lr {self.lr}: need --lr >= 0 (0 = auto)")
        require(not self.lr > MAX_LR, f"--lr {self.lr}: must be at most {MAX_LR:g}")
        check_seed(self.seed)
        check_fields(self, {"epochs": 0, "max_steps": 0, "weight_decay": 0, "warmup_steps": 0, "grad_clip": 0,
                            "eval_every": -1, "patience": 0, "save_every": 0, "log_every": 1, "grad_accum": 1,
                            "encoder_hidden_size": 0})
        require(self.batch_size >= self.grad_accum,
                f"--grad-accum {self.grad_accum} needs --batch-size >= {self.grad_accum} (one row per micro-batch)")
        require(self.max_steps > 0 or self.epochs > 0, "--epochs must be > 0 when --max-steps is 0")
        # Its checkpoint would be the whole model plus 2x its size of optimiser state.
        require(not (self.method == "full" and self.resume), "--method full runs in one process and cannot --resume")
        require(not (self.method == "full" and self.shard != "none"), "--shard fsdp shards the frozen base of "
                "prompt tuning; --method full runs in one process")
        require(not self.prefix_projection or self.method in ("auto", "prefix"),
                f"--prefix-projection is for --method prefix (got --method {self.method})")
        require(self.prefix_scaled_steps or self.method in ("auto", "prefix"),
                f"--no-prefix-scaled-steps is for --method prefix (got --method {self.method})")
        if self.prefix_projection:  # its MLP takes plain steps (PrefixPrompt): the record says how it trained
            self.prefix_scaled_steps = False
        encoded = self.method in ENCODER_METHODS
        require(self.encoder == "auto" or self.method == "ptuning",
                f"--encoder is for --method ptuning (got --method {self.method})")
        for name in ("encoder_hidden_size", "keep_encoder"):
            require(not getattr(self, name) or encoded,
                    f"{flag(name)} is for --method ptuning or residual (got --method {self.method})")
        require(not (encoded and self.resume and not self.keep_encoder), f"--resume: --method {self.method} carries "
                "on training its encoder, which only --keep-encoder keeps: give --keep-encoder (a run without it "
                "wrote no checkpoint)")
        require(not (self.resume and self.overwrite),
                "--resume continues the run in --out and --overwrite replaces it: give one of them")


def check_warmup(cfg: TrainConfig, total: int, warns: bool = True) -> None:
    """A warm-up longer than the run never reaches the peak rate (10 of 20 warm-up steps: half of it).
    One asked for is refused; the default one only warned about (`warns`: the command line's early
    check leaves that to the run, which knows its step count), so short runs keep working."""
    if cfg.warmup_steps <= total:
        return
    peak = 100 * total / (cfg.warmup_steps + 1)
    if cfg.warmup_steps != TrainConfig.__dataclass_fields__["warmup_steps"].default:
        raise SoftpromptError(f"--warmup-steps {cfg.warmup_steps} is longer than the run's {total} steps: the rate "
                              f"would reach only {peak:.0f}% of --lr; give --warmup-steps {total} or less")
    if warns:
        warn(f"the default warm-up of {cfg.warmup_steps} steps is longer than the run's {total} steps: the rate "
             f"reaches {peak:.0f}% of --lr (give --warmup-steps {max(total // 10, 0)} or so)")


@dataclass
class CompareConfig:
    """The comparison's own flags; the trained methods take the train flags (--max-steps, --lr, ...)."""
    out: str = opt("runs/compare", "output folder: compare.md, compare.json, compare.png, one folder per method")
    methods: str = opt("untuned,zero-shot,k-shot,prompt,prefix,full",
                       "comma-separated methods to run: untuned (bare input), zero-shot (written instruction), "
                       "k-shot (instruction + K training examples), prompt (prompt tuning), prefix (prefix "
                       "tuning), ptuning (P-tuning), residual (residual prompt tuning), full (fine-tuning); prefix, "
                       "ptuning and residual train at their own default rates, with their default settings")
    instruction: str = opt("", "written instruction for zero-/k-shot (default: 'Classify the text as A or B.' "
                               "for --labels data, else a generic one)")
    k_shot: int = opt(4, "training examples (with their answers) placed before the input for k-shot; "
                         "label-balanced for classification")
    ft_lr: float = opt(FULL_FT_LR, "full fine-tuning peak learning rate (prompt tuning uses --lr; prefix, ptuning "
                                   "and residual their own default rates)")
    ft_steps: int = opt(0, "full fine-tuning steps (0 = the same as --max-steps)")
    ft_batch_size: int = opt(0, "full fine-tuning batch size (0 = the same as --batch-size)")
    eval_batch_size: int = opt(16, "rows per forward pass when scoring (the same for every method)")

    def __post_init__(self):
        check_fields(self, {"ft_lr": 0, "ft_steps": 0, "ft_batch_size": 0, "eval_batch_size": 1})
        require(not self.ft_lr > MAX_LR, f"--ft-lr {self.ft_lr}: must be at most {MAX_LR:g}")
        check_text(self, "instruction")
        bad = [m for m in self.method_list if m not in COMPARE_METHODS]
        require(not bad and bool(self.method_list),
                f"unknown --methods {bad or self.methods!r}: choose from {', '.join(COMPARE_METHODS)}")
        require(self.k_shot >= 1 or "k-shot" not in self.method_list,
                "--k-shot must be >= 1 (zero-shot is its own method)")

    @property
    def method_list(self) -> list[str]:
        return [m.strip() for m in self.methods.split(",") if m.strip()]


@dataclass
class GenerateConfig:
    max_new_tokens: int = opt(48, "tokens to generate per input")
    sample: bool = opt(False, "sample instead of greedy decoding")
    temperature: float = opt(0.8, "sampling temperature")
    top_p: float = opt(0.95, "nucleus sampling threshold")
    repetition_penalty: float = opt(1.0, "penalise tokens already present (1.0 = off)")
    presence_penalty: float = opt(0.0, "subtract this from the logit of every token generated already "
                                       "(OpenAI's; -2 to 2, 0 = off)")
    frequency_penalty: float = opt(0.0, "subtract this times its count so far from the logit of every token "
                                        "generated already (OpenAI's; -2 to 2, 0 = off)")
    seed: int = opt(0, "sampling seed")

    def __post_init__(self):
        check_fields(self, {"max_new_tokens": 1})
        check_seed(self.seed)
        require(0 < self.temperature <= TEMPERATURE_MAX,
                f"--temperature must be > 0 and at most {TEMPERATURE_MAX:g} (got {self.temperature})")
        require(0 < self.top_p <= 1, f"--top-p must be in (0, 1] (got {self.top_p})")
        lo, hi = REPETITION_PENALTY_RANGE
        require(lo <= self.repetition_penalty <= hi,
                f"--repetition-penalty must be > 0, between {lo:g} and {hi:g} (got {self.repetition_penalty})")
        lo, hi = PENALTY_RANGE
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            require(lo <= v <= hi, f"{flag(name)} must be between {lo:g} and {hi:g} (got {v})")


@dataclass
class ServeConfig:
    host: str = opt("127.0.0.1", "address to bind (loopback by default; 0.0.0.0 exposes the server to the network)")
    port: int = opt(8000, "TCP port")
    max_batch: int = opt(16, "most requests (rows) decoded together in one batch")
    max_queue: int = opt(64, "most requests waiting for a batch; beyond it the server answers 503 with Retry-After")
    batch_wait_ms: float = opt(5.0, "after a request arrives, wait this long for others to share its batch")
    max_input_tokens: int = opt(1024, "longest accepted input in tokens (soft prompt not counted)")
    max_new_tokens: int = opt(256, "cap on max_tokens a request may ask for")
    default_max_tokens: int = opt(16, "max_tokens when a completion request gives none (OpenAI's default)")
    max_body_bytes: int = opt(1_000_000, "largest accepted request body")
    max_n: int = opt(8, "most choices (n) per completion request")
    retry_after: int = opt(1, "seconds a 503 (queue full) tells clients to wait")
    admin_token: str = opt("", "token for loading/unloading prompts at run time (default: env SOFTPROMPT_ADMIN_TOKEN; "
                               "none = admin endpoints off)")
    read_timeout: float = opt(30.0, "seconds a client has to send its whole request body (408 after)")
    shutdown_timeout: float = opt(30.0, "on SIGTERM or Ctrl-C, seconds the requests in flight have to finish before "
                                        "they are cancelled")
    header_timeout: float = opt(10.0, "seconds a client has to send a request's headers, from connecting or from its "
                                      "last response (the connection is closed after)")
    keep_alive_timeout: float = opt(5.0, "seconds an idle kept-alive connection stays open")
    max_connections: int = opt(512, "most connections served at once; a request beyond gets 503")

    def __post_init__(self):
        # Each bound is where a smaller value breaks the server quietly: --max-batch 0 decoded one row
        # at a time anyway, --max-queue 0 refused every request with a 400.
        check_fields(self, {"port": 0, "max_batch": 1, "max_queue": 1, "batch_wait_ms": 0, "max_input_tokens": 1,
                            "max_new_tokens": 1, "default_max_tokens": 1, "max_body_bytes": 1, "max_n": 1,
                            "retry_after": 0, "max_connections": 1})
        check_text(self, "host", "admin_token")
        # "" binds every interface (an unset --host "$HOST" exposed the server); [::1] is a URL's form of ::1.
        require(bool(self.host.strip()), "--host is empty: give an address (127.0.0.1, the default; 0.0.0.0 for "
                                         "every interface)")
        if self.host.startswith("[") and self.host.endswith("]"):
            self.host = self.host[1:-1]
        require(self.port <= 65535, f"--port must be at most 65535 (got {self.port})")
        require(self.read_timeout > 0,
                f"--read-timeout must be a finite number of seconds > 0 (got {self.read_timeout})")
        require(self.header_timeout > 0 and self.keep_alive_timeout > 0,
                f"--header-timeout and --keep-alive-timeout must be finite numbers of seconds > 0 (got "
                f"{self.header_timeout}, {self.keep_alive_timeout})")
        require(self.shutdown_timeout >= 0,
                f"--shutdown-timeout must be a finite number of seconds >= 0 (got {self.shutdown_timeout})")
        require(self.default_max_tokens <= self.max_new_tokens,
                f"--default-max-tokens {self.default_max_tokens} is over --max-new-tokens {self.max_new_tokens}: "
                "every request without max_tokens would be refused")


def add_args(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add one flag per dataclass field; booleans get --flag / --no-flag. The parser's `config_fields`
    default records which class each flag fills, for config files (configfile.py).

    Kept rather than transformers' HfArgumentParser: that one is a whole parser built from a fixed
    list of dataclasses (no subset of a class per command, as eval and compare take, inside a
    sub-command table), and its parse_yaml_file/parse_json_file replace the flags instead of sitting
    under them; ours is these twenty lines."""
    hints = get_type_hints(cls)
    group = parser.add_argument_group(cls.__name__.replace("Config", "").lower())
    parser.set_defaults(config_fields={**(parser.get_default("config_fields") or {}),
                                       **{f.name: cls.__name__ for f in dataclasses.fields(cls) if f.name not in skip}})
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        name = flag(f.name)
        typ = hints[f.name]
        if f.metadata.get("repeat"):  # a list field: the flag once per item, in order (DataConfig.mix)
            group.add_argument(name, dest=f.name, action="append", default=[], metavar="JSON",
                               help=f.metadata.get("help", ""))
            continue
        helptext = f.metadata.get("help", "") + (f" (default: {f.default!r})" if f.default != "" else "")
        if typ is bool:
            group.add_argument(name, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default,
                               help=f.metadata.get("help", "") + (" (on by default)" if f.default is True else ""))
        else:
            group.add_argument(name, dest=f.name, type=typ, default=f.default, help=helptext,
                               choices=f.metadata.get("choices"))


def reword(parser: argparse.ArgumentParser, dest: str, text: str) -> None:
    """The help of the flag that fills `dest`, as a command reads it (add_args wrote the field's own)."""
    for action in parser._actions:
        if action.dest == dest:
            action.help = text


def from_args(cls: type, ns: argparse.Namespace) -> Any:
    return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if hasattr(ns, f.name)})


def to_dict(*configs: Any) -> dict[str, Any]:
    return {type(c).__name__: dataclasses.asdict(c) for c in configs}


def as_it_ran(record: dict[str, Any]) -> dict[str, Any]:
    """A run's run_config.json with the fields it predates filled in as that run ran, where today's
    default would run otherwise, so that `--config` replays it and `--resume` compares with it:
    a prefix trained before --prefix-scaled-steps (8a499ea) took plain steps; a run that held out
    more than HELD_OUT_MAX rows of its --data held out that many (--eval-limit). A record is told from
    a hand-written config file by its `forward_path_taken`, which train wrote before any prefix."""
    train, data = record.get("TrainConfig"), record.get("DataConfig")
    if "forward_path_taken" not in record or not isinstance(train, dict):
        return record
    # ... one that held out a tenth of a large file, before at most HELD_OUT_MAX rows were: as many again.
    held = record.get("eval_examples")
    if (isinstance(data, dict) and not any(data.get(k) for k in ("eval_data", "eval_split", "eval_limit", "mix"))
            and isinstance(held, int) and held > HELD_OUT_MAX):
        record = {**record, "DataConfig": {**data, "eval_limit": held}}
    # ... and one with --prefix-projection, recorded with the default true before it was recorded false.
    if train.get("method") == "prefix" and ("prefix_scaled_steps" not in train or train.get("prefix_projection")):
        return {**record, "TrainConfig": {**train, "prefix_scaled_steps": False}}
    return record
