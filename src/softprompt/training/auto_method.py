"""What `train --method auto` (the default) trains: a prefix (per-layer keys and values, P-tuning v2),
unless the run asks for something only a soft prompt has.

Why a prefix: in bench/methods.py (SmolLM2-135M; SST-2, AG News and RTE; 300 steps at batch 8;
README "The prompt methods against PEFT's") it was the best prompt method by 3 to 11 points on AG
News and RTE and within a point of the best on SST-2, and published results agree across tasks and
sizes (P-tuning v2; PEFT's MetaMathQA benchmark: prefix 41.6% against prompt tuning's 23.4-34.3%).
On language modelling (bench/lm_methods.py, train's defaults with keep-best) the two were within
0.035 nats of held-out loss, each ahead on one of two corpora: no reason there to choose otherwise.
Where a flag needs a soft prompt's input embeddings (an --init a prefix does not take, a forward
path other than the kv path), auto is `prompt`, so no command that worked under the old default
breaks. The choice and its reason are recorded in run_config.json (`method_reason`).
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..core.config import PromptConfig, TrainConfig
from ..core.utils import read_json
from .rundir import RUN_CONFIG

AUTO = "prefix"
# Kept here rather than imported from prefix_method (PrefixTuning.inits) and forward.paths (DEEP_PATHS):
# `train` checks its flags before torch loads, and those modules import it.
PREFIX_INITS = ("auto", "text", "random", "file")  # what a prefix starts from; vocab and labels are token embeddings
DEEP_PATHS = ("auto", "kv")  # the --forward-path values a prefix takes: the others prepend input embeddings


def recorded_method(out: Path) -> str | None:
    """The method a run folder's run_config.json records (a run to --resume), if any."""
    path = out / RUN_CONFIG
    try:
        method = read_json(path).get("TrainConfig", {}).get("method") if path.is_file() else None
    except (OSError, ValueError, AttributeError):
        return None  # rundir.check_same_run names what is wrong with it
    return method if isinstance(method, str) and method != "auto" else None


def resolve_method(pcfg: PromptConfig, tcfg: TrainConfig) -> tuple[TrainConfig, str]:
    """(tcfg with --method auto replaced by what it means here, and why); other methods unchanged."""
    if tcfg.method != "auto":
        return tcfg, "as requested"
    if tcfg.resume and (was := recorded_method(Path(tcfg.out))):
        return replace(tcfg, method=was), "auto: the method of the run being resumed"
    if tcfg.prefix_projection:
        return replace(tcfg, method="prefix"), "auto: --prefix-projection trains a prefix"
    if not tcfg.prefix_scaled_steps:
        return replace(tcfg, method="prefix"), "auto: --no-prefix-scaled-steps trains a prefix"
    if pcfg.init not in PREFIX_INITS:
        return replace(tcfg, method="prompt"), f"auto: --init {pcfg.init} starts a soft prompt only"
    if tcfg.forward_path not in DEEP_PATHS:
        return (replace(tcfg, method="prompt"),
                f"auto: --forward-path {tcfg.forward_path} prepends a soft prompt's input embeddings")
    return replace(tcfg, method=AUTO), "auto: a prefix, the method that measured best (bench/methods.py)"
