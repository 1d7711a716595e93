"""Data: rows (datasource.py reads them from files or the Hub) formatted with a template and
tokenised once into Examples (batching.py batches them).

Four ways to turn a row into a training example:
- plain language modelling: `--text-col C`, or a `--template` with no target; loss on every token;
- input/target: `--template` plus `--target` (also a template); loss on the target tokens only;
- classification: `--template` plus `--labels a,b`; the row's label word is the target;
- chat: a `messages` column (`--messages-col`), through the chat template, loss on the assistant
  turns only (chat.py).
"""
from __future__ import annotations

import functools
import random
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable

from ..core.config import HELD_OUT_MAX, DataConfig, is_unicode, template_fields, unescape
from ..core.utils import SoftpromptError, warn
from .batching import Example
from .chat import chat_example
from .datasource import column_list, column_names, local_split_error, read_rows, reading_error, take
from .labels import label_index, label_text

__all__ = ["Formatter", "load_splits", "read_rows", "chat_wrap", "unescape"]


# ---------------------------------------------------------------- formatting

def chat_wrap(tok, text: str) -> str:
    """`text` as the user's turn in the model's chat template, ready for the assistant's answer."""
    if not getattr(tok, "chat_template", None):
        raise SoftpromptError("--chat: this model's tokenizer has no chat template")
    return tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)


@functools.lru_cache(maxsize=64)
def template_columns(template: str) -> tuple[str, ...]:
    """The columns a template fills (plain {name}s, as checked); once per template, as asked every row."""
    return tuple(template_fields(template))


ENCODE_CHUNK = 4096  # rows tokenised per call: batch speed, without holding every row's encodings at once


@dataclass
class Texts:
    """A row's texts before tokenising (Formatter.texts)."""

    text: str            # the input as the row gives it (Example.text)
    rendered: str        # the input as tokenised (through the chat template under --chat)
    target: str | None   # the label word or the filled --target; None: language modelling
    label: int           # the class index, -1 without labels
    where: str           # the row, for error messages


