"""Small shared helpers: the user-facing error type, atomic output, hashing and seeding.

Every problem caused by the user's input is raised as `SoftpromptError`; the CLI prints its
message as one line and exits non-zero. Outputs are written to a temporary sibling first and
renamed into place, so an interrupted or failed command never leaves a half-written artifact.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:  # torch is imported where it is used: the CLI reads this module before any command runs
    import torch


class SoftpromptError(Exception):
    """An error the user can fix: bad path, column, shape, file... The message says what and where."""


def default_mode(path: str | os.PathLike) -> None:
    """Give `path` the mode a plain open() or mkdir() would under the umask (0666 or 0777 masked):
    tempfile's mkstemp/mkdtemp and safetensors' writer make 0600 files and 0700 folders, which other
    users of a shared prompt or run folder could not read."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary folder beside `dest`; on success it replaces `dest` in one rename."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
        for sub, _, files in os.walk(tmp):  # what the caller wrote, by whatever writer, as open() would
            default_mode(sub)
            for name in files:
                if not os.path.islink(os.path.join(sub, name)):
                    default_mode(os.path.join(sub, name))
        if dest.exists():
            if not overwrite:
                raise SoftpromptError(f"{dest} already exists")
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        default_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def round_floats(obj: Any, digits: int = 6) -> Any:
    """`obj` with every float rounded to `digits` significant digits, for printing and summaries
    (float32 sums carry noise in the eighth digit: 0.925000011920929)."""
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}")
    if isinstance(obj, dict):
        return {k: round_floats(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [round_floats(v, digits) for v in obj]
    return obj


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise SoftpromptError(f"missing file: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SoftpromptError(f"corrupt JSON in {path}: {e}") from None


def weights_hash(model: "torch.nn.Module") -> str:
    """sha256 over every parameter and buffer, in name order: proves the base model is untouched."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        if hasattr(t, "full_tensor"):  # a layer sharded with --shard fsdp: the whole tensor (all processes call)
            t = t.full_tensor()
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy())  # a buffer: hashed without a copy
    return h.hexdigest()


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    torch.manual_seed(seed)
    with contextlib.suppress(ImportError):
        import numpy as np

        np.random.seed(seed)


def count_params(module: "torch.nn.Module", trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
