"""Where rows come from: a local CSV/TSV/JSON/JSONL file (read into a list of dicts), or, through
`datasets`, a Hub dataset (`NAME`, `NAME:CONFIG`), a builder over files (`parquet` with
`--data-files`), a local folder of data files, or a local `.parquet`/`.arrow` file.

What `datasets` loads stays an Arrow table, memory-mapped from its cache: a `datasets.Dataset`
is returned as it is (it has `len()` and builds a row dict only when asked), so a large file is
never held a second time as Python lists. formatting.py indexes either kind the same way.
"""
from __future__ import annotations

import csv
import glob
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..core.config import FILE_BUILDERS
from ..core.utils import SoftpromptError, SoftpromptWarning, warn
from .labels import label_index

LOCAL_EXTS = {".csv", ".tsv", ".json", ".jsonl"}
ARROW_EXTS = {".parquet", ".arrow"}


def split_spec(spec: str, config: str = "") -> tuple[str, str]:
    """`NAME[:CONFIG]` and --data-config as (name, config); the two must not disagree."""
    name, sep, inline = spec.rpartition(":")
    if sep and config and inline != config:
        raise SoftpromptError(f"--data {spec!r} names config {inline!r} but --data-config says {config!r}")
    return (name, inline or config) if sep else (spec, config)


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


def is_local(spec: str) -> bool:
    path = Path(spec).expanduser()
    return (path.suffix.lower() in LOCAL_EXTS | ARROW_EXTS or path.exists() or spec.startswith((".", "/", "~")))


def read_rows(spec: str, split: str = "train", config: str = "", data_files: str = "",
              header: list[str] | None = None) -> Sequence[dict[str, Any]]:
    """Rows of a local file (by extension), a local folder, or a Hub dataset's split; `header` names the
    columns of a header-less CSV/TSV file (--columns)."""
    if not spec:
        raise SoftpromptError("no data given: pass --data FILE_OR_DATASET_ID")
    name, config = (spec, config) if Path(spec).expanduser().exists() else split_spec(spec, config)
    path = Path(name).expanduser()
    if is_local(name) and not path.is_dir():
        if not path.is_file():
            raise SoftpromptError(f"missing data file: {path}")
        ext = path.suffix.lower()
        if ext not in LOCAL_EXTS | ARROW_EXTS:
            raise SoftpromptError(f"{path}: a file of type {ext or '(none)'!r} is not read (.csv, .tsv, .json, .jsonl, "
                                  ".parquet, .arrow are); `datasets` builders read others: `--data text --data-files "
                                  "FILE` (a row per line), `--data json --data-files FILE` (JSON by another name), "
                                  "`--data csv --data-files FILE.csv.gz` (compressed)")
        rows = (read_arrow(path) if ext in ARROW_EXTS else read_table(path, header) if ext in (".csv", ".tsv")
                else read_json_rows(path))
    else:
        rows = read_hub(name, split, config, data_files)
    if not len(rows):
        raise SoftpromptError(f"no rows in {spec}")
    return rows


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
        raise SoftpromptError(f"missing data file: {path}")
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
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            first = next((row for row in table_reader(f, path.suffix.lower()) if row), None)
    except (UnicodeDecodeError, csv.Error, OSError):
        return  # the full read says what is wrong, and where
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


def local_split_error(split_flag: str, split: str, what: str, path: str | Path) -> SoftpromptError:
    """A split asked of a local file, which is read whole: for --eval-split of --data, every training row
    would be "held out" (train's check and load_splits', for the Python API, say it alike)."""
    fix = ("give its held-out rows as --eval-data FILE" if (split_flag, what) == ("--eval-split", "--data")
           else f"give the file of the rows you mean as {what}")
    return SoftpromptError(f"{split_flag} {split}: {what} {path} is a local file, read whole (a Hub dataset has "
                           f"splits); {fix}")


def table_reader(f, ext: str, dicts: bool = False, header: list[str] | None = None):
    """CSV, or TSV as in GLUE: no quoting at all (sentences contain bare quotes); rows as lists, or as
    dicts keyed by `header` (None: by row 1)."""
    tsv = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if ext == ".tsv" else {}
    return csv.DictReader(f, fieldnames=header, **tsv) if dicts else csv.reader(f, **tsv)


def read_table(path: Path, header: list[str] | None = None) -> list[dict[str, Any]]:
    """A CSV/TSV file (table_reader), its columns named by row 1 or by `header`. Read from the file as
    it streams, skipping (and naming) rows with the wrong number of fields."""
    csv.field_size_limit(sys.maxsize)  # some prompts run to 100k+ characters
    ext = path.suffix.lower()
    rows, bad = [], []
    try:
        # utf-8-sig: a byte-order mark (Excel's "CSV UTF-8") is not part of the first column's name.
        with open(path, encoding="utf-8-sig", newline="") as f:  # quoted fields may span lines
            reader = table_reader(f, ext, dicts=True, header=header)
            named = 0  # a header row naming the columns as --columns does: skipped, not a row of data
            for i, r in enumerate(reader):
                if header and i == 0 and [str(v).strip() for v in r.values()] == header:
                    named = 1
                elif None in r or any(v is None for v in r.values()):
                    bad.append(i + 1 - named)
                else:
                    rows.append(r)
            fields = reader.fieldnames
    except UnicodeDecodeError as e:
        raise SoftpromptError(f"{path} is not UTF-8 text: {e}") from None
    except csv.Error as e:
        raise SoftpromptError(f"corrupt {ext[1:].upper()} file {path}: {e}") from None
    if fields is None:
        raise SoftpromptError(f"no rows in {path}")
    if bad and not rows:
        raise SoftpromptError(f"{path}: wrong number of fields in every row (expected {len(fields)})")
    if bad:  # real files have the odd broken row (awesome-chatgpt-prompts row 210): skip it, say so
        warn(f"skipped {len(bad)} row(s) of {path} with the wrong number of fields (rows {bad[:5]})")
    return rows


