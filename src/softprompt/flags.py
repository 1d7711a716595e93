"""The flags of the commands that load a model (train, eval, generate, ensemble, compare) and the
checks of them that need no model, apart from the commands' own code: cli.py parses and prints --help with
this module alone (no torch, no transformers), and runs the checks before it imports the command,
so a bad flag, config file, --out, prompt folder or data path is one line within a second, not
after the model has loaded.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .core.config import (CompareConfig, DataConfig, GenerateConfig, ModelConfig, PromptConfig, TrainConfig, add_args,
                          check_warmup, flag, from_args, reword, unescape)
from .core.utils import SoftpromptError, missing_file, short
from .data.precheck import check_files, check_source
from .prompts.recorded import base_flags, data_config, fill_base, prompt_given, read_meta, recorded_data
from .prompts.transfer import adopt

# eval and ensemble score --data itself, one task
SCORING_SKIP = ("eval_data", "eval_fraction", "eval_limit", "eval_split", "mix")


# ---------------------------------------------------------------- shared checks

def check_data(cfg: DataConfig, eval_too: bool = True, scoring: bool = False) -> None:
    """Every source the run reads, read before the model loads (precheck.check_source). `scoring`: a
    scoring command (eval, ensemble), which scores the first --limit rows of --data in file order."""
    for k, task in enumerate(cfg.tasks() if cfg.mix else [cfg]):  # each task of a --mix mixture by its own flags
        where = f"--mix task {k + 1}: " if k else ""
        read = {"columns": task.needed_columns(), "header": task.header,
                "labels": (task.label_col, task.label_values) if task.labels else None}
        # The split load_splits reads of --eval-data, or of --data for its --eval-split.
        held_out = task.eval_split or ("validation" if task.split == "train" else task.split)
        try:
            check_files(task.data, task.data_files)
            check_source(task.data, "--data", split=task.split, config=task.data_config, data_files=task.data_files,
                         first=task.limit if scoring else 0, **read)
            if eval_too and task.eval_data:
                check_source(task.eval_data, "--eval-data", split=task.eval_split, split_flag="--eval-split",
                             read_split=held_out, **read)
            elif eval_too and task.eval_split:  # --data's other split: a local file has none
                check_source(task.data, "--data", split=task.eval_split, config=task.data_config,
                             split_flag="--eval-split", data_files=task.data_files, **read)
        except SoftpromptError as e:
            raise SoftpromptError(f"{where}{e}") from None


def scoring_help(parser: argparse.ArgumentParser) -> None:
    """The data and model flags' help as a scoring command reads them (the configs' speak of training)."""
    reword(parser, "limit", "score at most the first N rows of --data, in file order (0 = all), as train's "
                            "--eval-limit takes the first N held-out rows")
    reword(parser, "text_col", "score this plain text column as language modelling")
    reword(parser, "messages_col", "column of chat turns ([{role, content}, ...]): scored through the model's chat "
                                   "template on the assistant turns (default: a 'messages' column, when no "
                                   "--template or --text-col is given)")
    reword(parser, "dtype", "the base's dtype: auto (bfloat16 on GPUs that support it, float32 elsewhere), float32, "
                            "bfloat16 or float16 (default: %(default)r)")
    reword(parser, "batch_size", "examples per forward pass (default: %(default)s)")


# ---------------------------------------------------------------- train

def train_arguments(parser: argparse.ArgumentParser) -> None:
    for cls in (ModelConfig, DataConfig, PromptConfig, TrainConfig):
        add_args(parser, cls)


def check_train(args: argparse.Namespace) -> None:
    from .training.auto_method import resolve_method
    from .training.rundir import check_out

    model, data, prompt, train = (from_args(cls, args) for cls in (ModelConfig, DataConfig, PromptConfig, TrainConfig))
    check_out(Path(train.out), train.resume, train.overwrite, (prompt.init_from, prompt.init_file))
    train = resolve_method(prompt, train)[0]
    adopt(prompt, train.method, model.model)  # --init-from's source: there, of a kind this method can start from
    if train.max_steps:
        check_warmup(train, train.max_steps, warns=False)  # refuse early; the run warns
    check_data(data)


# ---------------------------------------------------------------- compare

def compare_arguments(parser: argparse.ArgumentParser) -> None:
    add_args(parser, ModelConfig)
    add_args(parser, DataConfig, skip=("mix",))  # every method is scored on one split of one task
    add_args(parser, PromptConfig)
    # The methods' own flags are left at their defaults (--prefix-projection with the default method,
    # prompt, would be refused anyway).
    add_args(parser, TrainConfig, skip=("out", "method", "resume", "overwrite", "keep_best", "save_every",
                                        "eval_every", "patience", "eval_untuned", "prefix_projection",
                                        "prefix_scaled_steps", "encoder", "encoder_hidden_size", "keep_encoder"))
    add_args(parser, CompareConfig)
    # One base serves every row, full fine-tuning's included: train's CPU rule for bf16 does not apply.
    reword(parser, "dtype", "the base's dtype, one for every row: auto (bfloat16 on GPUs that support it, float32 "
                            "elsewhere, so a row may differ a little from `train` on a CPU with native bf16, which "
                            "trains a prompt or a prefix in bfloat16), float32, bfloat16 or float16 "
                            "(default: %(default)r)")


def check_compare(args: argparse.Namespace) -> None:
    """Every flag's own check, then the data each row reads (compare itself checks --out and --init-from
    before its model loads)."""
    configs = {cls: from_args(cls, args) for cls in (ModelConfig, DataConfig, PromptConfig, TrainConfig, CompareConfig)}
    check_data(configs[DataConfig])


# ---------------------------------------------------------------- eval

def eval_arguments(parser: argparse.ArgumentParser) -> None:
    add_args(parser, ModelConfig)
    base_flags(parser)
    add_args(parser, DataConfig, skip=SCORING_SKIP)
    parser.set_defaults(chat=None)  # --chat / --no-chat, else as the prompt was trained (recorded.with_recorded)
    parser.add_argument("--prompt", default="none",
                        help="prompt folder or hf://REPO_ID[@REV], or 'none' for the untuned model; the template, "
                             "target, labels and chat flag its prompt_config.json records are the defaults of those "
                             "flags")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per forward pass")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    scoring_help(parser)


def check_eval(args: argparse.Namespace) -> None:
    fill_base(args, args.prompt)
    from_args(ModelConfig, args)
    if args.batch_size < 1:
        raise SoftpromptError(f"--batch-size must be >= 1 (got {args.batch_size})")
    check_data(data_config(args, args.prompt), eval_too=False, scoring=True)


# ---------------------------------------------------------------- ensemble

def ensemble_arguments(parser: argparse.ArgumentParser) -> None:
    add_args(parser, ModelConfig)
    base_flags(parser)  # the first prompt's
    add_args(parser, DataConfig, skip=SCORING_SKIP)
    parser.set_defaults(chat=None)  # --chat / --no-chat, else as the first prompt was trained
    parser.add_argument("prompts", nargs="+", metavar="DIR",
                        help="prompt folders or hf://REPO_ID[@REV] (two or more); the first one's recorded template, "
                             "labels and chat flag are the defaults of those flags")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    scoring_help(parser)


def check_ensemble(args: argparse.Namespace) -> None:
    if len(args.prompts) < 2:
        raise SoftpromptError("ensemble needs at least two prompt folders")
    fill_base(args, args.prompts[0])
    from_args(ModelConfig, args)
    records = {p: recorded_data(read_meta(p)) for p in args.prompts}
    chats = {p: bool(r.get("chat")) for p, r in records.items()}
    if args.chat is None and len(set(chats.values())) > 1:  # every prompt reads the rows as the first one does
        on = [p for p, c in chats.items() if c]
        off = [p for p, c in chats.items() if not c]
        raise SoftpromptError(f"{on[0]} was trained through the chat template and {off[0]} was not: pass --chat or "
                              "--no-chat to score every prompt one way")
    for key in ("template", "labels"):  # the first prompt's, silently, for prompts that recorded others
        if getattr(args, key, "") or (key == "template" and (args.text_col or args.messages_col)):
            continue
        first, *rest = args.prompts
        # A template's "\\n" written or a real newline: one template (label words are read as written)
        spelt = {p: (unescape if key == "template" else str)(records[p].get(key, "")) for p in args.prompts}
        other = next((p for p in rest if spelt[p] != spelt[first]), None)
        if other is not None:
            raise SoftpromptError(f"{first} records {key} {short(records[first].get(key, ''))} and {other} "
                                  f"{short(records[other].get(key, ''))}: pass {flag(key)} to score every prompt "
                                  "one way")
    check_data(data_config(args, args.prompts[0]), eval_too=False, scoring=True)


# ---------------------------------------------------------------- generate

def generate_arguments(parser: argparse.ArgumentParser) -> None:
    add_args(parser, ModelConfig)
    base_flags(parser)
    add_args(parser, GenerateConfig)
    parser.add_argument("--prompt", default="", help="prompt folder or hf://REPO_ID[@REV] (default: none, the "
                                                     "untuned model)")
    parser.add_argument("--compare", action="store_true", help="show the untuned model's output beside the tuned one")
    parser.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                        help="wrap TEXT in the model's chat template, or not (default: as the prompt was trained)")
    # dest: not DataConfig's `template` (a generate namespace is no DataConfig's)
    parser.add_argument("--template", dest="input_template", default=None,
                        help="template each TEXT fills, e.g. 'Review: {sentence}\\nSentiment:' (one column: TEXT fills "
                             "it; several: TEXT is a JSON object); default: the prompt's recorded template; '{input}' "
                             "or --raw sends TEXT as it is")
    parser.add_argument("--raw", action="store_true", help="send each TEXT as it is, without the prompt's template")
    parser.add_argument("--system", default="", help="system message before each input (through the chat template)")
    parser.add_argument("--messages", default="", metavar="FILE",
                        help="JSONL file of conversations to reply to, one {\"messages\": [{\"role\": ..., \"content\": "
                             "...}, ...]} per line (through the chat template), instead of TEXT")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("texts", nargs="*", metavar="TEXT",
                        help="inputs to continue; a written \\n is a newline, as in train's templates")


def check_generate(args: argparse.Namespace) -> None:
    fill_base(args, args.prompt)
    from_args(ModelConfig, args)
    from_args(GenerateConfig, args)
    if args.raw and args.input_template is not None:
        raise SoftpromptError("give --template or --raw, not both")
    if args.input_template:
        from .core.config import check_template

        check_template("template", args.input_template)
    if prompt_given(args.prompt):
        read_meta(args.prompt)
    if args.messages and not Path(args.messages).is_file():
        raise missing_file(args.messages, "--messages file")
    if not args.texts and not args.messages:
        raise SoftpromptError("give at least one TEXT to continue (or --messages FILE)")
    if args.messages and (args.raw or args.input_template is not None):  # conversations take the chat template
        raise SoftpromptError("--messages takes each conversation through the chat template: drop --raw/--template")
