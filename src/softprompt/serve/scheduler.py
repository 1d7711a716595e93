"""The batching scheduler behind the server: concurrent requests, for any mix of soft prompts,
share forward passes.

A bounded queue feeds one worker thread (the only thread that touches the model). Each tick it
takes up to `max_batch` waiting jobs (after waiting `batch_wait_ms` for company), groups them by
what must be shared inside one batch, and runs each group:
- generation jobs with the same decoding settings (greedy; or sampling with the same temperature,
  top_p and penalty) become one `decode.Decoding`, whatever their prompts, inputs, budgets and
  seeds: each prompt's KV is computed once and cached in one `PromptKV`, and a row's greedy (or
  per-row seeded) output equals what it gets alone;
- classification jobs with the same prompt become one rank-classification forward pass.
Batches are static per tick (requests arriving mid-decode wait for the next tick). The decoding
engine is touched in one method, `_generate`: continuous batching (rows joining a running decode
between steps) replaces it with one that keeps the engine's slots across ticks and returns to
`_loop` after each step, so that `_take` can hand it the jobs queued meanwhile.

Failures stay with their request: inputs are validated before they are queued, and if a batch
still raises, each of its jobs is retried alone so that only the offending one fails. Every job
always ends (result, error or cancellation) so that no client waits forever.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..batching import pad_id
from ..classify import label_scores
from ..config import GenerateConfig
from ..decode import Decoding, PromptKV

log = logging.getLogger("softprompt.serve")


class QueueFull(Exception):
    """The bounded queue is full: answer 503 and ask the client to come back later."""


@dataclass(eq=False)
class Job:
    prompt: torch.Tensor | None  # [P, H] on the model's device, or None for the base model
    ids: list[int]
    future: Future = field(default_factory=Future, init=False)
    cancelled: bool = field(default=False, init=False)  # set by the server when the client has gone

    @property
    def finished(self) -> bool:
        return self.future.done()

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


@dataclass(eq=False)
class GenJob(Job):
    """One completion choice: decodes `ids` after `prompt`, cuts at stop strings, and reports new
    text to `listener(job, kind, payload)` as it comes (kind: 'delta', 'done' or 'error')."""
    max_new: int = 16
    sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0
    stop: list[str] = field(default_factory=list)
    index: int = 0  # the choice's index in its response
    listener: Callable[["GenJob", str, Any], None] | None = None
    tokens: list[int] = field(default_factory=list, init=False)
    text: str = field(default="", init=False)
    emitted: int = field(default=0, init=False)  # characters of `text` already passed to the listener
    finish_reason: str | None = field(default=None, init=False)

    def key(self) -> tuple:
        """Jobs with equal keys can share one Decoding (one GenerateConfig)."""
        if not self.sample:
            return ("greedy", self.repetition_penalty)
        return ("sample", self.temperature, self.top_p, self.repetition_penalty)

    def _tell(self, kind: str, payload: Any) -> None:
        if self.listener is not None:
            try:
                self.listener(self, kind, payload)
            except Exception:  # a broken listener (closed event loop) must not stop the worker
                log.exception("listener failed")

    def push(self, tok, token: int, is_eos: bool) -> bool:
        """Take one new token; True when a stop string ends this job (the text is cut before it)."""
        if is_eos:
            return True
        self.tokens.append(token)
        full = tok.decode(self.tokens, skip_special_tokens=True)
        hits = [i for i in (full.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.finish_reason = full[:min(hits)], "stop"
            return True
        self.text = full
        # Hold back what may still change: a partial UTF-8 character, or the start of a stop string.
        safe = len(full.rstrip("\ufffd"))
        for s in self.stop:
            for k in range(min(len(s) - 1, len(full)), 0, -1):
                if full.endswith(s[:k]):
                    safe = min(safe, len(full) - k)
                    break
        if safe > self.emitted:
            self._tell("delta", full[self.emitted:safe])
            self.emitted = safe
        return False

    def finish(self, reason: str) -> None:
        if self.future.done():
            return
        self.finish_reason = self.finish_reason or reason
        if len(self.text) > self.emitted:
            self._tell("delta", self.text[self.emitted:])
            self.emitted = len(self.text)
        res = {"text": self.text, "tokens": list(self.tokens), "finish_reason": self.finish_reason,
               "prompt_tokens": len(self.ids)}
        self.future.set_result(res)
        self._tell("done", res)

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)
            self._tell("error", exc)

    def reset(self) -> bool:
        """Forget partial output before a retry; False if some was already sent (a retry would repeat it)."""
        if self.emitted:
            return False
        self.tokens, self.text, self.finish_reason = [], "", None
        return True


@dataclass(eq=False)
class ClassifyJob(Job):
    """Scores each candidate label's tokens after `ids`; the result is a list of log-probabilities."""
    candidates: list[list[int]] = field(default_factory=list)

    def key(self) -> tuple:
        # One forward pass per prompt; single-token labels take the one-position fast path, and a
        # job always takes the same path whatever shares its batch (so its scores do too).
        return ("classify", id(self.prompt), all(len(c) == 1 for c in self.candidates))

    def reset(self) -> bool:
        return True


