"""A prompt's recorded data settings as the defaults of every command that uses the prompt.

`train` records in prompt_config.json how it read each row (template, target, text column or
messages column), the label words and their column, and whether inputs went through the chat
template. `eval`, `ensemble` and `generate` start from those; a flag given on the command line
still wins. How a row is read is taken as a whole: a user who gives --template, --text-col or
--messages-col reads rows their own way, and none of the prompt's reading is mixed in.

The base model it was trained on (and how it was quantised) is likewise the default --model of
every command that loads a model for a prompt, as PEFT's AutoPeftModel loads an adapter's base.
"""
from __future__ import annotations

import argparse
import dataclasses
import string
from pathlib import Path
from typing import Any

from ..core.config import BUILTIN_MODEL, QUANTIZE, DataConfig, model_name, reword, template_fields, unescape
from ..core.utils import SoftpromptError, read_json, short, warn
from ..data.datasource import first_row

# A prompt folder's two files (prompt.py writes them; named here so that reading the config imports no torch).
WEIGHTS_FILE = "prompt.safetensors"
CONFIG_FILE = "prompt_config.json"
RUN_RECORD = "run_config.json"  # a train run's record (training/rundir.py writes it)
READING = ("template", "target", "text_col", "messages_col")  # how a row becomes an input: all or nothing
DEFAULT_LABEL_COL = "label"  # DataConfig's default
# The PEFT adapter types import-peft converts into prompts (peft_io.py); any other is not a prompt.
PEFT_PROMPT_TYPES = ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING")


def prompt_given(prompt: str) -> bool:
    """A --prompt naming a prompt: not empty, nor `none` (the untuned model)."""
    return bool(prompt) and prompt != "none"


def read_meta(prompt: str | Path) -> dict[str, Any]:
    """prompt_config.json of a prompt folder (or of a .safetensors file's folder, or hf://REPO_ID),
    without reading the tensor; {} when there is none (a bare tensor, an imported adapter)."""
    from .hub import download, is_hub

    path = download(prompt) if is_hub(prompt) else Path(prompt)
    if path.is_file() and path.suffix != ".safetensors":  # prompt_config.json itself, say
        raise SoftpromptError(f"{path} is not a prompt: give the prompt's folder (or its .safetensors file)")
    folder = path.parent if path.suffix == ".safetensors" else path
    if not (folder / WEIGHTS_FILE).is_file() and not path.is_file():
        raise missing_prompt_error(folder, folder / WEIGHTS_FILE)
    meta = read_json(folder / CONFIG_FILE) if (folder / CONFIG_FILE).is_file() else {}
    return meta if isinstance(meta, dict) else {}


def missing_prompt_error(folder: Path, weights: Path) -> SoftpromptError:
    """What to say of a folder without a prompt file, given where a prompt folder goes: a PEFT adapter
    (peft_adapter_error), a `train --method full` run (its model is a --model), a run stopped before
    its first prompt (its checkpoint resumes), or nothing of ours."""
    if (folder / "adapter_model.safetensors").is_file() or (folder / "adapter_config.json").is_file():
        return peft_adapter_error(folder)
    if (folder / "model" / "config.json").is_file():
        # The command quoted whole, so that the API's wording (api.python_words) keeps it a command.
        return SoftpromptError(f"{folder} is a full fine-tuning run (`train --method full`), which holds a fine-tuned "
                               f"model, not a prompt: pass --model {folder / 'model'} (and no prompt)")
    if (folder / "trainer_state.json").is_file():  # a transformers Trainer checkpoint of a SoftPromptModel
        return SoftpromptError(f"{folder} is a transformers Trainer checkpoint, which holds the training state (for "
                               "resume_from_checkpoint), not a prompt: pass callbacks=[softprompt.SavePromptCallback()] "
                               "to the Trainer to save the prompt in each checkpoint, or model.save_pretrained(DIR) "
                               "after training")
    if (folder / RUN_RECORD).is_file():  # a train run stopped before it saved a prompt
        resume = (f": `softprompt train --config {folder / RUN_RECORD} --resume --out {folder}` continues it"
                  if (folder / "checkpoint").is_dir() else "")
        return SoftpromptError(f"{folder} is a train run stopped before it saved a prompt{resume}")
    return SoftpromptError(f"missing prompt file: {weights}" + ("" if folder.is_dir() else f" (no folder {folder})"))


