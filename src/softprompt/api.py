"""The Python face of the `train`, `eval` and `generate` commands: keyword arguments instead of
flags, Python exceptions instead of CLI lines.

Each keyword is a field of the config dataclasses the command fills from its flags (config.py:
`batch_size=` is `--batch-size`), so the two never drift apart. An unknown keyword or a value of
the wrong type is a TypeError, a bad value a ValueError (`ConfigError`, also a SoftpromptError),
whose message names the keyword rather than the flag; so does a SoftpromptWarning's.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, get_type_hints

from .core.config import DTYPES, DataConfig, GenerateConfig, ModelConfig, PromptConfig, TrainConfig, check_template
from .core.utils import SoftpromptError, SoftpromptWarning, dtype_name


class ConfigError(SoftpromptError, ValueError):
    """A keyword argument's value is wrong; the message names the keyword."""


PACKAGE = str(Path(__file__).parent) + os.sep
# A flag in a message, with the word after it: a value where it is a placeholder (FILE), a number or
# one of the flag's choices (--loss classes); prose otherwise (--labels makes a classifier).
FLAG = re.compile(r"--(no-)?([a-z][a-z0-9-]*)(?: ([A-Z][A-Z_]*\b|-?[0-9][0-9.e-]*\b|[a-z0-9][a-z0-9_.-]*\b))?")
CONFIGS = (ModelConfig, DataConfig, PromptConfig, TrainConfig, GenerateConfig)
# Flags that take no value: in Python, a keyword set to True (--no-X: X=False).
SWITCHES = {f.name for cls in CONFIGS for f in dataclasses.fields(cls) if f.type in ("bool", bool)}
CHOICES = {f.name: set(map(str, f.metadata["choices"])) for cls in CONFIGS for f in dataclasses.fields(cls)
           if f.metadata.get("choices")}


def is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def python_words(message: str) -> str:
    """A CLI message in Python's words: `--batch-size 8` becomes batch_size=8, `--data FILE` data=FILE,
    `--loss classes` loss='classes', `--resume` resume=True and any other --flag its keyword, except in
    a command quoted in backticks, which stays a command."""
    def keyword(m: re.Match) -> str:
        no, name, value = m.group(1), m.group(2).replace("-", "_"), m.group(3)
        if value in CHOICES.get(name, ()):
            return f"{name}={value!r}"
        if value is not None and (value.isupper() or is_number(value)):
            return f"{name}={value}"
        said = f"{name}={not no}" if name in SWITCHES else (no or "").replace("-", "_") + name
        return said if value is None else f"{said} {value}"  # prose after the flag

    parts = message.split("`")
    parts[::2] = [FLAG.sub(keyword, p) for p in parts[::2]]
    return "`".join(parts)


@contextmanager
def python_errors() -> Iterator[None]:
    """SoftpromptErrors raised inside, phrased for Python callers (as ConfigError when it is a value),
    and so are SoftpromptWarnings, shown as the caller's filters say (not thread-safe: Python's warnings
    state is global)."""
    with warnings.catch_warnings():
        shown = warnings.showwarning

        def show(message, category, filename, lineno, *args: Any, **kwargs: Any) -> None:
            if issubclass(category, SoftpromptWarning):
                message = category(python_words(str(message)))
                filename, lineno = caller_line() or (filename, lineno)
            shown(message, category, filename, lineno, *args, **kwargs)

        warnings.showwarning = show
        try:
            yield
        except ConfigError:
            raise
        except SoftpromptError as e:
            raise ConfigError(python_words(str(e))) from None
        except SoftpromptWarning as w:  # the caller's filter made it an error
            raise type(w)(python_words(str(w))) from None


def caller_line() -> tuple[str, int] | None:
    """The caller's own line that called into softprompt, where a warning of the API points (the line
    inside softprompt that warned means nothing to the caller); None outside such a call."""
    frame, inside = sys._getframe(1), False
    while frame is not None:
        name = frame.f_code.co_filename
        if name == warnings.__file__:  # the machinery between softprompt's warn() and this hook
            pass
        elif name.startswith(PACKAGE):
            inside = True
        elif inside:  # past the warnings machinery and softprompt's own frames
            return name, frame.f_lineno
        frame = frame.f_back
    return None


def split_kwargs(func: str, kwargs: dict[str, Any], classes: tuple[type, ...]) -> list[Any]:
    """One config per class from the keywords naming its fields; TypeError for any other keyword or
    a value of the wrong type."""
    fields = {f.name: cls for cls in classes for f in dataclasses.fields(cls)}
    unknown = sorted(set(kwargs) - set(fields))
    if unknown:
        raise TypeError(f"{func}() got an unexpected keyword argument {unknown[0]!r}")
    for name, value in kwargs.items():
        want = get_type_hints(fields[name])[name]
        ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if want is str and isinstance(value, Path):  # paths are welcome where a file name is
            kwargs[name] = str(value)
            ok = True
        if not ok:
            raise TypeError(f"{func}(): {name} must be {want.__name__}, not {type(value).__name__}")
    with python_errors():
        return [cls(**{k: v for k, v in kwargs.items() if fields[k] is cls}) for cls in classes]


