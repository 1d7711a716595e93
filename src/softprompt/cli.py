"""The `softprompt` command line: a table of sub-commands (as litgpt's `__main__`), each one a module
exposing `add_arguments(parser)` and `run(args) -> int`; the commands that load a model take their
flags from flags.py instead, which imports no torch and sits above the command modules.

Only the chosen command's module is imported (`softprompt --help` loads no torch). Errors the
user can fix, argparse's included, are printed as one line (`softprompt: error: ...`) with exit
status 2; so is an OSError the system raises (a full disk, a folder that cannot be written).
A SoftpromptWarning is one `[softprompt] warning:` line, each time it is raised (by the main process).
Under torchrun every process destroys its process group (end_process_group) and leaves without
interpreter teardown (entry).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, NoReturn

from .core.utils import SoftpromptError, SoftpromptWarning

MAX_ERROR = 2000  # characters of an error message printed


@dataclass(frozen=True)
class Command:
    module: str
    help: str
    description: str = ""
    # The module's functions: its flags and what it does (a module that holds two commands names its
    # own), or only the latter where `flags` is given.
    functions: tuple[str, ...] = ("add_arguments", "run")
    # (module, flags function, check function) when the flags live apart from a heavy module (flags.py):
    # parsing imports no torch, and the check runs before the command's module is imported.
    flags: tuple[str, str, str] | None = None

    def load(self) -> tuple[Any, ...]:
        mod = importlib.import_module(self.module)
        return tuple(getattr(mod, name) for name in self.functions)

    def add_arguments(self) -> Any:
        if self.flags is None:
            return self.load()[0]
        return getattr(importlib.import_module(self.flags[0]), self.flags[1])

    def check(self, args: argparse.Namespace) -> None:
        if self.flags is not None:
            getattr(importlib.import_module(self.flags[0]), self.flags[2])(args)


COMMANDS: dict[str, Command] = {
    "train": Command("softprompt.training.train", "train a prompt: a prefix (the default) or a soft prompt",
                     "Train a prompt on a frozen model: per-layer keys and values (--method prefix, what auto "
                     "trains), a soft prompt (prompt, ptuning, residual), or fine-tune every weight (full).",
                     functions=("run",), flags=("softprompt.flags", "train_arguments", "check_train")),
    "eval": Command("softprompt.evaluation.evaluate", "score a prompt (or the untuned model) on data",
                    "Held-out loss, perplexity and (with --labels) rank-classification accuracy.",
                    functions=("run",), flags=("softprompt.flags", "eval_arguments", "check_eval")),
    "generate": Command("softprompt.generation.generate", "generate text, optionally baseline vs tuned",
                        "Continue each TEXT; greedy unless --sample.",
                        functions=("run",), flags=("softprompt.flags", "generate_arguments", "check_generate")),
    "serve": Command("softprompt.serve", "serve prompts over HTTP (OpenAI-compatible, batched)",
                     "Serve many soft prompts from one frozen model over HTTP: OpenAI-compatible /v1/completions "
                     "and /v1/chat/completions (model = prompt name), /v1/classify, /v1/models, /health, /metrics; "
                     "API docs at /docs. Needs the serve extra."),
    "export-peft": Command("softprompt.prompts.peft_io",
                           "write a prompt as a PEFT adapter (PromptTuning, or PrefixTuning for a prefix)",
                           functions=("add_export_arguments", "run_export")),
    "import-peft": Command("softprompt.prompts.peft_io",
                           "convert a PEFT PromptTuning, PrefixTuning or P-tuning adapter into a softprompt folder",
                           functions=("add_import_arguments", "run_import")),
    "push": Command("softprompt.prompts.hub_push",
                    "upload a prompt to the Hugging Face Hub (softprompt + PEFT layout + card)",
                    "Upload a prompt folder to a Hub model repository: softprompt's files and the run's records, "
                    "PEFT's adapter layout (PeftModel.from_pretrained(base, REPO_ID) works) and a "
                    "model card. Log in first (huggingface-cli login, or HF_TOKEN). Every command that takes a "
                    "prompt folder also takes hf://REPO_ID[@REVISION]."),
    "lm-eval": Command("softprompt.evaluation.lmeval", "score a prompt on lm-evaluation-harness tasks",
                       "lm-evaluation-harness with the softprompt model: lm_eval's own flags (--model_args "
                       "pretrained=MODEL,prompt=DIR --tasks T --include_path FOLDER ...), its Python API, "
                       "softprompt's scoring. Needs the lm-eval extra."),
    "compare": Command("softprompt.training.compare",
                       "prompt engineering vs prompt tuning vs full fine-tuning, measured",
                       "Run prompt engineering (zero-/k-shot), prompt tuning and full fine-tuning on one split; "
                       "report trainable parameters, artifact size, peak memory, training time, inference time per "
                       "example and quality as compare.md, compare.json and compare.png in --out. Prompt tuning "
                       "takes the train flags (--max-steps, --lr, ...); full fine-tuning the same ones with "
                       "--ft-lr/--ft-steps/--ft-batch-size.",
                       functions=("run",), flags=("softprompt.flags", "compare_arguments", "check_compare")),
    "ensemble": Command("softprompt.evaluation.ensemble",
                        "score K prompts together: each alone, majority vote, mean log-prob",
                        "Score every row of --data with K prompt folders over one loaded model; report "
                        "each prompt's accuracy, the best single one, and the ensemble's by majority vote and by "
                        "mean log-probability.",
                        functions=("run",), flags=("softprompt.flags", "ensemble_arguments", "check_ensemble")),
    "inspect": Command("softprompt.evaluation.interpret",
                       "nearest vocabulary tokens of each virtual token; a prefix's per-layer norms",
                       "For each virtual token of a prompt, its nearest vocabulary tokens by cosine similarity to "
                       "the model's input embeddings; for a prefix (per-layer keys and values), each layer's key "
                       "and value norms beside the model's own for a fixed text."),
    "demo": Command("softprompt.demo", "train and compare a prompt on the built-in model, offline",
                    "Offline demo: train a prompt on the built-in model and the bundled countries data, then "
                    "compare held-out loss and generations."),
}


class Version(argparse.Action):
    """--version, its number looked up only when asked for (softprompt.__version__ reads package metadata)."""

    def __call__(self, parser, namespace, values, option_string=None) -> NoReturn:
        import softprompt

        print(f"softprompt {softprompt.__version__}")
        parser.exit()


class Parser(argparse.ArgumentParser):
    """argparse's usage errors as SoftpromptError: the same one line and exit status as every other."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.partition(" ")[2]  # "softprompt train" -> "train"
        raise SoftpromptError((f"{command}: " if command else "") + " ".join(message.split()))


