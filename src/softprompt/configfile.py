"""Config files: `--config FILE.yaml|json` on every command, flags given on the command line
overriding the file.

A file holds sections named after the config dataclasses, as a run's `run_config.json` writes
them (`ModelConfig`, `DataConfig`, `PromptConfig`, `TrainConfig`, ...), each mapping field names
to values, so `softprompt train --config RUN/run_config.json --out NEW` replays a run. A section
named after the command holds its other flags (`eval: {prompt: runs/sst2, batch_size: 32}`).
The file's values become the command's defaults, which is why a flag always wins. Other top-level
keys are ignored (run_config.json also records what ran: device, world_size, ...), and so are the
sections of config classes this command does not take; an unknown key inside a section, a value
of the wrong type, or a misspelt `...Config` section is refused with one line naming it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any, get_type_hints

from .config import CompareConfig, DataConfig, GenerateConfig, ModelConfig, PromptConfig, ServeConfig, TrainConfig
from .utils import SoftpromptError

SECTIONS = {cls.__name__: cls for cls in (ModelConfig, DataConfig, PromptConfig, TrainConfig, CompareConfig,
                                          GenerateConfig, ServeConfig)}
# Namespace entries that are no flag of the command's own.
NOT_FLAGS = {"cmd", "config", "config_fields"}


def read_config(path: str | Path) -> dict[str, Any]:
    """The mapping a .yaml/.yml/.json file holds."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise SoftpromptError(f"--config: missing file {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            obj = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise SoftpromptError(f"--config: corrupt YAML in {path}: {' '.join(str(e).split())}") from None
    elif path.suffix.lower() == ".json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise SoftpromptError(f"--config: corrupt JSON in {path}: {e}") from None
    else:
        raise SoftpromptError(f"--config {path}: expected a .yaml, .yml or .json file")
    if not isinstance(obj, dict):
        raise SoftpromptError(f"--config {path}: expected a mapping of sections (ModelConfig, DataConfig, ...)")
    return obj


def check_value(where: str, typ: type, value: Any) -> None:
    """A file's value has its field's type. A string is read as argv's would be (YAML reads 1e-2 as
    one), except for a switch, where "false" would be true; an int is a float."""
    if isinstance(value, str) and typ in (int, float):
        try:
            typ(value)
            return
        except ValueError:
            raise SoftpromptError(f"{where}: expected {typ.__name__}, got {value!r}") from None
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = {bool: isinstance(value, bool), int: number and isinstance(value, int), float: number,
          str: isinstance(value, str)}.get(typ, True)
    if not ok:
        raise SoftpromptError(f"{where}: expected {typ.__name__}, got {type(value).__name__} {value!r}")


def command_defaults(cfg: dict[str, Any], path: str, command: str, args: argparse.Namespace) -> dict[str, Any]:
    """The flag defaults `cfg` (a read config file) sets for `command`, whose first parse gave `args`."""
    fields: dict[str, str] = getattr(args, "config_fields", {})  # flag dest -> its config class (config.add_args)
    flags = set(vars(args)) - NOT_FLAGS - set(fields)
    out: dict[str, Any] = {}
    for section, values in cfg.items():
        where = f"--config {path}: {section}"
        if section in SECTIONS:
            cls = SECTIONS[section]
            if not isinstance(values, dict):
                raise SoftpromptError(f"{where}: expected a mapping of {cls.__name__}'s fields")
            hints = get_type_hints(cls)
            known = {f.name for f in dataclasses.fields(cls)}
            for key, value in values.items():
                if key not in known:
                    raise SoftpromptError(f"{where}: unknown key {key!r} (known: {', '.join(sorted(known))})")
                check_value(f"{where}.{key}", hints[key], value)
                if fields.get(key) == section:
                    out[key] = value
        elif section == command:
            if not isinstance(values, dict):
                raise SoftpromptError(f"{where}: expected a mapping of the command's flags")
            for key, value in values.items():
                if key not in flags:
                    raise SoftpromptError(f"{where}: unknown key {key!r} (flags of {command} that no config "
                                          f"section holds: {', '.join(sorted(flags)) or 'none'})")
                out[key] = value
        elif section.endswith("Config"):  # meant as a section, but misspelt
            raise SoftpromptError(f"--config {path}: unknown section {section!r} (known: {', '.join(SECTIONS)})")
    return out


def apply_config(parser: argparse.ArgumentParser, command: str, args: argparse.Namespace) -> None:
    """Make the values of `args.config` the defaults of the command's `parser`."""
    parser.set_defaults(**command_defaults(read_config(args.config), args.config, command, args))