@dataclass
class Formatter:
    """Turns rows into tokenised Examples according to a DataConfig."""

    cfg: DataConfig
    tok: Any
    label_words: list[str] = field(default_factory=list)
    label_values: list[str] = field(default_factory=list)  # what the label column holds (--labels VALUE=WORD)
    truncated: int = 0
    dropped: int = 0  # conversations with no assistant token within --max-length

    def __post_init__(self):
        c = self.cfg = replace(self.cfg)  # the config's own checks again, in case a field was changed since
        if c.messages_col and not c.chat:  # a chat prompt: generation and serving wrap inputs the same way
            c = self.cfg = replace(c, chat=True)
        self.template = unescape(c.template)
        self.target = unescape(c.target)
        self.label_words = c.label_words
        self.label_values = c.label_values
        if not (self.template or c.text_col or c.messages_col):
            raise SoftpromptError("say how to read each row: --text-col COLUMN, --template 'text with {column}' "
                                  "or --messages-col COLUMN")
        self.needed = self.columns()
        self.text_cols = self.text_columns()

    @property
    def task(self) -> str:
        if self.cfg.messages_col:
            return "chat"
        return "classify" if self.label_words else ("target" if self.target else "lm")

    def of(self, example: Example) -> "Formatter":
        """The formatter that made `example` (a mixture's task's; mixture.Mixture has one per task)."""
        return self

    def parts(self, examples: list[Example]) -> list[tuple["Formatter", list[Example]]]:
        """`examples` by task, each with its formatter: one task here."""
        return [(self, examples)]

    def columns(self) -> list[str]:
        """The columns every row needs (templates name plain columns: config.check_template)."""
        cols = template_fields(self.template) + template_fields(self.target)
        if self.cfg.text_col and not self.template:
            cols.append(self.cfg.text_col)
        if self.cfg.messages_col:
            cols.append(self.cfg.messages_col)
        if self.label_words:
            cols.append(self.cfg.label_col)
        return cols

    def text_columns(self) -> list[str]:
        """The columns whose values become text: the templates' and --text-col."""
        if self.task == "chat":
            return []
        cols = template_fields(self.template) + template_fields(self.target)
        return cols + ([self.cfg.text_col] if self.cfg.text_col and not self.template else [])

    def null_columns(self, row: dict) -> list[str]:
        """Text columns, and a classifier's label column, this row leaves null (JSON null, a missing Arrow
        value): such a row is skipped, not trained on as the text "None" or an unlabelled row."""
        label = [self.cfg.label_col] if self.task == "classify" else []
        return [c for c in self.text_cols + label if row.get(c) is None]

    def check_columns(self, row: dict, where: str) -> None:
        for col in self.needed:
            if col not in row:
                raise SoftpromptError(f"column {col!r} not found in {where} (columns: {column_list(row)})")

    def input_text(self, row: dict, where: str = "") -> str:
        if not self.template:
            return str(row[self.cfg.text_col])
        return self.fill(self.template, "--template", row, where)

    def fill(self, template: str, flag: str, row: dict, where: str) -> str:
        """`template` with `row`'s values; a value the template cannot format is the user's error."""
        try:
            filled = template.format_map({k: "" if v is None else v for k, v in row.items()})
        except (KeyError, IndexError, ValueError, TypeError, AttributeError) as e:
            raise SoftpromptError(f"{flag} {template!r} at {where}: {type(e).__name__}: {e}") from None
        whole = next((c for c in template_columns(template) if isinstance(row.get(c), (list, dict))), None)
        if whole is not None:  # it would train on the Python text of the list: "[{'role': ..."
            hint = " (chat turns train with --messages-col and no --template)" if isinstance(row[whole], list) else ""
            raise SoftpromptError(f"{flag} {template!r} at {where}: column '{whole}' holds a "
                                  f"{type(row[whole]).__name__}, not text{hint}")
        return filled

    def render_input(self, text: str) -> str:
        return chat_wrap(self.tok, text) if self.cfg.chat else text

    def tokenize_rendered(self, rendered: str) -> list[int]:
        # A chat template already holds its special tokens.
        return self.tok(rendered, add_special_tokens=not self.cfg.chat).input_ids

    def label_text(self, k: int, rendered_input: str) -> str:
        return label_text(self.label_words[k], rendered_input)

    def label_ids(self, rendered_input: str = " ") -> list[list[int]]:
        return [self.tok(self.label_text(k, rendered_input), add_special_tokens=False).input_ids
                for k in range(len(self.label_words))]

    def encode(self, row: dict, where: str = "") -> Example | None:
        self.check_columns(row, where)
        if self.task == "chat":
            col = self.cfg.messages_col
            ex, cut = chat_example(self.tok, row[col], self.cfg.max_length, f"{where}, column '{col}'")
            self.truncated += cut
            self.dropped += ex is None
            return ex
        return self.encode_texts([self.texts(row, where)])[0]

    def texts(self, row: dict, where: str) -> Texts:
        """What `row` becomes before tokenising: its input (as given and as rendered), and its target
        text (the label word, or the filled --target; None for language modelling)."""
        text = self.input_text(row, where)
        if not is_unicode(text):  # JSON may escape a lone surrogate ("\ud800"); no tokenizer takes one
            raise SoftpromptError(f"the input at {where} is not valid Unicode text: {text!r}")
        rendered, label, tgt = self.render_input(text), -1, None
        if self.task == "classify":
            label = label_index(self.label_values, row[self.cfg.label_col], where)
            tgt = self.label_text(label, rendered)
        elif self.task == "target":
            tgt = self.fill(self.target, "--target", row, where)
            if not is_unicode(tgt):
                raise SoftpromptError(f"the target at {where} is not valid Unicode text: {tgt!r}")
        return Texts(text, rendered, tgt, label, where)

    def encode_texts(self, rows: list[Texts]) -> list[Example]:
        """Examples of `rows`, tokenised in one call per side (two calls per row made reading SST-2's 68k
        rows 1.4-1.7x slower here). Every row has a target but a language model's."""
        prompts = self.tok([t.rendered for t in rows], add_special_tokens=not self.cfg.chat).input_ids
        targets = ([None] * len(rows) if self.task == "lm" else
                   self.tok([t.target for t in rows], add_special_tokens=False).input_ids)
        return [self.example(t, ids, tgt) for t, ids, tgt in zip(rows, prompts, targets)]

    def example(self, t: Texts, prompt_ids: list[int], tgt: list[int] | None) -> Example:
        """One row's Example from its tokens, cut to --max-length (a cut row counts in `truncated`)."""
        max_len = self.cfg.max_length
        if tgt is None:  # language modelling
            if len(prompt_ids) > max_len:
                prompt_ids, self.truncated = prompt_ids[:max_len], self.truncated + 1
            return Example(prompt_ids, 0, -1, t.text)
        if self.task == "target" and self.tok.eos_token_id is not None:
            tgt = tgt + [self.tok.eos_token_id]  # teach the model to stop
        if len(prompt_ids) + len(tgt) > max_len:
            self.truncated += 1
            tgt = tgt[: max(1, max_len // 2)]
            # Keep the end of the input: it holds the cue ("Sentiment:") the target follows.
            prompt_ids = prompt_ids[len(prompt_ids) + len(tgt) - max_len:] if max_len > len(tgt) else []
        if not tgt:
            raise SoftpromptError(f"empty target at {t.where}")
        return Example(prompt_ids + tgt, len(prompt_ids), t.label, t.text)

    def encode_rows(self, rows: Iterable[dict], where: str, numbers: list[int]) -> list[Example]:
        """Examples of `rows`; `numbers`: their 1-based row numbers in the file, for error messages."""
        out, nulls, texts, null_cols = [], [], [], {}
        for r, n in zip(rows, numbers):
            self.check_columns(r, f"{where} row {n}")
            null = self.null_columns(r)
            if null:
                nulls.append(n)
                null_cols.update(dict.fromkeys(null))
            elif self.task == "chat":
                out.append(self.encode(r, f"{where} row {n}"))
            else:
                texts.append(self.texts(r, f"{where} row {n}"))
        for i in range(0, len(texts), ENCODE_CHUNK):
            out += self.encode_texts(texts[i:i + ENCODE_CHUNK])
        out = [ex for ex in out if ex is not None and len(ex.ids)]
        if not numbers:
            raise SoftpromptError(f"no rows in {where}")
        cols = ", ".join(null_cols)  # the columns found null, in the order met
        if nulls and not out:
            raise SoftpromptError(f"no usable examples in {where}: every row holds null in {cols}")
        if nulls:  # as read_table reports rows with the wrong number of fields
            warn(f"skipped {len(nulls)} row(s) of {where} with null in {cols} (rows {sorted(nulls)[:5]})")
        if not out:
            raise SoftpromptError(f"no usable examples in {where} (every row tokenised to nothing"
                                  + (", or to no assistant token within --max-length)" if self.dropped else ")"))
        return out


def resolve_columns(cfg: DataConfig, rows) -> DataConfig:
    """A `messages` column trains a chat prompt when nothing else says how to read a row; without
    one, the rows' columns are named in the error."""
    if cfg.template or cfg.text_col or cfg.messages_col:
        return cfg
    if "messages" not in column_names(rows):
        raise reading_error(cfg.data, column_names(rows))
    print("[softprompt] reading the 'messages' column as chat conversations (as --messages-col messages): "
          "through the model's chat template, the loss on the assistant turns", file=sys.stderr)
    return replace(cfg, messages_col="messages")


def load_splits(cfg: DataConfig, tok, seed: int = 0,
                shuffle: bool = True) -> tuple[Formatter, list[Example], list[Example]]:
    """Formatter plus tokenised (train, eval) examples; eval is --eval-data, --eval-split of --data,
    or a held-out fraction. Rows are taken by index, so a Hub or Arrow dataset is never copied.
    `shuffle`: the training rows' order (and so --limit's choice) is seeded; without it they stay in
    file order, as scoring commands take them (--limit N: the first N rows, as --eval-limit takes)."""
    rows = read_rows(cfg.data, cfg.split, cfg.data_config, cfg.data_files, cfg.header)
    fmt = Formatter(resolve_columns(cfg, rows), tok)
    order = list(range(len(rows)))  # shuffled as row numbers, so that errors name the file's rows
    if shuffle:
        random.Random(seed).shuffle(order)
    eval_name = cfg.eval_data or (f"{cfg.data} ({cfg.eval_split})" if cfg.eval_split else f"{cfg.data} (held out)")
    if cfg.eval_split and not cfg.eval_data and Path(cfg.data).expanduser().is_file():  # it "held out" every row
        raise local_split_error("--eval-split", cfg.eval_split, "--data", cfg.data)
    if cfg.eval_data or cfg.eval_split:
        split = cfg.eval_split or ("validation" if cfg.split == "train" else cfg.split)
        # --eval-data's own config and files are not --data's; the same dataset's other split shares them.
        eval_rows = (read_rows(cfg.eval_data, split, header=cfg.header) if cfg.eval_data
                     else read_rows(cfg.data, split, cfg.data_config, cfg.data_files, cfg.header))
        eval_order = list(range(len(eval_rows)))
    elif cfg.eval_fraction > 0:
        n_eval = min(max(1, int(round(len(rows) * cfg.eval_fraction))), cfg.eval_limit or HELD_OUT_MAX)
        if n_eval >= len(rows):
            raise SoftpromptError(f"{cfg.data} has {len(rows)} rows: too few to hold out --eval-fraction {cfg.eval_fraction}")
        eval_rows, eval_order, order = rows, order[:n_eval], order[n_eval:]
    else:
        eval_rows, eval_order = [], []
    if cfg.limit:
        order = order[: cfg.limit]
    if cfg.eval_limit:
        eval_order = eval_order[: cfg.eval_limit]
    train = fmt.encode_rows(take(rows, order), cfg.data, [i + 1 for i in order])
    evals = fmt.encode_rows(take(eval_rows, eval_order), eval_name, [i + 1 for i in eval_order]) if eval_order else []
    if fmt.dropped:
        warn(f"skipped {fmt.dropped} conversation(s) with no assistant token within --max-length {cfg.max_length}")
    return fmt, train, evals
