"""Data: read rows from a local CSV/TSV/JSON/JSONL file or a Hub dataset, format them with a
template, and tokenise them once into Examples (batching.py batches them).

Three ways to turn a row into a training example:
- plain language modelling: `--text-col C`, or a `--template` with no target; loss on every token;
- input/target: `--template` plus `--target` (also a template); loss on the target tokens only;
- classification: `--template` plus `--labels a,b`; the row's label word is the target.
"""
from __future__ import annotations

import csv
import io
import json
import random
import re
import string
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .batching import Example
from .classify import label_text
from .config import DataConfig, is_unicode
from .utils import SoftpromptError

LOCAL_EXTS = {".csv", ".tsv", ".json", ".jsonl"}


# ---------------------------------------------------------------- reading rows

def read_rows(spec: str, split: str = "train") -> list[dict[str, Any]]:
    """Rows of a local file (by extension) or of a Hub dataset split."""
    if not spec:
        raise SoftpromptError("no data given: pass --data FILE_OR_DATASET_ID")
    path = Path(spec).expanduser()
    if path.suffix.lower() in LOCAL_EXTS or path.exists() or spec.startswith((".", "/", "~")):
        if not path.is_file():
            raise SoftpromptError(f"missing data file: {path}")
        rows = _read_local(path)
    else:
        rows = _read_hub(spec, split)
    if not rows:
        raise SoftpromptError(f"no rows in {spec}")
    return rows


def _read_local(path: Path) -> list[dict[str, Any]]:
    ext = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SoftpromptError(f"{path} is not UTF-8 text: {e}") from None
    if ext in (".csv", ".tsv"):
        # TSV as in GLUE: no quoting at all (sentences contain bare quotes).
        csv.field_size_limit(sys.maxsize)  # some prompts run to 100k+ characters
        buf = io.StringIO(text, newline="")  # quoted fields may span lines
        reader = (csv.DictReader(buf, delimiter="\t", quoting=csv.QUOTE_NONE) if ext == ".tsv"
                  else csv.DictReader(buf))
        try:
            rows = [dict(r) for r in reader]
        except csv.Error as e:
            raise SoftpromptError(f"corrupt {ext[1:].upper()} file {path}: {e}") from None
        if reader.fieldnames is None:
            raise SoftpromptError(f"no rows in {path}")
        bad = [i + 1 for i, r in enumerate(rows) if None in r or any(v is None for v in r.values())]
        if bad and len(bad) == len(rows):
            raise SoftpromptError(f"{path}: wrong number of fields in every row (expected {len(reader.fieldnames)})")
        if bad:  # real files have the odd broken row (awesome-chatgpt-prompts row 210): skip it, say so
            print(f"[softprompt] warning: skipped {len(bad)} row(s) of {path} with the wrong number of fields "
                  f"(rows {bad[:5]})", file=sys.stderr)
            rows = [r for r in rows if None not in r and all(v is not None for v in r.values())]
        return rows
    if ext == ".jsonl":
        rows = []
        for i, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise SoftpromptError(f"corrupt JSONL in {path} line {i + 1}: {e}") from None
    else:
        try:
            obj = json.loads(text) if text.strip() else []
        except json.JSONDecodeError as e:
            raise SoftpromptError(f"corrupt JSON in {path}: {e}") from None
        if isinstance(obj, dict):  # {"data": [...]} or {"col": [values...]}
            lists = [v for v in obj.values() if isinstance(v, list)]
            if len(lists) == 1 and all(isinstance(x, dict) for x in lists[0]):
                obj = lists[0]
            elif lists and all(isinstance(v, list) and len(v) == len(lists[0]) for v in obj.values()):
                obj = [dict(zip(obj, vals)) for vals in zip(*obj.values())]
        rows = obj
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise SoftpromptError(f"{path}: expected a list of objects, one per example")
    return rows