def model_and_tokenizer(model: Any, tokenizer: Any, kwargs: dict[str, Any], prompt: Any = None) -> tuple[Any, Any]:
    """`model` as a name (loaded by the command) or an already loaded model, with its tokenizer; None
    is the base `prompt` was trained on (and quantize= as it was, unless given), else the built-in."""
    if tokenizer is not None and (model is None or isinstance(model, (str, Path))):  # it would go unused
        raise TypeError("tokenizer= goes with a loaded model=: a model given by name (or the prompt's base) loads "
                        "its own tokenizer")
    if model is None:
        from .prompts.recorded import base_for

        with python_errors():
            model, quantize = base_for("" if prompt is None else str(prompt))
        kwargs.setdefault("quantize", quantize)
    if isinstance(model, (str, Path)):
        kwargs["model"] = str(model)
        return None, None
    if tokenizer is None:
        raise TypeError("model= is a loaded model: pass its tokenizer= too (or give model= as a name or folder)")
    # They say how to load a model by name; a loaded one is used as it is (run_config.json would record them).
    given = [k for k, off in (("dtype", "auto"), ("quantize", "none")) if kwargs.get(k, off) != off]
    if given:
        raise TypeError(f"{given[0]}= loads model= by name; model= is already loaded, so load it as you want it "
                        "(or give model= as a name)")
    # A SoftPromptModel's frozen base (an HF model's own `base_model` is its decoder without the head).
    base = model.get_base_model() if hasattr(model, "prompts") and hasattr(model, "get_base_model") else model
    from .base.models import check_loaded_base

    check_loaded_base(base)
    kwargs["model"] = str(getattr(base, "name_or_path", "") or "model")
    # Recorded as loaded, so that `train --config RUN/run_config.json` loads the base so too (auto may
    # choose another dtype, as compare's rows found).
    from .base.quantize import quantized_bits

    dtype = dtype_name(getattr(base, "dtype", ""))
    if dtype in DTYPES:
        kwargs["dtype"] = dtype
    if bits := quantized_bits(base):
        kwargs["quantize"] = f"{bits}bit"
    return base, tokenizer


def warn_unlike_record(base: Any) -> None:
    """A loaded base quantised otherwise than the record's quantize= loads one (FP4, no double
    quantization...): its run trains, but run_config.json cannot replay it."""
    from .base.quantize import quantized_bits, unlike_flag

    if base is not None and (unlike := unlike_flag(base)):
        bits = quantized_bits(base)
        warnings.warn(SoftpromptWarning(
            f"model= is quantised otherwise than quantize='{bits}bit' loads a model ({'; '.join(unlike)}): "
            f"run_config.json records quantize {bits}bit, so `softprompt train --config` would replay the run "
            "on another base"), stacklevel=3)


def train(*, model: Any = "smollm2-135m-instruct", tokenizer: Any = None, **kwargs: Any) -> dict[str, Any]:
    """Train a prompt into `out=` and return the run summary: a prefix by default (method='auto'),
    a soft prompt with method='prompt'. `model` is a name or folder, or a loaded model with its
    `tokenizer`. Keywords: the `train` command's flags (data=, template=, target=, labels=, method=,
    virtual_tokens=, init=, lr=, max_steps=, out=, ...)."""
    from .flags import check_data
    from .training.train import train as run_train

    base, tok = model_and_tokenizer(model, tokenizer, kwargs)
    warn_unlike_record(base)
    configs = split_kwargs("train", kwargs, (ModelConfig, DataConfig, PromptConfig, TrainConfig))
    with python_errors():
        check_data(configs[1])  # the command's checks of its data (a local file's split, its columns)
        return run_train(*configs, model=base, tok=tok, quiet=True)


