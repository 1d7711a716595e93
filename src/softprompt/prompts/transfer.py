"""Prompt transfer (`train --init-from SOURCE`): what a source-task prompt can start, checked from
its prompt_config.json alone, before any model or data loads.

A soft prompt ([P, H] input embeddings) starts a soft prompt (copied), the input embedding of
P-tuning's and residual prompt tuning's encoders, or a prefix (run through the frozen model: its
per-layer keys and values are exactly what a prefix is; prefix.prompt_key_values). A prefix starts
only a prefix: per-layer keys and values have no input embeddings to go back to.

The source's virtual-token count is adopted while --virtual-tokens stays at its default (the
dataclass cannot tell a default from the same value typed, so the default means "not given");
any other value must equal it. Resolved, --init-from reads as `--init file --init-file SOURCE`
(the machinery that loads it, prompt.init_prompt and each method's setup), with init_from kept so
that run_config.json and the saved prompt record the source.

No torch here: flags.check_train runs these checks before the command's module is imported.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from ..core.config import PromptConfig
from ..core.utils import SoftpromptError, read_json, short
from .recorded import read_meta

FLAG = "--init-from"
# --method -> the source kinds it can start from
STARTS = {"prompt": ("prompt",), "ptuning": ("prompt",), "residual": ("prompt",), "prefix": ("prompt", "prefix")}
DEFAULT_P = PromptConfig.__dataclass_fields__["virtual_tokens"].default


def source_meta(spec: str) -> dict[str, Any]:
    """The source's prompt_config.json; a missing folder or file is one line naming the flag."""
    try:
        return read_meta(spec)
    except SoftpromptError as e:
        raise SoftpromptError(f"{FLAG} {short(spec)}: {e}") from None


def check_kind(meta: dict[str, Any], spec: str, method: str) -> str:
    kind = meta.get("kind", "prompt")  # no kind: a soft prompt written before kinds existed
    if method not in STARTS:
        raise SoftpromptError(f"{FLAG} starts a prompt; --method {method} trains no prompt")
    if kind not in STARTS[method]:
        if kind == "prefix":
            raise SoftpromptError(f"{FLAG} {short(spec)} is a prefix (per-layer keys and values), which cannot start "
                                  f"--method {method}: a deep prompt has no input embeddings to go back to; train "
                                  "with --method prefix, or start from a soft prompt")
        raise SoftpromptError(f"{FLAG} {short(spec)}: unknown prompt kind {short(kind)}")
    return kind


def adopted_tokens(meta: dict[str, Any], spec: str, asked: int) -> int:
    """The run's P: the source's while --virtual-tokens is at its default, else `asked`, which must match."""
    P = meta.get("num_virtual_tokens")
    if not isinstance(P, int) or isinstance(P, bool) or P < 1:
        return asked  # a bare tensor records none: the loader compares shapes
    if asked not in (DEFAULT_P, P):
        raise SoftpromptError(f"--virtual-tokens {asked} differs from {FLAG} {short(spec)}'s {P} virtual tokens: "
                              f"give --virtual-tokens {P}, or leave it out to adopt the source's")
    return P


def local_geometry(model: str) -> dict[str, Any] | None:
    """The base's config.json when --model is a local folder holding one (cheap to read), else None."""
    path = Path(model).expanduser() / "config.json"
    if not path.is_file():
        return None
    cfg = read_json(path)
    return cfg if isinstance(cfg, dict) else None


def check_base(meta: dict[str, Any], spec: str, model: str) -> None:
    """A source recorded for another geometry than a local --model's config.json is refused before the
    model loads; other bases are checked once loaded (prompt.load_source)."""
    from ..base.families import geometry_mismatches

    cfg = local_geometry(model)
    if cfg is None:
        return
    recorded = {k: meta[k] for k in ("hidden_size", "num_layers", "num_key_value_heads", "head_dim")
                if isinstance(meta.get(k), int)}
    differ = geometry_mismatches(recorded, cfg)
    if differ:
        raise SoftpromptError(f"{FLAG} {short(spec)} was trained for another base ({short(meta.get('model'))}): "
                              f"{', '.join(differ)}")


def adopt(pcfg: PromptConfig, method: str, model: str) -> PromptConfig:
    """`pcfg` with --init-from resolved (init file, the source as init_file, its P), every check that
    needs no model done; unchanged without --init-from."""
    if not pcfg.init_from:
        return pcfg
    meta = source_meta(pcfg.init_from)
    check_kind(meta, pcfg.init_from, method)
    check_base(meta, pcfg.init_from, model)
    P = adopted_tokens(meta, pcfg.init_from, pcfg.virtual_tokens)
    return replace(pcfg, init="file", init_file=pcfg.init_from, virtual_tokens=P)
