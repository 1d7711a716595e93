"""Config files: `--config FILE.yaml|json` on every command, flags given on the command line
overriding the file.

A file holds sections named after the config dataclasses, as a run's `run_config.json` writes
them (`ModelConfig`, `DataConfig`, `PromptConfig`, `TrainConfig`, ...), each mapping field names
to values, so `softprompt train --config RUN/run_config.json --out NEW` replays a run; so do a
prompt's prompt_config.json and a comparison's compare.json, which hold them under `config`. A section
named after the command holds its other flags (`eval: {prompt: runs/sst2, batch_size: 32}`).
The file's values become the command's defaults, which is why a flag always wins. Other top-level
keys are ignored (run_config.json also records what ran: device, world_size, ...), and so are the
sections of config classes this command does not take; an unknown key inside a section, a value
of the wrong type, or a misspelt `...Config` section is refused with one line naming it. A run's
record replays as that run ran, even where a default has changed since (config.as_it_ran).
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
from pathlib import Path
from typing import Any, get_type_hints

from .core.config import (CompareConfig, DataConfig, GenerateConfig, ModelConfig, PromptConfig, ServeConfig,
                          TrainConfig, as_it_ran)
from .core.utils import SoftpromptError, short

SECTIONS = {cls.__name__: cls for cls in (ModelConfig, DataConfig, PromptConfig, TrainConfig, CompareConfig,
                                          GenerateConfig, ServeConfig)}
# Flag dests whose values are local paths: a file's leading ~ is the home folder, as a shell reads it in a flag
# (without it `out: ~/runs/x` made a folder named ~ in the working one, while `data: ~/x.csv` read the home's).
HOME_KEYS = {"model", "data", "eval_data", "init_file", "init_from", "out", "prompt", "prompts", "prompt_dir",
             "peft_dir", "base_model", "local_dir", "output_path", "include_path"}
# Namespace entries that are no flag of the command's own.
NOT_FLAGS = {"cmd", "config", "config_fields", "version"}  # version: the top-level --version
# A config file holds tens of values; nested aliases (a "billion laughs" file) expand to billions.
MAX_YAML_NODES = 10_000


def yaml_size(node, seen: dict[int, int], open_: set[int], cap: int) -> int:
    """How many values a composed YAML node stands for once its aliases are expanded (at most
    `cap + 1`: counting stops there); memoised per node, so a bomb costs its file's size to count."""
    key = id(node)
    if key in seen:
        return seen[key]
    if key in open_:  # an alias inside its own anchor: infinite
        return cap + 1
    open_.add(key)
    n = 1
    children = node.value if isinstance(node.value, list) else []
    for child in children:
        for sub in (child if isinstance(child, tuple) else (child,)):  # a mapping's (key, value) pairs
            n += yaml_size(sub, seen, open_, cap)
            if n > cap:
                break
        if n > cap:
            break
    open_.discard(key)
    seen[key] = n = min(n, cap + 1)
    return n


def load_yaml(text: str, path: Path) -> Any:
    """yaml.safe_load, refusing a file whose aliases expand beyond MAX_YAML_NODES values."""
    import yaml

    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is not None and yaml_size(node, {}, set(), MAX_YAML_NODES) > MAX_YAML_NODES:
            raise SoftpromptError(f"--config {path}: its aliases expand to more than {MAX_YAML_NODES} values; "
                                  "write the values out instead of nesting aliases")
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SoftpromptError(f"--config: corrupt YAML in {path}: {' '.join(str(e).split())[:300]}") from None