def evaluate(prompt: Any = None, *, model: Any = None, tokenizer: Any = None,
             batch_size: int = 16, **kwargs: Any) -> dict[str, Any]:
    """Held-out loss, perplexity (and accuracy with labels=) of `prompt` (a folder, `hf://REPO`, or
    None for the untuned model) on every row of `data=` (the first `limit=` rows), on `model`
    (default: the base the prompt was trained on; the built-in without a prompt). Keywords: the
    `eval` command's flags."""
    from .evaluation.evaluate import eval_prompt

    if not isinstance(batch_size, int) or isinstance(batch_size, bool):
        raise TypeError(f"evaluate(): batch_size must be int, not {type(batch_size).__name__}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1 (got {batch_size})")
    from .flags import SCORING_SKIP, check_data
    from .prompts.recorded import data_config

    for name in SCORING_SKIP:  # train's held-out rows: eval scores every row of data= (the command has no such flags)
        if name in kwargs:
            raise TypeError(f"evaluate() got an unexpected keyword argument {name!r}")
    base, tok = model_and_tokenizer(model, tokenizer, kwargs, prompt)
    mcfg, dcfg = split_kwargs("evaluate", kwargs, (ModelConfig, DataConfig))
    if "chat" not in kwargs:  # as the prompt was trained (recorded.with_recorded); chat=False turns it off
        dcfg = dataclasses.replace(dcfg, chat=None)
    with python_errors():
        # The command's checks (flags.check_eval), before a model loads: a local file's split, and the
        # columns its reading needs (the prompt's recorded template where none is given).
        named = "none" if prompt is None else str(prompt)
        dcfg = data_config(argparse.Namespace(**dataclasses.asdict(dcfg)), named)
        check_data(dcfg, eval_too=False, scoring=True)
        return eval_prompt(mcfg, dcfg, named, batch_size, model=base, tok=tok)


def generate(texts: str | dict[str, Any] | list[str | dict[str, Any]] = (), prompt: Any = None, *,
             model: Any = None, tokenizer: Any = None, compare: bool = False, chat: bool | None = None,
             template: str | None = None, system: str = "", messages: list[list[dict[str, str]]] | None = None,
             **kwargs: Any) -> list[dict[str, str]]:
    """Continue each text ({"input", "tuned" or "baseline"} per text; both with compare=True), as
    `softprompt generate` does: `template` fills each text into it (None: the prompt's recorded one,
    "": the text as it is), a dict of columns ({"premise": ..., "hypothesis": ...}) fills a template of
    several, `system` goes before each input through the chat template, and `messages` (conversations
    of {"role", "content"}) replace the texts. `model` is, by default, the base the prompt was trained
    on (the built-in without a prompt). Keywords: max_new_tokens=, sample=, temperature=, top_p=,
    repetition_penalty=, presence_penalty=, frequency_penalty=, seed=."""
    from .data.chat import conversation_problem
    from .generation.generate import generate_cmd

    texts = [texts] if isinstance(texts, (str, dict)) else list(texts)
    if not all(isinstance(t, str) or (isinstance(t, dict) and all(isinstance(k, str) for k in t)) for t in texts):
        raise TypeError("generate(): texts must be a string, a dict of a template's columns ({'premise': ..., "
                        "'hypothesis': ...}) or a list of them")
    if not (template is None or isinstance(template, str)) or not isinstance(system, str):
        raise TypeError("generate(): template must be a string or None, and system a string")
    problem = None if messages is None or isinstance(messages, list) else f"not a {type(messages).__name__}"
    problem = problem or next((f"messages[{i}]: {p}" for i, c in enumerate(messages or [])
                               if (p := conversation_problem(c))), None)
    if problem:
        raise TypeError(f"generate(): messages must be a list of conversations, each a list of {{'role': str, "
                        f"'content': str}}; {problem}")
    # The command's checks (flags.check_generate), in the API's words, before a model loads.
    if messages is None and not texts:
        raise ConfigError("generate(): give at least one text to continue (or messages=, a list of conversations)")
    if messages is not None and not messages:
        raise ConfigError("generate(): messages= holds no conversation: give at least one")
    if messages is not None and (texts or template is not None):
        raise ConfigError("messages go through the chat template, in place of texts: give them without texts "
                          "and template")
    with python_errors():
        if template:
            check_template("template", template)
    base, tok = model_and_tokenizer(model, tokenizer, kwargs, prompt)
    mcfg, gcfg = split_kwargs("generate", kwargs, (ModelConfig, GenerateConfig))
    with python_errors():
        return generate_cmd(mcfg, gcfg, texts, "" if prompt is None else str(prompt), compare, chat, base, tok,
                            template=template, system=system, conversations=messages)


def load_prompt(path: str | Path, model: Any = None):
    """A prompt from a softprompt folder, a .safetensors file, `hf://REPO_ID[@REV]` or a PEFT prompt
    adapter folder (prompt tuning, prefix tuning, P-tuning), checked against `model` when given: a
    soft prompt (prompt.SoftPrompt: `.embeds` [P, H], `.meta`), or a prefix (prefix.PrefixPrompt:
    `.key_values()` [L, 2, kv heads, P, head dim], `.meta`), what `train` writes by default."""
    import tempfile

    from .prompts.peft_io import ADAPTER_CONFIG, import_peft
    from .prompts.prompt import WEIGHTS_FILE, load_prompt as load

    folder = Path(path)
    with python_errors():
        if folder.is_dir() and not (folder / WEIGHTS_FILE).is_file() and (folder / ADAPTER_CONFIG).is_file():
            with tempfile.TemporaryDirectory() as tmp:  # read through import-peft's checks
                return load(import_peft(folder, Path(tmp) / "prompt"), model)
        return load(path, model)