def build_parsers(only: str | None = None) -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser with every command listed, and each command's own parser; the flags of
    `only` (all commands' when None) added, `--config FILE` among them."""
    ap = Parser(prog="softprompt", description="Prompt tuning for frozen causal language models.")
    ap.add_argument("--version", action=Version, nargs=0, help="print the version and exit")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    parsers = {}
    for name, cmd in COMMANDS.items():
        p = parsers[name] = sub.add_parser(name, help=cmd.help, description=cmd.description or cmd.help)
        if only is None or only == name:
            cmd.add_arguments()(p)
            p.add_argument("--config", metavar="FILE", default="",
                           help="YAML or JSON file of this command's flags, in sections as a run's run_config.json "
                                "(ModelConfig, DataConfig, ...; its other flags under the command's name); flags "
                                "given here override it")
    return ap, parsers


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    return build_parsers(only)[0]


def run(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    name = argv[0] if argv and argv[0] in COMMANDS else ""  # the top-level parser has no options but --help and --version
    ap, parsers = build_parsers(only=name)
    files = [a for a in argv[1:] if a == "--config" or a.startswith("--config=")]
    if len(files) > 1:  # argparse kept the last file alone, without a word
        raise SoftpromptError(f"{name}: give --config once (the second file replaced the first)")
    if name and files:
        # The file's values become defaults, then argv is parsed again over them; the first look
        # leaves out the flags the command requires, which the file may give.
        from .configfile import apply_config, parse_leniently

        first = parse_leniently(ap, parsers[name], argv)
        if first.config:
            apply_config(parsers[name], name, first, tuple(COMMANDS))
    args = ap.parse_args(argv)
    from .core.offline import offline_where_unresolvable

    offline_where_unresolvable()  # before a check or command imports the Hub's libraries
    COMMANDS[args.cmd].check(args)  # the command's inputs, before its module (torch, transformers) loads
    return COMMANDS[args.cmd].load()[-1](args)


def one_line(msg: str) -> str:
    """A message as one line whatever it quotes (a column name or a path may hold a newline)."""
    if len(msg) > MAX_ERROR:  # a value quoted whole (a config file's) can be megabytes
        msg = f"{msg[:MAX_ERROR]}... ({len(msg)} characters)"
    return msg.replace("\r", "\\r").replace("\n", "\\n")


@contextmanager
def warning_lines() -> Iterator[None]:
    """SoftpromptWarnings printed as `[softprompt] warning: ...` lines, every time (not once per place,
    Python's default), by the main process alone under torchrun (every process reads the same data
    and settings, so each would say the same); other libraries' warnings as Python shows them."""
    main_process = os.environ.get("RANK", "0") == "0"
    with warnings.catch_warnings():
        warnings.simplefilter("always", SoftpromptWarning)
        shown = warnings.showwarning

        def show(message, category, *args: Any, **kwargs: Any) -> None:
            if issubclass(category, SoftpromptWarning):
                if main_process:
                    print("[softprompt] warning: " + one_line(str(message)), file=sys.stderr)
            else:
                shown(message, category, *args, **kwargs)

        warnings.showwarning = show
        yield


def main(argv: list[str] | None = None) -> int:
    try:
        with warning_lines():
            return run(argv)
    except SoftpromptError as e:
        print("softprompt: error: " + one_line(str(e)), file=sys.stderr)
        return 2
    except BrokenPipeError:  # `softprompt generate ... | head`: the reader left, as Unix filters end, quietly
        with contextlib.suppress(OSError, ValueError):  # no second error when stdout is flushed at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except OSError as e:  # the disk or the system, not a bug: full, read-only, gone (one line, as any error)
        where = f": {e.filename}" if e.filename else ""
        print(f"softprompt: error: {e.strerror or e}{where}".replace("\n", "\\n")[:MAX_ERROR], file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print("softprompt: interrupted" + (" (SIGTERM)" if isinstance(e, Terminated) else ""), file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    finally:
        end_process_group()


def end_process_group() -> None:
    """Destroy the default process group, if a command started one (torchrun). Left to interpreter
    exit, gloo's worker threads can free their tensors after Python is gone, and a process that has
    finished its work aborts (SIGABRT, "terminate called without an active exception"; pytorch#190489)."""
    dist = sys.modules.get("torch.distributed")  # not imported: no group, and no torch to load for nothing
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class Terminated(KeyboardInterrupt):
    """SIGTERM (a batch system's stop, `timeout`, `docker stop`) taken as Ctrl-C is: every cleanup runs
    (a run's lock, atomic writes' temporary folders) and one line says so. Killed by it, a command
    had left with no word and none of that."""


def terminated(signum: int, frame: Any) -> NoReturn:
    raise Terminated


def entry() -> NoReturn:
    """The `softprompt` program (its console script, `python -m softprompt`): main's exit status.
    A process torchrun started leaves without interpreter teardown (os._exit, its output flushed).
    There, destroy_process_group is not enough: with --shard fsdp, torch's DTensor caches keep the
    device mesh and with it the group, and gloo's worker threads, torn down after Python, can abort a
    process that has finished its work (SIGABRT, "terminate called without an active exception",
    about one run in six under load; pytorch#179291). The caches are several and private."""
    signal.signal(signal.SIGTERM, terminated)  # `serve` sets its own once its server runs
    status = main()
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_torchelastic_launched():
        import logging

        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status or 0)
    sys.exit(status)


if __name__ == "__main__":
    entry()
