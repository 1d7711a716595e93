"""The `softprompt serve` command: its flags (`add_arguments`) and what it does (`run`).

Serve many soft prompts from one frozen model over HTTP: OpenAI-compatible /v1/completions and
/v1/chat/completions (model = prompt name), /v1/classify, /v1/models, /health, /metrics; API
docs at /docs. Needs the serve extra. This module imports neither fastapi nor the model, so the
CLI can list the command without them.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
from dataclasses import replace
from pathlib import Path

from ..core.config import ModelConfig, ServeConfig, add_args, from_args
from ..core.utils import SoftpromptError
from ..prompts.recorded import base_flags, fill_base, read_meta


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_args(parser, ModelConfig)
    base_flags(parser)  # the first --prompt's
    add_args(parser, ServeConfig)
    parser.add_argument("--prompt", action="append", default=[], metavar="NAME=DIR",
                        help="a prompt folder to serve under NAME (repeatable)")


def run(args: argparse.Namespace) -> int:
    """Serve the prompts from one frozen model over HTTP until interrupted."""
    require_extra()
    prompts = parse_prompt_specs(args.prompt)
    # Each folder's record read before the model loads (a typo in the third), its hidden size checked
    # against the base's config where that is on this machine (registry.add checks it again, loaded).
    metas = {path: read_meta(path) for path in prompts.values()}
    fill_base(args, next(iter(prompts.values()), ""))
    mcfg, scfg = from_args(ModelConfig, args), from_args(ServeConfig, args)
    from ..base.families import config_geometry
    from ..prompts.peft_io import model_config
    from ..prompts.prompt import check_width

    width = config_geometry(model_config(mcfg.model))["hidden_size"]
    for path, meta in metas.items():
        if isinstance(width, int) and isinstance(meta.get("hidden_size"), int):
            check_width(meta["hidden_size"], width, f"prompt {path}", meta.get("model"))
    if not scfg.admin_token and os.environ.get("SOFTPROMPT_ADMIN_TOKEN"):
        scfg = replace(scfg, admin_token=os.environ["SOFTPROMPT_ADMIN_TOKEN"])
    from ..base.models import load_model
    from .app import check_config
    from .runner import listen, serve

    check_config(scfg)  # before the model loads
    sock = listen(scfg.host, scfg.port)  # a port in use fails here, not after the model has loaded
    model, tok = load_model(mcfg)
    # Clients pass this as `model` for no prompt: a Hub id or the built-in name as is, a local path's last part.
    local = Path(mcfg.model).expanduser().exists()
    serve(model, tok, prompts, scfg, Path(mcfg.model).name if local else mcfg.model, sock)
    return 0


def parse_prompt_specs(specs: list[str]) -> dict[str, str]:
    """`NAME=DIR` pairs from repeated --prompt flags."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SoftpromptError(f"--prompt {spec!r}: expected NAME=DIR")
        if name in out:
            raise SoftpromptError(f"--prompt {name!r} given twice")
        out[name] = path
    return out


def require_extra() -> None:
    """Fail in one line, before any model loads, when the serve extra is not installed."""
    missing = [m for m in ("fastapi", "uvicorn", "prometheus_client") if importlib.util.find_spec(m) is None]
    if missing:
        raise SoftpromptError(f"softprompt serve needs {' and '.join(missing)}: pip install 'softprompt[serve]'")