def _read_hub(spec: str, split: str) -> list[dict[str, Any]]:
    import datasets

    try:
        ds = datasets.load_dataset(spec, split=split)
    except (ConnectionError, OSError, datasets.exceptions.DatasetNotFoundError, ValueError) as e:
        raise SoftpromptError(
            f"cannot load dataset {spec!r} (split {split!r}) from the Hugging Face Hub (unreachable or "
            f"unknown: {str(e).splitlines()[0][:160]}); pass a local .csv/.tsv/.json/.jsonl file instead") from None
    return [dict(r) for r in ds]


# ---------------------------------------------------------------- formatting

def unescape(s: str) -> str:
    # Shells pass "\n" literally inside double quotes; templates mean a newline.
    return s.replace("\\n", "\n").replace("\\t", "\t")


def template_fields(template: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


def chat_wrap(tok, text: str) -> str:
    """`text` as the user's turn in the model's chat template, ready for the assistant's answer."""
    if not getattr(tok, "chat_template", None):
        raise SoftpromptError("--chat: this model's tokenizer has no chat template")
    return tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)


@dataclass
class Formatter:
    """Turns rows into tokenised Examples according to a DataConfig."""

    cfg: DataConfig
    tok: Any
    label_words: list[str] = field(default_factory=list)
    truncated: int = 0

    def __post_init__(self):
        c = self.cfg = replace(self.cfg)  # the config's own checks again, in case a field was changed since
        self.template = unescape(c.template)
        self.target = unescape(c.target)
        self.label_words = c.label_words
        if not (self.template or c.text_col):
            raise SoftpromptError("say how to read each row: --text-col COLUMN or --template 'text with {column}'")
        self.needed = self.columns()

    @property
    def task(self) -> str:
        return "classify" if self.label_words else ("target" if self.target else "lm")

    def columns(self) -> list[str]:
        """The columns every row needs (a template field's name up to any .attribute or [index])."""
        cols = [re.split(r"[.\[]", f)[0] for f in template_fields(self.template) + template_fields(self.target)]
        if self.cfg.text_col and not self.template:
            cols.append(self.cfg.text_col)
        if self.label_words:
            cols.append(self.cfg.label_col)
        return cols

    def check_columns(self, row: dict, where: str) -> None:
        for col in self.needed:
            if col not in row:
                have = ", ".join(map(repr, list(row)[:10])) + (", ..." if len(row) > 10 else "")
                raise SoftpromptError(f"column {col!r} not found in {where} (columns: {have})")

    def input_text(self, row: dict, where: str = "") -> str:
        if not self.template:
            return str(row[self.cfg.text_col])
        return self.fill(self.template, "--template", row, where)

    def fill(self, template: str, flag: str, row: dict, where: str) -> str:
        """`template` with `row`'s values; a value the template cannot format is the user's error."""
        try:
            return template.format_map({k: "" if v is None else v for k, v in row.items()})
        except (KeyError, IndexError, ValueError, TypeError, AttributeError) as e:
            raise SoftpromptError(f"{flag} {template!r} at {where}: {type(e).__name__}: {e}") from None

    def render_input(self, text: str) -> str:
        return chat_wrap(self.tok, text) if self.cfg.chat else text

    def tokenize_rendered(self, rendered: str) -> list[int]:
        # A chat template already holds its special tokens.
        return self.tok(rendered, add_special_tokens=not self.cfg.chat).input_ids

    def label_text(self, k: int, rendered_input: str) -> str:
        return label_text(self.label_words[k], rendered_input)

    def label_index(self, value: Any, where: str) -> int:
        s = str(value).strip()
        if s in self.label_words:
            return self.label_words.index(s)
        try:
            k = int(float(s))
        except (ValueError, OverflowError):  # not a number, or "inf"
            k = -1
        if 0 <= k < len(self.label_words) and float(s) == k:
            return k
        raise SoftpromptError(f"unknown label {value!r} at {where}: expected one of {self.label_words} "
                              f"or an index 0..{len(self.label_words) - 1}")

    def label_ids(self, rendered_input: str = " ") -> list[list[int]]:
        return [self.tok(self.label_text(k, rendered_input), add_special_tokens=False).input_ids
                for k in range(len(self.label_words))]

    def candidates(self, ex: Example) -> list[list[int]]:
        """Token ids of every label word as they would follow `ex`'s input."""
        return self.label_ids(self.render_input(ex.text))

    def encode(self, row: dict, where: str = "") -> Example:
        self.check_columns(row, where)
        text = self.input_text(row, where)
        if not is_unicode(text):  # JSON may escape a lone surrogate ("\ud800"); no tokenizer takes one
            raise SoftpromptError(f"the input at {where} is not valid Unicode text: {text!r}")
        max_len = self.cfg.max_length
        if self.task == "lm":
            ids = self.tokenize_rendered(self.render_input(text))
            if len(ids) > max_len:
                ids, self.truncated = ids[:max_len], self.truncated + 1
            return Example(ids, 0, -1, text)
        rendered = self.render_input(text)
        prompt_ids = self.tokenize_rendered(rendered)
        label = -1
        if self.task == "classify":
            label = self.label_index(row[self.cfg.label_col], where)
            tgt = self.tok(self.label_text(label, rendered), add_special_tokens=False).input_ids
        else:
            tgt_text = self.fill(self.target, "--target", row, where)
            if not is_unicode(tgt_text):
                raise SoftpromptError(f"the target at {where} is not valid Unicode text: {tgt_text!r}")
            tgt = self.tok(tgt_text, add_special_tokens=False).input_ids
            if self.tok.eos_token_id is not None:
                tgt = tgt + [self.tok.eos_token_id]  # teach the model to stop
        if len(prompt_ids) + len(tgt) > max_len:
            self.truncated += 1
            tgt = tgt[: max(1, max_len // 2)]
            # Keep the end of the input: it holds the cue ("Sentiment:") the target follows.
            prompt_ids = prompt_ids[len(prompt_ids) + len(tgt) - max_len:] if max_len > len(tgt) else []
        if not tgt:
            raise SoftpromptError(f"empty target at {where}")
        return Example(prompt_ids + tgt, len(prompt_ids), label, text)

    def encode_rows(self, rows: list[dict], where: str, numbers: list[int] | None = None) -> list[Example]:
        """Examples of `rows`; `numbers`: their 1-based row numbers in the file, for error messages."""
        if not rows:
            raise SoftpromptError(f"no rows in {where}")
        out = []
        for i, r in enumerate(rows):
            ex = self.encode(r, f"{where} row {numbers[i] if numbers else i + 1}")
            if len(ex.ids) == 0:
                continue
            out.append(ex)
        if not out:
            raise SoftpromptError(f"no usable examples in {where} (every row tokenised to nothing)")
        return out


def load_splits(cfg: DataConfig, tok, seed: int = 0) -> tuple[Formatter, list[Example], list[Example]]:
    """Formatter plus tokenised (train, eval) examples; eval is --eval-data or a held-out fraction."""
    fmt = Formatter(cfg, tok)
    rows = read_rows(cfg.data, cfg.split)
    order = list(range(len(rows)))  # shuffled as row numbers, so that errors name the file's rows
    random.Random(seed).shuffle(order)
    if cfg.eval_data:
        eval_rows = read_rows(cfg.eval_data, "validation" if cfg.split == "train" else cfg.split)
        eval_order = list(range(len(eval_rows)))
    elif cfg.eval_fraction > 0:
        n_eval = max(1, int(round(len(rows) * cfg.eval_fraction)))
        if n_eval >= len(rows):
            raise SoftpromptError(f"{cfg.data} has {len(rows)} rows: too few to hold out --eval-fraction {cfg.eval_fraction}")
        eval_rows, eval_order, order = rows, order[:n_eval], order[n_eval:]
    else:
        eval_rows, eval_order = [], []
    if cfg.limit:
        order = order[: cfg.limit]
    if cfg.eval_limit:
        eval_order = eval_order[: cfg.eval_limit]
    train = fmt.encode_rows([rows[i] for i in order], cfg.data, [i + 1 for i in order])
    evals = fmt.encode_rows([eval_rows[i] for i in eval_order], cfg.eval_data or f"{cfg.data} (held out)",
                            [i + 1 for i in eval_order]) if eval_order else []
    return fmt, train, evals
