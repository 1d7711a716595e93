"""Every figure in the README's tables comes from a committed result file: the check.

The convention (stated in the README above its benchmark tables): a figure in a table is a
markdown link to a JSON file under bench/results/ whose fragment is a key path into it,

    [1.76x](bench/results/train_speed_smollm2-135m-instruct_cpu.json#tasks.0.speedup)

- the key path is the keys from the top, joined by dots; a list index is a number (`tasks.0`);
  a key with spaces or brackets is percent-encoded (`paths.peft%20%28adapter%20per%20batch%29`);
- `PATH/PATH` or `PATH/NUMBER` shows a quotient: a ratio the bench did not store, or a change of
  unit (`cells.3.train_extra_mb/1024` for GiB from MiB);
- the link text holds exactly one number, shown as the value rounded to the digits shown (`1.76x`
  is 1.755 to 1.765; `1.3e-16` rounds the mantissa); a `%` after it shows the value times 100.

Outside tables, prose may give figures unlinked, but a link into a result file's keys must show its
value as above: a rerun that changes a JSON cannot leave the sentence quoting it stale.

The file must record where it came from: `command`, `commit` and `machine`, or, for files written
before results recorded their command and commit, `machine` and a `provenance_note` saying what is
known. In a table, the header row and the first column name what is measured; every other cell
that holds a digit outside its links (dtype names such as bf16 aside) is an unbacked figure.

    python bench/readme_figures.py          # prints each problem; exit status 1 if any
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\[([^\]]*)\]\(([^)\s]*)\)")
NUMBER = re.compile(r"(?<![\w.])([-+]?\d+(?:\.(\d+))?(?:[eE]([-+]?\d+))?)(\s*%)?")
# Digits that name a setting, not a measured figure.
NOT_FIGURES = re.compile(r"\b(bf16|fp16|fp32|fp64|float16|float32|float64|bfloat16|[48]-?bit)\b")


def tables(text: str) -> list[tuple[int, list[list[str]]]]:
    """(first line number, rows of cells) of every markdown table, its separator row left out."""
    out, rows, start = [], [], 0
    for n, line in enumerate(text.splitlines() + [""], 1):
        if line.lstrip().startswith("|"):
            if not rows:
                start = n
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                rows.append(cells)
        elif rows:
            out.append((start, rows))
            rows = []
    return out


def lookup(doc, path: str):
    """The value at a dotted key path (list indices as numbers); KeyError naming the missing key."""
    cur = doc
    for key in path.split("."):
        key = unquote(key)
        if isinstance(cur, list) and key.isdigit() and int(key) < len(cur):
            cur = cur[int(key)]
        elif isinstance(cur, dict) and key in cur:
            cur = cur[key]
        else:
            raise KeyError(f"no key {key!r} in {path!r}")
    return cur


def value_of(doc, fragment: str) -> float:
    """The number a fragment names: one key path, or a quotient of a key path and a path or number."""
    parts = fragment.split("/")
    if len(parts) > 2 or not parts[0]:
        raise KeyError(f"fragment {fragment!r} is not PATH or PATH/PATH or PATH/NUMBER")
    num = lookup(doc, parts[0])
    if len(parts) == 1:
        den = 1.0
    else:
        den = float(parts[1]) if re.fullmatch(r"[\d.]+", parts[1]) else lookup(doc, parts[1])
    if isinstance(num, bool) or isinstance(den, bool) or not isinstance(num, (int, float)) \
            or not isinstance(den, (int, float)):
        raise KeyError(f"{fragment!r} is not a number ({num!r})")
    return num / den


def shows(text: str, value: float) -> str:
    """'' when `text` shows `value` rounded as displayed, else what is wrong."""
    found = NUMBER.findall(text)
    if len(found) != 1:
        return f"link text {text!r} holds {len(found)} numbers, not one"
    shown, decimals, exponent, percent = found[0]
    v = value * (100 if percent else 1)
    half = 0.5 * 10.0 ** (int(exponent or 0) - len(decimals))
    if math.isfinite(v) and abs(v - float(shown)) <= half * (1 + 1e-9):
        return ""
    return f"{text!r} does not show {v:.6g}"


def provenance_problem(doc) -> str:
    if not isinstance(doc, dict) or "machine" not in doc:
        return "records no machine"
    if "provenance_note" in doc or ("command" in doc and "commit" in doc):
        return ""
    return "records no command and commit (nor a provenance_note)"


def check_link(text: str, target: str, root: Path) -> list[str]:
    """Problems with one figure link: its target, its file's provenance, the value it shows."""
    path, _, fragment = target.partition("#")
    if not path.startswith("bench/results/") or not path.endswith(".json") or not fragment:
        return [f"link {target!r} is not bench/results/FILE.json#KEY.PATH"]
    try:
        doc = json.loads((root / path).read_text())
    except (OSError, ValueError) as e:
        return [f"{path}: {type(e).__name__}: {e}"]
    problems = [f"{path} {why}"] if (why := provenance_problem(doc)) else []
    try:
        if why := shows(text, value_of(doc, fragment)):
            problems.append(f"{why} ({target})")
    except (KeyError, ValueError) as e:
        problems.append(f"{path}: {e.args[0] if e.args else e}")
    return problems


def check_cell(cell: str, root: Path) -> list[str]:
    problems = [p for text, target in LINK.findall(cell) for p in check_link(text, target, root)]
    rest = NOT_FIGURES.sub("", LINK.sub("", cell))
    if re.search(r"\d", rest):
        problems.append(f"unlinked figure in {cell!r}")
    return problems


def check(text: str, root: Path = ROOT) -> list[str]:
    """Every problem with the README's figures, as 'line N: ...': in tables, every figure must be a
    link that shows its file's value; in prose, every link into a result file's keys must."""
    problems = []
    in_table: set[int] = set()
    for start, rows in tables(text):
        in_table.update(range(start, start + len(rows) + 1))
        for k, row in enumerate(rows[1:], 1):
            line = start + k + 1  # the header, then the separator row
            for cell in row[1:]:
                problems += [f"line {line}: {p}" for p in check_cell(cell, root)]
    for n, line in enumerate(text.splitlines(), 1):
        if n in in_table:
            continue
        for label, target in LINK.findall(line):
            if target.startswith("bench/results/") and "#" in target:
                problems += [f"line {n}: {p}" for p in check_link(label, target, root)]
    return problems


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()  # --help; any other flag is refused
    found = check((ROOT / "README.md").read_text())
    print("\n".join(found) or "every README figure is backed by its result file")
    sys.exit(1 if found else 0)
