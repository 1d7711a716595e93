"""Where rows come from: a local CSV/TSV/JSON/JSONL file (read into a list of dicts), or, through
`datasets`, a Hub dataset (`NAME`, `NAME:CONFIG`), a builder over files (`parquet` with
`--data-files`), a local folder of data files, or a local `.parquet`/`.arrow` file.

What `datasets` loads stays an Arrow table, memory-mapped from its cache: a `datasets.Dataset`
is returned as it is (it has `len()` and builds a row dict only when asked), so a large file is
never held a second time as Python lists. formatting.py indexes either kind the same way.
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..core.config import FILE_BUILDERS
from ..core.utils import SoftpromptError, missing_file, warn

LOCAL_EXTS = {".csv", ".tsv", ".json", ".jsonl"}
ARROW_EXTS = {".parquet", ".arrow"}
DATASET_METADATA = {"dataset_info.json", "dataset_infos.json", "state.json"}  # datasets' own, not rows


def split_spec(spec: str, config: str = "") -> tuple[str, str]:
    """`NAME[:CONFIG]` and --data-config as (name, config); the two must not disagree."""
    name, sep, inline = spec.rpartition(":")
    if sep and config and inline != config:
        raise SoftpromptError(f"--data {spec!r} names config {inline!r} but --data-config says {config!r}")
    return (name, inline or config) if sep else (spec, config)


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
            raise missing_file(path, "data file")
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


def first_row(path: Path) -> list[str] | None:
    """A CSV/TSV file's first non-blank row as its fields; None when there is none or it does not read
    (the full read says what is wrong, and where)."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            return next((row for row in table_reader(f, path.suffix.lower()) if row), None)
    except (UnicodeDecodeError, csv.Error, OSError):
        return None


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
    if Path(name).is_dir() and not files:
        check_one_kind(Path(name))
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


def check_one_kind(folder: Path) -> None:
    """datasets reads the files of a folder's commonest type and skips the others without a word (a
    folder of a.csv and b.jsonl gave a.csv's rows alone): a folder of data files of several types is
    refused, naming one of each."""
    card = folder / "README.md"
    if card.is_file() and "configs:" in card.read_text(errors="replace"):  # its card names the files to read
        return
    kinds: dict[str, str] = {}
    for f in sorted(folder.rglob("*")):
        rel = f.relative_to(folder)
        ext = ".json" if f.suffix.lower() == ".jsonl" else f.suffix.lower()  # one builder reads both
        if f.is_file() and ext in LOCAL_EXTS | ARROW_EXTS | {".txt"} and not rel.parts[0].startswith(".") \
                and f.name not in DATASET_METADATA:
            kinds.setdefault(ext, str(rel))
    if len(kinds) > 1:
        raise SoftpromptError(f"the folder {folder} holds data files of several types ({', '.join(kinds.values())}), "
                              "and only those of one type would be read: give one file, or --data-files naming "
                              "files of one type")


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
