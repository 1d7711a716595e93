"""The run folder `train --out` writes: its files, the rule for reusing one, the metrics log, the
resumable checkpoint and the loss plot.

A folder that holds anything is never reused silently: `--resume` continues the run in it,
`--overwrite` replaces a previous run (all of its files, so no old checkpoint is left beside a new
prompt), and anything else is refused before any work starts.
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

from ..core.config import as_it_ran, flag, unescape
from ..core.utils import SoftpromptError, atomic_dir, check_apart, probe_write, read_json, same_model, short
from ..prompts.hub import local_sources

CHECKPOINT = "checkpoint"
METRICS = "metrics.jsonl"
RUN_CONFIG = "run_config.json"
# Flags that say how a run is carried out, not what it computes: a resumed run may change them.
HOW_FLAGS = {"device", "out", "resume", "overwrite", "report_to", "log_every", "save_every", "eval_untuned",
             "forward_path", "gradient_checkpointing"}
# Fields that hold a local path, which the configs record as absolute (core.utils.local_path).
PATH_FIELDS = ("model", "data", "eval_data", "init_file", "init_from")
# Everything a run writes into its folder (the prompt or the fine-tuned model, records, checkpoint).
RUN_FILES = {"prompt.safetensors", "prompt_config.json", "run_config.json", METRICS, "summary.json", "loss.png",
             CHECKPOINT, "model", "tensorboard", "wandb", "mlflow",  # the last three: --report-to's trackers
             "encoder.safetensors"}  # --keep-encoder's (encoder_method.ENCODER_FILE)


def check_out(out: Path, resume: bool, overwrite: bool, sources: tuple[str, ...] = (), held: bool = False) -> None:
    """Refuse a used --out unless told what to do with it, one that another train holds, and one that
    is, holds or lies inside a prompt the run starts from (`sources`); before any work, so nothing is
    lost. `held`: this run holds the folder's RunLock already (on its main process)."""
    if out.exists() and not out.is_dir():
        raise SoftpromptError(f"--out {out} is a file, not a folder")
    check_apart(out, "--out", local_sources(*sources))
    check_not_owned(out)
    if not held and out.is_dir() and in_use(out):  # before "holds files": --overwrite is no advice for a live run
        raise in_use_error(out)
    used = out.is_dir() and any(out.iterdir())
    if resume:
        if saved_checkpoint(out) is None:
            raise SoftpromptError(f"--resume: no checkpoint in {out / CHECKPOINT}")
    elif used and not overwrite:
        if saved_checkpoint(out) is None:  # an interrupted run before its first checkpoint, say: --resume cannot help
            raise SoftpromptError(f"--out {out} already holds files (a previous run, with no checkpoint to resume?): "
                                  "pass --overwrite to replace it, or choose another --out")
        raise SoftpromptError(f"--out {out} already holds files (a previous run?): pass --resume to continue it, "
                              "--overwrite to replace it, or choose another --out")
    elif used:
        foreign = sorted(p.name for p in out.iterdir() if not _is_run_file(p.name))
        if foreign:
            raise SoftpromptError(f"--overwrite: {out} holds {', '.join(foreign[:3])}, which no run writes; "
                                  "not deleting it (remove it yourself, or choose another --out)")


def check_not_owned(out: Path) -> None:
    """Refuse an --out that is, or lies inside, a folder another run writes whole (its checkpoint at
    each save, any of its RUN_FILES on --overwrite): that run would delete this one without a word."""
    path = out.resolve()
    owned = next((a for a in (path, *path.parents) if a.name in RUN_FILES and (a.parent / RUN_CONFIG).is_file()),
                 None)
    if owned is not None:
        raise SoftpromptError(f"--out {out} lies inside {owned}, which the run in {owned.parent} replaces (its "
                              f"{owned.name}/ at each save or on --overwrite): choose an --out outside it")


def in_use(out: Path) -> bool:
    """Another process holds `out`'s RunLock (a train running there)."""
    try:
        fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)  # releases the shared lock taken to look


def in_use_error(out: Path) -> SoftpromptError:
    return SoftpromptError(f"--out {out} is in use by another train run: wait for it to end, or choose another --out")