def peft_adapter_error(path: Path) -> SoftpromptError:
    """What to say of a PEFT adapter folder given where a prompt folder goes: convert a prompt adapter,
    and name the type of any other (a LoRA adapter changes weights: no prompt stands for it)."""
    cfg = path / "adapter_config.json"
    try:
        peft_type = read_json(cfg).get("peft_type") if cfg.is_file() else None
    except (SoftpromptError, AttributeError):  # unreadable, or not an object: import-peft says which
        peft_type = None
    if peft_type is not None and peft_type not in PEFT_PROMPT_TYPES:
        return SoftpromptError(f"{path} is a PEFT {short(peft_type)} adapter, not a prompt: softprompt reads prompt "
                               f"adapters only ({', '.join(PEFT_PROMPT_TYPES)}, converted by import-peft)")
    return SoftpromptError(f"{path} is a PEFT adapter: convert it with `softprompt import-peft {path} OUT`")


def recorded_section(meta: dict[str, Any], name: str) -> dict[str, Any]:
    """One section (`DataConfig`, `ModelConfig`...) of the resolved config a prompt records; {} where
    it records none (older prompts, imported adapters)."""
    config = meta.get("config")
    section = config.get(name) if isinstance(config, dict) else None
    return section if isinstance(section, dict) else {}


def recorded_data(meta: dict[str, Any]) -> dict[str, Any]:
    """The DataConfig fields a prompt records: its config's DataConfig section, else the top-level
    keys that older prompts and imported adapters carry."""
    rec = dict(recorded_section(meta, "DataConfig"))
    for key in ("template", "target", "text_col", "label_col", "chat"):
        if key not in rec and key in meta:
            rec[key] = meta[key]
    if "labels" not in rec and isinstance(meta.get("labels"), list):
        rec["labels"] = ",".join(map(str, meta["labels"]))
    return {k: v for k, v in rec.items() if k in (*READING, "labels", "label_col", "chat")
            and isinstance(v, bool if k == "chat" else str)}


def with_recorded(fields: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """`fields` (DataConfig's, as given by the user: "" where no flag was given) with the prompt's
    recorded reading, labels and chat flag filled in where the user gave none."""
    rec = recorded_data(meta)
    out = dict(fields)
    if not any(fields.get(k) for k in READING):  # labels given read the recorded template as a classifier's
        out.update({k: rec[k] for k in READING if rec.get(k) and not (k == "target" and fields.get("labels"))})
    # Label words make sense only for a template read as a classification input (no target, no text column).
    classifies = out.get("template") and not any(out.get(k) for k in ("target", "text_col", "messages_col"))
    if not fields.get("labels") and rec.get("labels") and classifies:
        out["labels"] = rec["labels"]
        if fields.get("label_col", DEFAULT_LABEL_COL) == DEFAULT_LABEL_COL and rec.get("label_col"):
            out["label_col"] = rec["label_col"]
    if "chat" in fields:  # None: no --chat/--no-chat given (the scoring commands), so the record's
        out["chat"] = bool(rec.get("chat", False)) if fields["chat"] is None else bool(fields["chat"])
    return out


def recorded_base(meta: dict[str, Any]) -> tuple[str, str]:
    """(model, quantize) a prompt records it was trained on; ("", "none") for a record naming no model."""
    section = recorded_section(meta, "ModelConfig")
    model = meta.get("model") or section.get("model")
    quantize = section.get("quantize")
    # model_name: the built-in's cache folder (this machine's or another's) is the built-in
    return (model_name(model) if isinstance(model, str) else "", quantize if quantize in QUANTIZE else "none")


def base_for(prompt: str, flag: str = "--model") -> tuple[str, str]:
    """(model, quantize) to load for `prompt` when none is named: the base it was trained on, else
    the built-in model. A base recorded as a local path that is not on this machine is refused (a
    prompt downloaded from someone else's, or a model folder since moved), naming the `flag` that
    names another."""
    model, quantize = recorded_base(read_meta(prompt)) if prompt_given(prompt) else ("", "none")
    if not model:
        return BUILTIN_MODEL, "none"
    if Path(model).expanduser().is_absolute() and not Path(model).expanduser().exists():
        raise SoftpromptError(f"{prompt} was trained on {short(model)}, which is not on this machine: name its "
                              f"base with {flag}")
    return model, quantize


def base_flags(parser: argparse.ArgumentParser) -> None:
    """--model and --quantize default to the prompt's base (filled in by fill_base)."""
    parser.set_defaults(model=None, quantize=None)
    reword(parser, "model", f"Hub id, local folder, .gguf file, or the built-in '{BUILTIN_MODEL}' (default: the base "
                            "the prompt was trained on, as its prompt_config.json records it; without a prompt, the "
                            "built-in)")
    reword(parser, "quantize", "hold the frozen base's linear layers in 8 or 4 bits (bitsandbytes; needs pip install "
                               "'softprompt[quant]'); default: as the prompt's base was trained when --model is not "
                               "given, else none")


def fill_base(args: argparse.Namespace, prompt: str) -> None:
    """--model and --quantize where neither a flag nor a config file gave them: `prompt`'s base."""
    model, quantize = base_for(prompt) if args.model is None else (args.model, "none")
    args.model = model
    if getattr(args, "quantize", "") is None:
        args.quantize = quantize


def data_config(args: argparse.Namespace, prompt: str) -> DataConfig:
    """A command's DataConfig, the prompt's recorded reading filling what no flag gave (before the
    config's own checks: --labels alone needs the recorded --template)."""
    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(DataConfig) if hasattr(args, f.name)}
    if not prompt_given(prompt):  # no record: chat only where --chat asks
        return DataConfig(**{**fields, **({"chat": bool(fields["chat"])} if "chat" in fields else {})})
    meta = read_meta(prompt)
    return recorded_columns(DataConfig(**with_recorded(fields, meta)), meta)