def read_config(path: str | Path) -> dict[str, Any]:
    """The mapping a .yaml/.yml/.json file holds."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_file():  # a folder, or a FIFO that reading would wait on
        raise SoftpromptError(f"--config {path} is not a regular file")
    if not path.is_file():
        raise SoftpromptError(f"--config: missing file {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        obj = load_yaml(text, path)
    elif path.suffix.lower() == ".json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise SoftpromptError(f"--config: corrupt JSON in {path}: {e}") from None
    else:
        raise SoftpromptError(f"--config {path}: expected a .yaml, .yml or .json file")
    if not isinstance(obj, dict):
        raise SoftpromptError(f"--config {path}: expected a mapping of sections (ModelConfig, DataConfig, ...)")
    nested = obj.get("config")
    if isinstance(nested, dict) and not SECTIONS.keys() & obj.keys() and SECTIONS.keys() & nested.keys():
        return nested  # compare.json and prompt_config.json record their run's sections under `config`
    return obj


def check_value(where: str, typ: type, value: Any) -> None:
    """A file's value has its field's type. A string is read as argv's would be (YAML reads 1e-2 as
    one), except for a switch, where "false" would be true; an int is a float."""
    if isinstance(value, str) and typ in (int, float):
        try:
            typ(value)
            return
        except ValueError:
            raise SoftpromptError(f"{where}: expected {typ.__name__}, got {short(value)}") from None
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = {bool: isinstance(value, bool), int: number and isinstance(value, int), float: number,
          str: isinstance(value, str), list: isinstance(value, list)}.get(typ, True)
    if not ok:
        raise SoftpromptError(f"{where}: expected {typ.__name__}, got {type(value).__name__} {short(value)}")


def check_flag_value(where: str, action: argparse.Action | None, value: Any) -> None:
    """A command section's value as its flag takes it: a switch a bool, a repeated or multi-valued flag
    a list (each item as one value), any other flag one value of its type (a string where the flag
    parses one: argparse's `type` reads a string default as it reads argv)."""
    if action is None:
        return
    one = action.type if action.type in (int, float) else str
    if action.nargs == 0:  # --flag / --no-flag
        check_value(where, bool, value)
    elif action.nargs in ("+", "*") or isinstance(action.default, list):
        if not isinstance(value, list):
            raise SoftpromptError(f"{where}: expected a list, got {type(value).__name__} {short(value)}")
        for i, item in enumerate(value):
            check_value(f"{where}.{i}", one, item)
    else:
        check_value(where, one, value)


def command_defaults(cfg: dict[str, Any], path: str, command: str, args: argparse.Namespace,
                     actions: dict[str, argparse.Action] | None = None,
                     commands: tuple[str, ...] = ()) -> dict[str, Any]:
    """The flag defaults `cfg` (a read config file) sets for `command`, whose first parse gave `args`;
    `actions` (flag dest -> its argparse action) checks the values of the command's own section;
    `commands`, every command's name, tells a misspelt command section from the file's notes."""
    fields: dict[str, str] = getattr(args, "config_fields", {})  # flag dest -> its config class (config.add_args)
    flags = set(vars(args)) - NOT_FLAGS - set(fields)
    out: dict[str, Any] = {}
    for section, values in cfg.items():
        where = f"--config {path}: {section}"
        meant = meant_section(section)
        if section in SECTIONS:
            cls = SECTIONS[section]
            if not isinstance(values, dict):
                raise SoftpromptError(f"{where}: expected a mapping of {cls.__name__}'s fields")
            hints = get_type_hints(cls)
            known = {f.name for f in dataclasses.fields(cls)}
            for key, value in values.items():
                if key not in known:
                    raise SoftpromptError(f"{where}: unknown key {short(key)} (known: {', '.join(sorted(known))})")
                check_value(f"{where}.{key}", hints[key], value)
                if fields.get(key) == section:
                    out[key] = value
        elif section == command:
            out.update(command_section(values, where, command, flags, actions or {}))
        elif section.endswith("Config") or (meant and isinstance(values, dict) and section not in commands):
            # meant as a section, but misspelt
            raise SoftpromptError(f"--config {path}: unknown section {short(section)} ({f'{meant}? ' if meant else ''}"
                                  f"known: {', '.join(SECTIONS)})")
        elif isinstance(values, dict) and section not in commands and misspelt(section, commands):
            # `evaluate:` or `EVAL:` for eval's section: ignored, eval scored the untuned model
            raise SoftpromptError(f"--config {path}: unknown section {short(section)} (a command's flags sit under "
                                  f"its name: {', '.join(commands)})")
    return out


def command_section(values: Any, where: str, command: str, flags: set[str],
                    actions: dict[str, argparse.Action]) -> dict[str, Any]:
    """The command's own section as flag defaults (dest -> value), each key a flag's name as it is
    spelt (generate's `template` for --template, whose dest is input_template) or its dest."""
    if not isinstance(values, dict):
        raise SoftpromptError(f"{where}: expected a mapping of the command's flags")
    spelt = {o[2:].replace("-", "_"): a.dest for a in actions.values() for o in a.option_strings
             if o.startswith("--") and not o.startswith("--no-") and a.dest in flags}  # --no-x: x's false
    out = {}
    for key, value in values.items():
        dest = key if key in flags else spelt.get(key, key)
        if dest not in flags:
            names = sorted(set(spelt) | (flags - set(spelt.values()))) if spelt else sorted(flags)
            raise SoftpromptError(f"{where}: unknown key {short(key)} (flags of {command} that no config "
                                  f"section holds: {', '.join(names) or 'none'})")
        check_flag_value(f"{where}.{key}", actions.get(dest), value)
        out[dest] = value
    return out


def meant_section(section: str) -> str | None:
    """The config section a key spelt otherwise names (`data_config`, `modelconfig`, `Data`), if any."""
    bare = section.lower().replace("_", "").replace("-", "").removesuffix("config")
    return next((name for name in SECTIONS if name.lower().removesuffix("config") == bare), None)


def misspelt(section: str, commands: tuple[str, ...]) -> bool:
    """A mapping named like a command, but not one: other top-level keys are the file's own notes."""
    return bool(difflib.get_close_matches(section.lower().replace("_", "-"), commands, n=1, cutoff=0.6))


# Flags that describe the file's own data source: a --data or --eval-data typed over the file names another
# source, which these would misread (examples/sst2.yaml's eval_split is the Hub dataset's, and its offline
# override gives a local dev file, read whole).
SOURCE_BOUND = {"data": ("split", "data_config", "data_files", "eval_split"), "eval_data": ("eval_split",)}


def drop_overridden(defaults: dict[str, Any], args: argparse.Namespace, actions: dict[str, argparse.Action]) -> None:
    """Leave out of `defaults` what the command line replaces (`args`: the first parse, with the
    parser's own defaults): a repeated flag's list (argparse would append the typed values to the
    file's), and the file's flags bound to a data source typed over it, unless typed too."""
    def typed(dest: str) -> bool:
        return dest in actions and getattr(args, dest, None) != actions[dest].default

    for dest in [d for d in defaults if typed(d) and isinstance(actions[d].default, list)]:
        del defaults[dest]  # --mix typed is the mixture, not more tasks after the file's
    for source, bound in SOURCE_BOUND.items():
        if typed(source) and getattr(args, source) != defaults.get(source):
            for dest in bound:
                if not typed(dest):
                    defaults.pop(dest, None)


def at_home(value: Any) -> Any:
    """A path (or a list of them) with a leading ~ read as the home folder."""
    if isinstance(value, list):
        return [at_home(v) for v in value]
    return os.path.expanduser(value) if isinstance(value, str) and value.startswith("~") else value


def apply_config(parser: argparse.ArgumentParser, command: str, args: argparse.Namespace,
                 commands: tuple[str, ...] = ()) -> None:
    """Make the values of `args.config` the defaults of the command's `parser`."""
    actions = {a.dest: a for a in parser._actions}  # argparse keeps its actions in no public attribute
    defaults = command_defaults(as_it_ran(read_config(args.config)), args.config, command, args, actions, commands)
    defaults = {k: at_home(v) if k in HOME_KEYS else v for k, v in defaults.items()}
    drop_overridden(defaults, args, actions)
    parser.set_defaults(**defaults)
    for dest in defaults:  # a flag the command requires (lm-eval's --tasks, ensemble's DIRs), given by the file
        actions[dest].required = False


def parse_leniently(top: argparse.ArgumentParser, parser: argparse.ArgumentParser,
                    argv: list[str]) -> argparse.Namespace:
    """argv parsed by `top` with the flags its command's `parser` requires left optional: the first
    look, for --config, whose file may give them."""
    required = [a for a in parser._actions if a.required]
    for a in required:
        a.required = False
    try:
        return top.parse_args(argv)
    finally:
        for a in required:
            a.required = True
