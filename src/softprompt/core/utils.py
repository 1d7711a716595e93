"""Small shared helpers: the user-facing error type, atomic output, hashing and seeding.

Every problem caused by the user's input is raised as `SoftpromptError`; the CLI prints its
message as one line and exits non-zero. What the user may want to change while the work goes on is
a `SoftpromptWarning` (Python's warnings: filterable by Python callers, one line in the CLI).
Outputs are written to a temporary sibling first and renamed into place, so an interrupted or
failed command never leaves a half-written artifact.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import reprlib
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:  # torch is imported where it is used: the CLI reads this module before any command runs
    import torch


class SoftpromptError(Exception):
    """An error the user can fix: bad path, column, shape, file... The message says what and where."""


class SoftpromptWarning(UserWarning):
    """A choice the user may want to change, though the work goes on: a slow dtype, skipped rows."""


def warn(message: str) -> None:
    """Warn in the CLI's words (flags); the CLI prints it as one line, the Python API rewords it."""
    warnings.warn(message, SoftpromptWarning, stacklevel=3)


def live_output() -> bool:
    """Progress bars can redraw in place: stderr is a terminal, or this is a notebook. Written to a log
    file (nohup, a batch job), each redraw was kept, carriage returns and cursor moves glued to the
    lines around them."""
    return "ipykernel" in sys.modules or bool(getattr(sys.stderr, "isatty", lambda: False)())


def default_mode(path: str | os.PathLike) -> None:
    """Give `path` the mode a plain open() or mkdir() would under the umask (0666 or 0777 masked):
    tempfile's mkstemp/mkdtemp and safetensors' writer make 0600 files and 0700 folders, which other
    users of a shared prompt or run folder could not read."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary folder beside `dest`; on success it replaces `dest` in one rename. A `dest`
    that is not a folder is refused (a file is never renamed away), and nothing is left beside it.
    A `dest` that is a link names the folder written: the link stays, as `train --out` writes through it."""
    dest = Path(dest).resolve() if Path(dest).is_symlink() else Path(dest)
    if dest.exists() and not dest.is_dir():
        raise SoftpromptError(f"{dest} is a file, not a folder")
    if dest.exists() and not overwrite:
        raise SoftpromptError(f"{dest} already exists")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):  # "File exists: a" named no folder of the path
        raise SoftpromptError(f"cannot write {dest}: a file stands where a folder of its path goes") from None
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
        for sub, _, files in os.walk(tmp):  # what the caller wrote, by whatever writer, as open() would
            default_mode(sub)
            for name in files:
                if not os.path.islink(os.path.join(sub, name)):
                    default_mode(os.path.join(sub, name))
        if dest.exists():
            if not overwrite or not dest.is_dir():
                raise SoftpromptError(f"{dest} already exists" if dest.is_dir() else f"{dest} is a file, not a folder")
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
            try:
                os.replace(dest, old)  # a folder onto the empty one mkdtemp made
            except OSError:
                old.rmdir()
                raise
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        failed = write_error(e, dest)
        if failed is not None:
            raise failed from None
        raise


def probe_write(folder: Path, prefix: str) -> None:
    """Create and remove one empty file in `folder` (named `prefix`...), so that a folder that opens but
    takes no file (a read-only mount, a full disk) raises its OSError before any long work."""
    fd, name = tempfile.mkstemp(prefix=prefix, dir=folder)
    os.close(fd)
    os.unlink(name)


def write_error(e: BaseException, path: str | os.PathLike) -> SoftpromptError | None:
    """A tensor writer's failure to write under `path` as the user's one-line error; None for any other
    exception. torch.save raises RuntimeError ("unexpected pos", "PytorchStreamWriter failed") and
    safetensors a SafetensorError ("I/O error: No space left on device") where open() would raise the
    OSError that the CLI prints as one line: a full disk, a quota, a file size limit."""
    text = str(e).strip()
    torch_write = isinstance(e, RuntimeError) and any(
        w in text for w in ("unexpected pos", "PytorchStreamWriter failed", "file write failed"))
    if not torch_write and not (type(e).__name__ == "SafetensorError" and "I/O error" in text):
        return None
    first = (text.splitlines() or [type(e).__name__])[0]
    return SoftpromptError(f"cannot write {path} (is the disk full?): {first[:200]}")