class Scheduler:
    def __init__(self, model, tok, max_batch: int = 16, max_queue: int = 64, batch_wait_ms: float = 5.0,
                 live_prompts: Callable[[], list[torch.Tensor]] | None = None):
        self.model, self.tok = model, tok
        self.max_batch, self.max_queue, self.batch_wait = max(1, max_batch), max_queue, batch_wait_ms / 1000
        self.live_prompts = live_prompts
        self.kv = PromptKV(model)
        self.stats: collections.Counter = collections.Counter()
        self._queue: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ the server's side

    def start(self) -> None:
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="softprompt-scheduler", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._cv:
            left, self._queue = list(self._queue), collections.deque()
        for j in left:
            j.fail(RuntimeError("the server is shutting down"))

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def depth(self) -> int:
        return len(self._queue)

    def submit(self, jobs: list[Job]) -> None:
        """Queue all of `jobs` or none of them (QueueFull)."""
        with self._cv:
            if len(self._queue) + len(jobs) > self.max_queue:
                self.stats["rejected_jobs"] += len(jobs)
                raise QueueFull(f"queue full ({len(self._queue)} waiting, limit {self.max_queue})")
            self._queue.extend(jobs)
            self._cv.notify_all()

    # ------------------------------------------------------------ the worker thread

    def _take(self) -> list[Job]:
        with self._cv:
            while not self._queue and not self._closing:
                self._cv.wait(0.5)
            if self._closing:
                return []
            # Wait a little for company: a batch of many costs about as much per step as one alone.
            deadline = time.monotonic() + self.batch_wait
            while len(self._queue) < self.max_batch and not self._closing:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(left)
            batch = []
            while self._queue and len(batch) < self.max_batch:
                batch.append(self._queue.popleft())
        out = []
        for j in batch:
            if j.cancelled:  # its client left while it waited: it costs nothing more
                self.stats["cancelled_jobs"] += 1
                (j.finish("cancelled") if isinstance(j, GenJob) else j.fail(RuntimeError("cancelled")))
            else:
                out.append(j)
        return out

    def _loop(self) -> None:
        while not self._closing:
            jobs = self._take()
            if not jobs:
                continue
            try:
                self._run_batch(jobs)
            except BaseException as e:  # the worker must outlive anything a batch does
                log.exception("batch failed")
                for j in jobs:
                    j.fail(e)
            if self.live_prompts is not None:
                self.kv.retain(self.live_prompts())  # drop the KV of prompts unloaded meanwhile

    def _run_batch(self, jobs: list[Job]) -> None:
        groups: dict[tuple, list[Job]] = {}
        for j in jobs:
            groups.setdefault(j.key(), []).append(j)  # dicts keep arrival order
        self.stats["batches"] += 1
        self.stats["batch_jobs"] += len(jobs)
        for key, group in groups.items():
            run = self._generate if key[0] != "classify" else self._classify
            self._isolated(run, group)

    def _isolated(self, run: Callable[[list], None], group: list[Job]) -> None:
        try:
            run(group)
            return
        except Exception as e:
            if len(group) == 1:
                self.stats["failed_jobs"] += 1
                group[0].fail(e)
                return
            log.warning("a batch of %d failed (%s: %s); retrying its jobs one by one", len(group),
                        type(e).__name__, e)
            self.stats["batch_retries"] += 1
            first = e
        for j in group:
            if j.finished:
                continue
            if not j.reset():
                self.stats["failed_jobs"] += 1
                j.fail(first)
                continue
            try:
                run([j])
            except Exception as e:
                self.stats["failed_jobs"] += 1
                j.fail(e)

    @torch.no_grad()
    def _generate(self, jobs: list[GenJob]) -> None:
        j0 = jobs[0]
        cfg = GenerateConfig(max_new_tokens=max(j.max_new for j in jobs), sample=j0.sample,
                             temperature=j0.temperature, top_p=j0.top_p, repetition_penalty=j0.repetition_penalty)
        dec = Decoding(self.model, self.tok, [(j.prompt, j.ids) for j in jobs], cfg, self.kv,
                       max_new=[j.max_new for j in jobs], seeds=[j.seed for j in jobs] if j0.sample else None)
        self.stats["gen_rows"] += len(jobs)
        while not dec.finished:
            for i, j in enumerate(jobs):
                if j.cancelled:
                    dec.stop(i)
            step = dec.step()
            for i, t in enumerate(step):
                if t is None:
                    continue
                self.stats["generated_tokens"] += 1
                if jobs[i].push(self.tok, t, t in dec.eos):
                    dec.stop(i)
            for i, j in enumerate(jobs):
                if dec.done[i] and not j.finished:
                    self.stats["cancelled_jobs"] += j.cancelled
                    j.finish("cancelled" if j.cancelled else
                             "stop" if (dec.stopped_by_eos[i] or j.finish_reason) else "length")

    @torch.no_grad()
    def _classify(self, jobs: list[ClassifyJob]) -> None:
        self.stats["classify_rows"] += len(jobs)
        rows = [(j.prompt, j.ids) for j in jobs]
        scores = label_scores(self.model, rows, [j.candidates for j in jobs], pad_id(self.tok),
                              batch_size=sum(len(j.candidates) for j in jobs))
        for j, s in zip(jobs, scores.tolist()):
            j.future.set_result(s[:len(j.candidates)])
