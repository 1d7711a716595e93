"""Experiment trackers (`train --report-to`): TensorBoard, Weights & Biases and MLflow through
accelerate's trackers, beside metrics.jsonl, which is written either way.

Each is an optional extra (`pip install 'softprompt[tensorboard]'`, `[wandb]`, `[mlflow]`), asked
for by name before the model loads. The run's config (run_config.json, flattened to
`Section.field` keys) goes in as hyperparameters; every metrics.jsonl record is logged at its
step as `split/metric` (train/loss, train/lr, eval/accuracy, eval_untuned/loss, ...). TensorBoard
writes its event files into the run folder, OUT/tensorboard; W&B and MLflow keep their own
settings (WANDB_MODE, MLFLOW_TRACKING_URI), with the run folder as W&B's directory and MLflow's
artifact location.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..core.utils import SoftpromptError

KNOWN = ("tensorboard", "wandb", "mlflow")
FOLDER = "tensorboard"  # OUT/tensorboard: accelerate's run name under the project folder


def names(report_to: str) -> list[str]:
    """The trackers `--report-to` asks for; `all` is every one of them that is installed."""
    from accelerate.utils import is_mlflow_available, is_tensorboard_available, is_wandb_available

    installed = {"tensorboard": is_tensorboard_available(), "wandb": is_wandb_available(),
                 "mlflow": is_mlflow_available()}
    asked = [t.strip() for t in report_to.split(",") if t.strip() not in ("", "none")]
    if "all" in asked:
        found = [t for t in KNOWN if installed[t]]
        if not found:
            raise SoftpromptError("--report-to all: none of tensorboard, wandb, mlflow is installed "
                                  "(pip install 'softprompt[tensorboard]')")
        return found
    for t in asked:
        if not installed[t]:
            raise SoftpromptError(f"--report-to {t}: {t} is not installed (pip install 'softprompt[{t}]')")
    return list(dict.fromkeys(asked))


def flatten(config: dict[str, Any]) -> dict[str, Any]:
    """run_config.json as the flat scalar mapping TensorBoard's hparams take: `TrainConfig.lr`, ...;
    None and lists as text."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for sub, v in items:
            name = f"{key}.{sub}" if sub is not None else key
            out[name] = v if isinstance(v, (bool, int, float, str)) else str(v)
    return out


def start(acc, trackers: list[str], out: Path, config: dict[str, Any]) -> None:
    """Open the trackers of an Accelerator made with `log_with=trackers, project_dir=out`."""
    if not trackers:
        return
    kwargs = {"wandb": {"dir": str(out), "name": out.name}, "mlflow": {"logging_dir": str(out / "mlflow")}}
    try:
        acc.init_trackers(FOLDER, config=flatten(config), init_kwargs={t: kwargs[t] for t in trackers if t in kwargs})
    except Exception as e:  # a tracker's own failure (no login, unreachable server) is the user's to fix
        raise SoftpromptError(f"--report-to {','.join(trackers)}: cannot start the tracker "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None


def log(acc, trackers: list[str], rec: dict[str, Any]) -> None:
    """One metrics.jsonl record, its numbers as `split/name` at its step."""
    if trackers:
        split = rec.get("split", "train")
        values = {f"{split}/{k}": v for k, v in rec.items()
                  if k not in ("step", "split") and isinstance(v, (int, float)) and not isinstance(v, bool)}
        acc.log(values, step=rec.get("step"))


def finish(acc) -> None:
    """Close the trackers, and only them: accelerate's end_training would also destroy the process
    group, which the other processes' barrier after this still needs (the command line ends the
    group: cli.end_process_group)."""
    for tracker in acc.trackers:
        tracker.finish()
