"""Task mixtures (`train --mix`): one prompt trained over several tasks at once, each read by its own
formatting.Formatter (its template, label words, target...).

Every task's rows are loaded as one task's are (formatting.load_splits, with the task's own held-out
part) and tagged with their task (Example.task); the training rows are simply pooled, so the run's
seeded, length-grouped shuffle (batching.batch_order) interleaves them and each batch draws the tasks
in proportion to their sizes: T5's examples-proportional mixing, whose cap on a task's size is that
task's --limit. Each row keeps its own label words (classification, the label-word loss and the
scores read them through `of`), and evaluation scores every task apart (evaluate.evaluate_tasks).

A Mixture stands where a Formatter does; what a run records as the prompt's reading (template, label
words) is the first task's, the flags' own, so that eval and generate start from it.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..core.config import DataConfig
from .batching import Example
from .formatting import Formatter, load_splits


class Mixture:
    """Formatter-like view of several tasks' formatters (task k's rows carry Example.task == k)."""

    def __init__(self, cfg: DataConfig, formatters: list[Formatter]):
        self.formatters = formatters
        first = formatters[0]
        self.cfg = replace(first.cfg, mix=cfg.mix)  # the first task as resolved (chat...), with the mixture
        self.tok, self.template, self.target = first.tok, first.template, first.target
        self.names = [f"{i + 1}:{Path(c.data).name}" for i, c in enumerate(cfg.tasks())]  # a file by its name

    @property
    def task(self) -> str:
        kinds = {f.task for f in self.formatters}
        return kinds.pop() if len(kinds) == 1 else "mixed"

    @property
    def label_words(self) -> list[str]:
        """Every task's label words, once each (what the `labels` init and the init text draw on)."""
        return list(dict.fromkeys(w for f in self.formatters for w in f.label_words))

    @property
    def truncated(self) -> int:
        return sum(f.truncated for f in self.formatters)

    def render_input(self, text: str) -> str:
        return self.formatters[0].render_input(text)

    def of(self, example: Example) -> Formatter:
        return self.formatters[example.task]

    def parts(self, examples: list[Example]) -> list[tuple[Formatter, list[Example]]]:
        """`examples` by task, in task order (a task with none is left out)."""
        by: list[list[Example]] = [[] for _ in self.formatters]
        for e in examples:
            by[e.task].append(e)
        return [(f, ex) for f, ex in zip(self.formatters, by) if ex]

    def name_of(self, fmt: Formatter) -> str:
        return next(n for f, n in zip(self.formatters, self.names) if f is fmt)  # by identity: equal tasks may repeat


def load_data(cfg: DataConfig, tok, seed: int = 0) -> tuple[Formatter | Mixture, list[Example], list[Example]]:
    """load_splits for one task; for a --mix mixture, every task's, pooled (the module docstring says how)."""
    if not cfg.mix:
        return load_splits(cfg, tok, seed)
    formatters, train, evals = [], [], []
    for k, task in enumerate(cfg.tasks()):
        fmt, tr, ev = load_splits(task, tok, seed)
        for e in tr + ev:
            e.task = k
        formatters.append(fmt)
        train += tr
        evals += ev
    return Mixture(cfg, formatters), train, evals