def check_apart(out: str | os.PathLike, flag: str, sources: tuple[str | os.PathLike, ...]) -> None:
    """Refuse an output folder that is a source the command reads, is inside one or holds one: replacing
    it would destroy what is read (local paths only; a Hub source is never written)."""
    o = Path(out).resolve()
    for src in sources:
        s = Path(src).resolve()
        if o == s or s in o.parents or o in s.parents:
            where = "is" if o == s else ("is inside" if s in o.parents else "holds")
            raise SoftpromptError(f"{flag} {out} {where} the source {src}: writing it would destroy what is read; "
                                  f"choose another {flag}")


def check_dest(out: str | os.PathLike, flag: str, overwrite: bool, own: set[str],
               sources: tuple[str | os.PathLike, ...] = ()) -> None:
    """Refuse an output folder whose replacement would destroy something, before any work: a file;
    a source the command reads, or a folder inside one or holding one (always); a folder that holds
    files, unless `overwrite`; and even then one holding files this command does not write (`own`)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SoftpromptError(f"{flag} {out} is a file, not a folder")
    check_apart(out, flag, sources)
    used = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if used and not overwrite:
        raise SoftpromptError(f"{flag} {out} already holds files ({', '.join(used[:3])}): pass --overwrite to "
                              f"replace them, or choose another {flag}")
    foreign = [name for name in used if name not in own]
    if foreign:
        raise SoftpromptError(f"{flag} {out} holds {', '.join(foreign[:3])}, which this command does not write; "
                              f"not deleting it (remove it yourself, or choose another {flag})")


def short(value: Any, limit: int = 80) -> str:
    """repr(value) cut to about `limit` characters, for error messages: a value may be megabytes."""
    r = reprlib.Repr()
    r.maxstring = r.maxother = r.maxlong = limit
    r.maxlevel, r.maxlist, r.maxdict, r.maxtuple, r.maxset = 3, 6, 6, 6, 6
    text = r.repr(value)
    return text if len(text) <= 2 * limit else text[:2 * limit] + "..."


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


def missing_file(path: str | os.PathLike, what: str = "file") -> SoftpromptError:
    """What to say of a path where a file goes and none is: missing, or a pipe (`<(...)`, /dev/stdin),
    which can be read once, where softprompt reads its files twice (a check before the model loads,
    then the run's own read)."""
    p = Path(path)
    if p.exists() and not p.is_file() and not p.is_dir():
        return SoftpromptError(f"{what} {path} is a pipe or a device, not a file: softprompt reads a file twice (a "
                               "check before the model loads, then the run), so write it to a file first")
    return SoftpromptError(f"missing {what}: {path}")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise missing_file(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SoftpromptError(f"corrupt JSON in {path}: {e}") from None
    except UnicodeDecodeError as e:  # JSON is UTF-8 (RFC 8259)
        raise SoftpromptError(f"corrupt JSON in {path}: not UTF-8 text (byte {e.start})") from None
    except RecursionError:
        raise SoftpromptError(f"corrupt JSON in {path}: nested too deeply") from None


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


def dtype_name(dtype: Any) -> str:
    """A torch dtype as its --dtype flag names it: torch.bfloat16 -> bfloat16."""
    return str(dtype).removeprefix("torch.")


def count_params(module: "torch.nn.Module", trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def local_path(name: str) -> str:
    """An existing local file or folder given relative as its absolute path, anything else (a Hub id,
    a missing path) as given: a run's record then replays, and a prompt names its base, from any folder."""
    return os.path.abspath(name) if name and not os.path.isabs(name) and os.path.exists(name) else name


def cache_root() -> Path:
    """softprompt's own cache (the built-in model's conversion): SOFTPROMPT_CACHE, else ~/.cache/softprompt."""
    return Path(os.environ.get("SOFTPROMPT_CACHE", Path.home() / ".cache" / "softprompt"))


def local_patterns(names: str) -> str:
    """Comma-separated local files or glob patterns, each made absolute (a pattern may match nothing yet)."""
    return ",".join(os.path.abspath(os.path.expanduser(n.strip())) for n in names.split(",") if n.strip())


def same_model(a: str, b: str) -> bool:
    """Two names for one model or data source: equal, or one folder or file reached by two paths."""
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()