def recorded_columns(cfg: DataConfig, meta: dict[str, Any]) -> DataConfig:
    """`cfg` reading its --data with the names the prompt's own training file took from --columns, where
    that file is header-less as the training file was: a .csv/.tsv whose row 1 lacks a column the
    reading needs and has as many fields as the names. A headed file is read by its own row 1."""
    names = recorded_section(meta, "DataConfig").get("columns")
    path = Path(cfg.data).expanduser()
    if cfg.columns or cfg.mix or not isinstance(names, str) or not names or path.suffix.lower() not in (".csv", ".tsv"):
        return cfg
    header, needed = [n.strip() for n in names.split(",")], cfg.needed_columns() or []
    row = first_row(path) if path.is_file() else None
    if row is None or not needed or not set(needed) <= set(header) or set(needed) <= {f.strip() for f in row} \
            or len(row) != len(header):
        return cfg
    warn(f"reading {cfg.data} without a header, its columns named {names} as the prompt's training data was "
         f"(--columns {names}; give --columns to name them otherwise)")
    return dataclasses.replace(cfg, columns=names)


def plain_fields(template: str) -> bool:
    """Every {...} of a parsing template is a bare name, without !conversion or :format."""
    return all(not conv and not spec for _, col, spec, conv in string.Formatter().parse(template) if col is not None)


def fill_one(template: Any, text: str) -> str | None:
    """`template` with its one column filled by `text` ("Review: {sentence}\\nSentiment:" and "fine"
    -> "Review: fine\\nSentiment:"); None when it is not a template of exactly one plain column (no
    !conversion or :format: "{x:>400000000}" would pad the text to any size, and a request or a
    downloaded prompt may carry one). A written "\\n" is a newline, as train reads templates
    (config.unescape)."""
    if not isinstance(template, str) or not template:
        return None
    template = unescape(template)
    names = template_fields(template)
    if len(names) != 1 or not names[0].isidentifier() or not plain_fields(template):
        return None
    try:
        return template.format_map({names[0]: text})
    except (KeyError, IndexError, ValueError, TypeError, AttributeError):
        return None


def fill_columns(template: Any, row: dict[str, Any]) -> str | None:
    """`template` with each of its columns filled from `row` ({"premise": ..., "hypothesis": ...}), as
    train fills a row; None when it is not a template of plain columns (fill_one says why) or `row`
    lacks one of them or holds a null, a list or an object there (a training row of those is skipped
    or refused, so no prompt was trained on how Python prints them)."""
    if not isinstance(template, str) or not template or not isinstance(row, dict):
        return None
    template = unescape(template)
    names = template_fields(template)
    if not names or not plain_fields(template) or not all(n.isidentifier() for n in names):
        return None
    if any(not isinstance(row.get(n), (str, int, float)) for n in names):
        return None
    try:
        return template.format_map({n: row[n] for n in names})
    except (KeyError, IndexError, ValueError, TypeError, AttributeError):
        return None
