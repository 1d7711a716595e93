"""The forward paths' names and the one function that chooses among them (`--forward-path`).

How a prompt meets the rows (hidden.py, packing.py, cuda_graphs.py):
- packed: prompt and rows as one padding-free sequence;
- graphed: the packed training step replayed as a CUDA graph (GPUs, one process);
- kv: the prompt's keys/values computed once and shared by the rows;
- concat: the prompt prepended to every row, as PEFT does.
`choose_path` turns a request (auto or one of them) into the path taken and the reason, for a
training run (run_config.json records both) or for one batch's forward pass. torch is not
imported here. The names are config.py's FORWARD_PATHS (the flag's choices).
"""
from __future__ import annotations

from typing import Any, NamedTuple

from ..base.families import dense_mask_obstacle, packing_obstacle
from ..core.config import FORWARD_PATHS
from ..core.utils import SoftpromptError


class PathChoice(NamedTuple):
    path: str    # "graphed", "packed", "kv" or "concat"
    reason: str  # why, in words (run_config.json's forward_path_reason)


def right_padded(attention_mask: Any) -> bool:
    """No real token after a pad in any row of attention_mask [B, T]."""
    m = attention_mask.bool()
    return bool(((m.cumsum(1) == m.sum(1, keepdim=True)) | m).all())


def graph_obstacle(model, processes: int, prompt_tuning: bool, method: str | None = None) -> str | None:
    """Why this run's step cannot be a CUDA graph (None when it can); `method`: the training method's
    own reason, if it has one (methods.Method.graph_obstacle)."""
    if model.device.type != "cuda":
        return f"no CUDA device ({model.device.type})"
    if processes > 1:
        return f"{processes} processes (the gradient all-reduce runs outside a graph)"
    if not prompt_tuning:
        return "full fine-tuning (graphs are for the soft prompt's step)"
    if method:
        return method
    return dense_mask_obstacle(model)


DEEP_REASON = "the prompt is per-layer keys and values (a prefix): the rows attend to them as a cache"
DEEP_PATHS = ("auto", "kv")  # the --forward-path values a prefix takes: the others prepend input embeddings


def choose_path(model, requested: str = "auto", *, rows: Any = None, processes: int = 1, prompt_tuning: bool = True,
                checkpointing: bool = False, deep: bool = False, method_obstacle: str | None = None) -> PathChoice:
    """The path `--forward-path requested` takes, and why.

    Without `rows`: a training run's path (`processes`, `prompt_tuning` and `checkpointing`
    describe the run). With `rows`, the attention mask [B, T] of one batch: that batch's forward
    pass, which is never a graph ("graphed" is a training-step mode; a single pass packs as auto
    does) and packs only right-padded rows. `deep`: the prompt has no input embeddings (a prefix),
    which only the kv path takes. `method_obstacle`: why the training method's step cannot be a graph
    (an encoder's prompt), or None."""
    if requested not in FORWARD_PATHS:
        raise SoftpromptError(f"unknown forward path {requested!r}: use {', '.join(FORWARD_PATHS)}")
    if deep:
        if requested not in DEEP_PATHS:
            raise SoftpromptError(f"--forward-path {requested}: a prefix prompt has no input embeddings to pack or "
                                  "prepend; use --forward-path kv or auto")
        return PathChoice("kv", DEEP_REASON if requested == "auto" else "as requested")
    packing = packing_obstacle(model)
    if rows is not None:
        choice = batch_path(model, requested, rows)
    elif requested in ("kv", "concat"):
        choice = PathChoice(requested, "as requested")
    elif requested == "packed":
        if packing:
            raise SoftpromptError(f"--forward-path packed: {packing}; use --forward-path kv or auto")
        choice = PathChoice("packed", "as requested")
    else:
        graphs = graph_obstacle(model, processes, prompt_tuning, method_obstacle)
        if requested == "graphed":
            if graphs:
                raise SoftpromptError(f"--forward-path graphed: {graphs}; use --forward-path auto")
            choice = PathChoice("graphed", "as requested")
        elif graphs is None:
            choice = PathChoice("graphed", "CUDA device: the packed step replayed as one CUDA graph (a small model's "
                                           "step on a GPU is bound by launching its kernels from Python)")
        elif packing:
            choice = PathChoice("kv", f"{packing}: the prompt's keys/values computed once and shared by the rows")
        else:
            choice = PathChoice("packed", f"prompt and rows as one padding-free sequence; not graphed: {graphs}")
    # transformers' checkpointed layers drop the cache that carries the prompt's keys
    if checkpointing and choice.path == "kv":
        choice = PathChoice("concat", f"{choice.reason}; --gradient-checkpointing: concat (checkpointed layers take "
                                      "no prompt cache)")
    return choice


def batch_path(model, requested: str, rows: Any) -> PathChoice:
    packing = packing_obstacle(model)
    packs = packing is None and right_padded(rows)
    if requested in ("auto", "graphed"):
        return (PathChoice("packed", "prompt and rows as one padding-free sequence") if packs
                else PathChoice("kv", f"{packing or 'the rows are not right-padded'}: the prompt's keys/values "
                                      "computed once and shared by the rows"))
    if requested == "packed" and not packs:
        why = packing or "the rows are not right-padded"
        raise SoftpromptError(f"--forward-path packed: {why}; use --forward-path kv or auto")
    return PathChoice(requested, "as requested")