def read_json_rows(path: Path) -> list[dict[str, Any]]:
    """JSONL line by line, or one JSON document: a list of objects, {"data": [...]} or {"col": [...]}."""
    try:
        if path.suffix.lower() == ".jsonl":
            with open(path, encoding="utf-8-sig") as f:
                rows = [parse_line(line, path, i + 1) for i, line in enumerate(f) if line.strip()]
        else:
            text = path.read_text(encoding="utf-8-sig")
            rows = columns_to_rows(json.loads(text) if text.strip() else [])
    except UnicodeDecodeError as e:
        raise SoftpromptError(f"{path} is not UTF-8 text: {e}") from None
    except json.JSONDecodeError as e:
        raise SoftpromptError(f"corrupt JSON in {path}: {e}") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise SoftpromptError(f"{path}: expected a list of objects, one per example")
    return rows


def parse_line(line: str, path: Path, number: int) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise SoftpromptError(f"corrupt JSONL in {path} line {number}: {e}") from None


def columns_to_rows(obj: Any) -> Any:
    if isinstance(obj, dict):  # {"data": [...]} or {"col": [values...]}
        lists = [v for v in obj.values() if isinstance(v, list)]
        if len(lists) == 1 and all(isinstance(x, dict) for x in lists[0]):
            return lists[0]
        if lists and all(isinstance(v, list) and len(v) == len(lists[0]) for v in obj.values()):
            return [dict(zip(obj, vals)) for vals in zip(*obj.values())]
    return obj


def read_arrow(path: Path):
    """A local .arrow file memory-mapped as it is, or a .parquet file through datasets' cache."""
    import datasets

    try:
        if path.suffix.lower() == ".arrow":
            return datasets.Dataset.from_file(str(path))
        return datasets.load_dataset("parquet", data_files=str(path), split="train")
    except Exception as e:  # pyarrow's errors have no common base: any failure here is the file's
        raise SoftpromptError(f"cannot read {path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None


def read_hub(spec: str, split: str, config: str = "", data_files: str = ""):
    """A split of a Hub dataset (or of a builder/folder with --data-files), as an Arrow-backed Dataset."""
    import datasets

    name = spec
    files = [f.strip() for f in data_files.split(",") if f.strip()] or None
    what = f"{name!r} (" + (f"config {config!r}, " if config else "") + f"split {split!r})"
    local = name in FILE_BUILDERS or Path(name).is_dir()
    try:
        ds = datasets.load_dataset(name, config or None, data_files=files, split=split)
    except datasets.exceptions.DatasetBuildError as e:  # files read but not made one table (columns differ...)
        cause = e.__cause__ or e
        why = str(cause).splitlines()[0][:200] if str(cause) else type(cause).__name__
        # Only a cast between the files' schemas is about their columns (a parse error is a file's own).
        shared = ": do its files share their columns?" if type(cause).__name__ == "CastError" else ""
        raise SoftpromptError(f"cannot read {what} as one table of rows ({type(cause).__name__}: {why}){shared}"
                              ) from None
    except StopIteration:  # datasets' json builder on an empty file
        raise SoftpromptError(f"no rows in {what}") from None
    except (ConnectionError, OSError, datasets.exceptions.DatasetNotFoundError, ValueError) as e:
        why = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        if local:  # local files or a local folder of split files: no Hub was asked
            source = f"read the --data-files of {what}" if name in FILE_BUILDERS else f"load the folder {what}"
            raise SoftpromptError(f"cannot {source}: {why}") from None
        raise SoftpromptError(
            f"cannot load dataset {what} from the Hugging Face Hub (unreachable or unknown: {why}); pass a local "
            ".csv/.tsv/.json/.jsonl/.parquet/.arrow file instead") from None
    if local:
        check_utf8(ds, what)
    return ds


def check_utf8(ds, what: str) -> None:
    """pyarrow's JSON reader keeps bytes that are not UTF-8 in a string column, which then fail when a row
    is read, long after the model loaded; a full validation finds them at once (local files only: a Hub
    dataset's may be large, and its parquet files are checked as they are written)."""
    import pyarrow as pa

    try:
        ds.data.table.validate(full=True)
    except pa.ArrowInvalid as e:
        raise SoftpromptError(f"cannot read {what}: {str(e).splitlines()[0][:200]} (is it UTF-8 text?)") from None


def column_list(columns: Iterable[str]) -> str:
    """Columns as an error names them: the first ten, quoted."""
    names = list(columns)
    return ", ".join(map(repr, names[:10])) + (", ..." if len(names) > 10 else "")


def reading_error(where: str | Path, columns: list[str]) -> SoftpromptError:
    """No flag says how to read a row of `where`, and it has no `messages` column: the flags, with its columns."""
    return SoftpromptError(f"say how to read each row of {where} (columns: {column_list(columns)}): --template "
                           "'text with {column}', --text-col COLUMN or --messages-col COLUMN"
                           + (" (and --labels WORD,WORD to classify by its 'label' column)" if "label" in columns
                              else ""))


def column_names(rows: Sequence[dict[str, Any]]) -> list[str]:
    return list(rows.column_names) if hasattr(rows, "column_names") else list(rows[0])


def take(rows: Sequence[dict[str, Any]], order: list[int]) -> Iterable[dict[str, Any]]:
    """The rows at `order`, one at a time (an Arrow dataset reads them in batches)."""
    if hasattr(rows, "select"):
        return iter(rows.select(order)) if order else iter(())
    return (rows[i] for i in order)
