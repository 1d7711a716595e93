"""What can be told of data before any model loads: every source a run reads is read here as the run
will read it (datasource.py), and what it could not use is one error line naming the first bad row.

Kept apart from datasource.py, which reads rows: a check's rules (which rows the run skips, which it
scores, which split it reads) are the run's, said before minutes of loading a large base.
"""
from __future__ import annotations

import glob
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

from ..core.config import FILE_BUILDERS
from ..core.utils import SoftpromptError, SoftpromptWarning, missing_file
from .datasource import (column_list, column_names, first_row, is_local, local_split_error, read_rows, reading_error,
                         split_spec, take)
from .labels import label_index


def check_files(spec: str, data_files: str) -> None:
    """Each --data-files pattern of a file builder (`--data csv`) matches a file; a Hub dataset's are
    its repository's, looked at when read."""
    if spec not in FILE_BUILDERS:
        return
    patterns = [p.strip() for p in data_files.split(",") if p.strip()]
    if not patterns:
        raise SoftpromptError(f"--data {spec} reads the files that --data-files names: give them "
                              f"(--data-files 'train-*.{spec}')")
    for pattern in patterns:
        if not glob.glob(os.path.expanduser(pattern), recursive=True):
            raise SoftpromptError(f"--data-files {pattern}: no file matches")


def check_source(spec: str, what: str = "--data", columns: list[str] | None = None, split: str = "",
                 config: str = "", split_flag: str = "--split", data_files: str = "",
                 header: list[str] | None = None, labels: tuple[str, list[str]] | None = None,
                 read_split: str = "train", first: int = 0) -> None:
    """What can be told of a data source before any model loads, by reading it as the run will: it
    exists and reads (UTF-8, well-formed, with rows), every row has `columns` (or a `messages` column
    where `columns` is None: no flag says how to read a row), and every label value names a class
    (`labels`: the column and the label words), but in rows the run skips (a null in `columns`).
    `split`: the split asked for (a local file has none), else `read_split` is read; `first` > 0: only
    the first rows in file order are scored (eval --limit), so only they are checked. A Hub dataset or a
    folder goes through `datasets`, which keeps it in its cache for the run's own read; a local file is
    read again by the run (little next to loading a model). `header`: a header-less CSV/TSV's names."""
    if not spec:
        raise SoftpromptError(f"no data given: pass {what} FILE_OR_DATASET_ID")
    name = spec if Path(spec).expanduser().exists() else split_spec(spec, config)[0]
    path = Path(name).expanduser()
    local_file = is_local(name) and not path.is_dir()
    if local_file:
        check_local_file(path, what, split, split_flag, header, data_files)
    with warnings.catch_warnings():  # what the read warns of (a skipped row), the run's own read says
        warnings.simplefilter("ignore", SoftpromptWarning)
        rows = read_rows(spec, split or read_split, config, data_files, header)
    where = str(path) if local_file or path.is_dir() else name
    table = local_file and path.suffix.lower() in (".csv", ".tsv")
    hint = ("; a CSV/TSV file's row 1 names its columns: add one if it holds data, or name them with --columns"
            if table and not header else "")
    check_columns(where, columns, column_names(rows), " row 1" if table and not header else "", hint,
                  "columns named by --columns" if table and header else "columns")
    if isinstance(rows, list) and columns:  # JSON rows each have their own keys (an Arrow table has one schema)
        lacking = next(((i, r) for i, r in enumerate(rows[:first or None]) if not all(c in r for c in columns)), None)
        if lacking is not None:
            i, row = lacking
            check_columns(where, columns, list(row), f" row {i + 1}")
    if labels is not None:
        check_labels(rows, where, *labels, skipped=columns or [], first=first)


def check_local_file(path: Path, what: str, split: str, split_flag: str, header: list[str] | None,
                     data_files: str) -> None:
    """A local file is there and readable, and no flag asks of it what a file read whole cannot do."""
    if not path.is_file():
        raise missing_file(path, "data file")
    if split not in ("", "train"):  # read_rows reads a file whole: --split would be silently ignored
        raise local_split_error(split_flag, split, what, path)
    if data_files:
        raise SoftpromptError(f"--data-files names the files of a builder (--data csv) or of a Hub dataset: {what} "
                              f"{path} is a local file, read whole")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise SoftpromptError(f"cannot read {what} {path}: {e.strerror or e}") from None
    if header and path.suffix.lower() in (".csv", ".tsv"):
        check_header(path, header)


def check_labels(rows: Sequence[dict[str, Any]], where: str, column: str, words: list[str],
                 skipped: list[str], first: int = 0) -> None:
    """Every label value names one of `words` (or is an index into them), as the run reads it: the first
    row that does not is named, but for rows the run skips (a null in a column of `skipped`, the label's
    too); `first` > 0: only the first rows. A table's distinct values are looked at first (Arrow's
    unique), so a valid column costs one pass."""
    if not first:
        values = rows.unique(column) if hasattr(rows, "unique") else {str(r.get(column)) for r in rows}
        try:
            for value in values:
                if value is not None and value != "None":
                    label_index(words, value, where)
            return
        except SoftpromptError:
            pass  # the row to name, below
    n = min(first, len(rows)) if first else len(rows)
    for i, row in enumerate(take(rows, list(range(n)))):
        if all(row.get(c) is not None for c in {*skipped, column}):
            label_index(words, row[column], f"{where} row {i + 1}")


def check_header(path: Path, header: list[str]) -> None:
    """A header-less file's first row has as many fields as --columns names (a row equal to the names is
    a header, which the read skips, so that one --columns serves a headed --eval-data too)."""
    first = first_row(path)
    if first is not None and len(first) != len(header):
        raise SoftpromptError(f"{path} row 1 has {len(first)} field(s), and --columns names {len(header)} "
                              f"({', '.join(header)})")


def check_columns(where: str | Path, columns: list[str] | None, found: list[str], row: str = "",
                  hint: str = "", named: str = "columns") -> None:
    """`columns` are all among `found`; None: no flag says how to read a row, so a `messages` column must be."""
    if columns is None and "messages" not in found:
        raise reading_error(where, found)
    missing = [c for c in columns or [] if c not in found]
    if missing:
        raise SoftpromptError(f"column {missing[0]!r} not found in {where}{row} ({named}: {column_list(found)}){hint}")