class RunLock:
    """An exclusive lock on the run folder (flock on the folder itself, so no lock file is left in it
    or beside it): a second `train` on the same --out fails at once instead of mixing its files with
    the first's. Released by `release()` or when the process ends; a folder this lock created and
    nothing was written into is removed again."""

    def __init__(self, out: Path):
        self.out, self.created, self.fd = out, not out.exists(), None
        try:
            out.mkdir(parents=True, exist_ok=True)
            fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as e:
            raise SoftpromptError(f"--out {out}: cannot create or open the folder ({e.strerror or e})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise in_use_error(out) from None
        self.fd = fd
        try:  # a folder that opens but takes no file (a read-only mount) failed only after the model loaded
            probe_write(out, f".{RUN_CONFIG}.probe-")  # named as a run file's sibling, should it be left
        except OSError as e:
            self.release(failed=True)
            raise SoftpromptError(f"--out {out}: cannot write into the folder ({e.strerror or e})") from None

    def release(self, failed: bool = False) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
            if failed and self.created and not any(self.out.iterdir()):
                self.out.rmdir()

    def __del__(self):
        self.release()


def check_same_run(out: Path, configs: dict[str, dict[str, Any]],
                   asked: dict[str, dict[str, Any]] | None = None, rows: tuple[int, int] | None = None) -> None:
    """--resume continues the run in `out` as it was defined: refuse any change of what it computes
    (data, template, labels, prompt, rate, schedule...), naming every changed flag, and data that now
    gives other (training, held-out) `rows`. `configs`: this run's resolved config sections, as
    run_config.json records them; `asked`: the same before `auto` was resolved, so that a value auto
    chose for the changed run is said to be auto's choice."""
    asked = asked or {}
    path = out / RUN_CONFIG
    if not path.is_file():  # a run from before run_config.json: nothing to compare with
        return
    recorded = read_json(path)
    if not isinstance(recorded, dict):
        raise SoftpromptError(f"--resume: {path} must hold a JSON object")
    recorded = as_it_ran(recorded)
    changed = [change(k, v, was[k], asked.get(section, {}).get(k, v))
               for section, fields in configs.items() if isinstance(was := recorded.get(section), dict)
               for k, v in fields.items() if k not in HOW_FLAGS and k in was and not same_value(k, v, was[k], recorded)]
    if changed:
        raise SoftpromptError(f"--resume: the run in {out} was defined otherwise: {'; '.join(changed)}; resume it with "
                              f"its own settings (`softprompt train --config {path} --resume --out {out}`) "
                              "or start a new --out")
    had = (recorded.get("train_examples"), recorded.get("eval_examples"))
    if rows is not None and all(isinstance(n, int) for n in had) and had != rows:
        raise SoftpromptError(f"--resume: the data now gives {rows[0]} training and {rows[1]} held-out rows, and the "
                              f"run in {out} had {had[0]} and {had[1]}: its files changed since; start a new --out")


def change(key: str, now: Any, was: Any, typed: Any) -> str:
    """One changed flag as the refusal names it; `typed`, the value before auto was resolved, when it
    differs from `now`, chose it."""
    chose = f"; {flag(key)} {short(typed)} chose it for this run" if typed != now else ""
    return f"{flag(key)} {short(now)} (was {short(was)}{chose})"


def same_value(key: str, now: Any, was: Any, recorded: dict[str, Any]) -> bool:
    """A resumed run's field as recorded; --dtype auto also as what it resolved to (the API records a
    loaded model's own dtype, where runs before it recorded auto), a local path by either spelling
    (runs before the configs made them absolute recorded them as typed), and a template with a written
    or a real newline (a flag's "\\n", a config file's or Python's newline: one template)."""
    return (now == was or (key == "dtype" and was == "auto" and recorded.get("dtype") == now)
            or (key in PATH_FIELDS and isinstance(was, str) and same_model(now, was))
            or (key in ("template", "target") and isinstance(now, str) and isinstance(was, str)
                and unescape(now) == unescape(was))
            or (key == "mix" and isinstance(was, list) and len(was) == len(now)
                and all(same_task(n, w, recorded) for n, w in zip(now, was))))


def same_task(now: dict[str, Any], was: Any, recorded: dict[str, Any]) -> bool:
    """One --mix task as recorded, its paths compared as same_value compares the flags'."""
    return isinstance(was, dict) and was.keys() == now.keys() and all(same_value(k, v, was[k], recorded)
                                                                     for k, v in now.items())


def _is_run_file(name: str) -> bool:
    # A run's own files, and the temporary siblings (".prompt.safetensors.tmp", ".checkpoint.tmp-x")
    # that an interrupted write of one of them leaves.
    return name in RUN_FILES or any(name.startswith(f".{f}.") for f in RUN_FILES)


def clear_run(out: Path) -> None:
    """Delete a previous run's files from `out` (check_out has vouched that it holds nothing else)."""
    for p in out.iterdir() if out.is_dir() else []:
        if _is_run_file(p.name):
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def metric_lines(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """A metrics log's (line, record) pairs. A last line cut short (a kill or a full disk mid-write)
    is left out: its step comes after the checkpoint, so it is redone."""
    lines = path.read_text().splitlines() if path.exists() else []
    out = []
    for n, line in enumerate(lines, 1):
        try:
            rec = json.loads(line)
        except ValueError:
            if n == len(lines):
                break
            raise SoftpromptError(f"{path} line {n} is not a JSON record: mend or remove it") from None
        out.append((line, rec if isinstance(rec, dict) else {}))
    return out


def start_metrics(out: Path, keep_until: int | None) -> None:
    """A fresh metrics log, or on resume the old one cut back to the checkpoint's step (the steps
    after it are redone)."""
    path = out / METRICS
    kept = [line for line, rec in (metric_lines(path) if keep_until is not None else [])
            if rec.get("step", 0) <= keep_until]
    path.write_text("".join(line + "\n" for line in kept))


def recorded_evals(out: Path) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(the untuned model's evaluation, the latest one of the prompt) in a resumed run's metrics log,
    which start_metrics cut back to its checkpoint, as the loop made them: the summary and the saved
    prompt keep them when --resume evaluates nothing more (a run resumed after its last step)."""
    untuned = last = None
    for _, rec in metric_lines(out / METRICS):
        scores = {k: v for k, v in rec.items() if k not in ("step", "split", "seconds")}
        if rec.get("split") == "eval_untuned":
            untuned = scores
        elif rec.get("split") == "eval":
            last = scores
    return untuned, last


def append_metrics(out: Path, rec: dict[str, Any]) -> None:
    with open(out / METRICS, "a") as f:
        f.write(json.dumps(rec) + "\n")


def save_checkpoint(out: Path, method, opt, sched, state: dict[str, Any], meta: dict[str, Any]) -> None:
    """The trained part, optimiser, schedule and loop state, replaced in one rename."""
    import torch  # here: check_out runs before anything heavy is imported

    with atomic_dir(out / CHECKPOINT) as tmp:
        method.save_checkpoint(tmp, meta)
        torch.save(opt.state_dict(), tmp / "optimizer.pt")
        torch.save(sched.state_dict(), tmp / "scheduler.pt")
        # Strict JSON (jq, other languages): no best score yet is null, not Python's -Infinity.
        best = None if state["best"] == -math.inf else state["best"]
        (tmp / "state.json").write_text(json.dumps({**state, "best": best}, allow_nan=False))


def killed_saves(out: Path) -> list[Path]:
    """The folders saves of the checkpoint left when killed (atomic_dir's `.checkpoint.tmp-*`, the new
    one, and `.checkpoint.old-*`, the one before), as _is_run_file counts them: the new ones first."""
    return sorted(out.glob(f".{CHECKPOINT}.*"), key=lambda p: (".old-" in p.name, p.name))


def saved_checkpoint(out: Path) -> Path | None:
    """The run's checkpoint folder: `checkpoint/`, or where a save killed between atomic_dir's two
    renames left it (its state.json is written last, so a folder that has one is whole)."""
    whole = [p for p in (out / CHECKPOINT, *killed_saves(out)) if (p / "state.json").is_file()]
    return whole[0] if whole else None


def tidy_checkpoint(out: Path) -> None:
    """Put a checkpoint a killed save left beside `checkpoint/` back in its place, and remove the
    other folders killed saves left (the main process, once every process has loaded it)."""
    found = saved_checkpoint(out)
    if found is not None and found != out / CHECKPOINT and not (out / CHECKPOINT).exists():
        os.replace(found, out / CHECKPOINT)
    for p in killed_saves(out):
        shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(out: Path, method, opt, sched) -> dict[str, Any]:
    """Restore what save_checkpoint wrote; return the loop state (step, best score, ...)."""
    import torch

    ckpt = saved_checkpoint(out) or out / CHECKPOINT
    state = read_json(ckpt / "state.json")
    method.load_checkpoint(ckpt)
    try:
        opt.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
        sched.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
    except (OSError, RuntimeError, ValueError, KeyError, pickle.UnpicklingError) as e:
        raise SoftpromptError(f"--resume: cannot restore the optimiser from {ckpt} "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise SoftpromptError(f"--resume: {ckpt / 'state.json'} holds no step count")
    if state.get("best") is None:  # null: no evaluation yet (older checkpoints wrote -Infinity, which reads as -inf)
        state["best"] = -math.inf
    if sched.last_epoch == state["step"]:  # saved before the schedule was entered one step in (train.make_scheduler)
        sched.last_epoch += 1
    return state


def plotted(out: Path) -> dict[str, Any]:
    """What loss.png draws from a run folder: train and held-out losses of one measure (a run trained on
    the vocabulary loss is compared with the held-out vocabulary loss, not the label-word one), the
    held-out accuracy, and the untuned model's (step 0), under a title naming the method."""
    recs = [json.loads(l) for l in (out / METRICS).read_text().splitlines() if l.strip()]
    record = read_json(out / RUN_CONFIG) if (out / RUN_CONFIG).is_file() else {}
    train_cfg = record.get("TrainConfig", {}) if isinstance(record, dict) else {}
    tr = [r for r in recs if r["split"] == "train"]
    ev = [r for r in recs if r["split"] == "eval"]
    untuned = next((r for r in recs if r["split"] == "eval_untuned"), None)
    key = "lm_loss" if train_cfg.get("loss") == "lm" and ev and "lm_loss" in ev[0] else "loss"
    method, loss = train_cfg.get("method", "prompt"), train_cfg.get("loss", "")
    return {"title": f"{method} training" + (f" ({loss} loss)" if loss else ""),
            "train": [(r["step"], r["loss"]) for r in tr],
            "held_out": [(r["step"], r[key]) for r in ev if key in r],
            "accuracy": [(r["step"], 100 * r["accuracy"]) for r in ev if "accuracy" in r],
            "untuned_accuracy": 100 * untuned["accuracy"] if untuned and "accuracy" in untuned else None}


def plot_metrics(out: Path) -> Path | None:
    """loss.png: training loss and held-out metrics against steps (skipped without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    p = plotted(out)
    fig, ax = plt.subplots(1, 2 if p["accuracy"] else 1, figsize=(10, 4), squeeze=False)
    a = ax[0][0]
    if p["train"]:
        a.plot(*zip(*p["train"]), label="train loss", alpha=0.7)
    if p["held_out"]:
        a.plot(*zip(*p["held_out"]), "o-", label="held-out loss")
    a.set_xlabel("step"), a.set_ylabel("cross-entropy"), a.legend(), a.grid(alpha=0.3)
    a.set_title(p["title"])
    if p["accuracy"]:
        b = ax[0][1]
        b.plot(*zip(*p["accuracy"]), "o-", color="tab:green", label="tuned")
        if p["untuned_accuracy"] is not None:
            b.axhline(p["untuned_accuracy"], ls="--", color="gray", label="untuned")
        b.set_xlabel("step"), b.set_ylabel("held-out accuracy (%)"), b.legend(), b.grid(alpha=0.3)
    fig.tight_layout()
    tmp = out / ".loss.png.tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out / "loss.png")
    return out / "loss.png"
