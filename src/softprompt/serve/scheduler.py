"""The scheduler behind the server: concurrent requests, for any mix of soft prompts, decode
together in one continuously batched engine.

A bounded queue feeds one worker thread (the only thread that touches the model). The worker
keeps one decode engine (`static_decode.decode_batch_for`: static slots replayed as CUDA graphs
on a GPU, a growing cache on a CPU) for the server's life and loops:
1. take what waits in the queue, up to `max_batch` rows in flight, fairly: the next place goes to
   the request holding the fewest rows (when nothing is decoding, first wait `batch_wait_ms` for
   company; when rows are decoding, wait for nothing);
2. admit it: generation jobs are prefilled into the engine (one `add` per set of decoding
   settings, each prompt's KV computed once and cached in one `PromptKV`) and join the running
   rows at the next step; classification jobs with the same prompt run as one rank-classification
   forward pass, and scoring jobs (logprobs) as one pass of classify.token_logprobs, between two steps;
   classification with multi-token labels runs one chunk of its labels per loop turn instead;
3. step the engine once (one token for every live row) and hand each token to its job (stop
   strings, streaming, the budget). A finished, stopped or cancelled row leaves before the next
   forward, so its place is free for whoever waits.
A request arriving mid-decode thus waits at most one step, not for the batch ahead to finish, and
a row's greedy (or per-row seeded) output equals what it gets alone.

Failures stay with their request: inputs are validated before they are queued; if an admission
still raises, its jobs are admitted one by one so that only the offending one fails; if a step
raises, the engine is replaced and each of its jobs that has sent nothing yet is decoded again
alone. Every job always ends (result, error or cancellation) so that no client waits forever.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Callable

import torch

from ..data.batching import pad_id
from ..forward.classify import label_scores, token_logprobs
from ..forward.prefill import PromptKV
from ..generation.decode import DecodeBatch
from ..generation.static_decode import decode_batch_for
from .jobs import ClassifyJob, GenJob, Job, QueueFull, ScoreJob

log = logging.getLogger("softprompt.serve")
# The counters `stats` keeps, which /metrics reports (routes/ops.py). batches: admissions (jobs taken from
# the queue at once); decode_steps and decode_rows: engine steps and the rows they advanced (their ratio is
# the mean batch); *_seconds: the scheduler thread's time by phase.
COUNTERS = ("batches", "batch_jobs", "gen_rows", "classify_rows", "score_rows", "generated_tokens",
            "decode_steps", "decode_rows", "prefill_seconds", "decode_seconds", "classify_seconds",
            "score_seconds", "failed_jobs", "batch_retries", "rejected_jobs", "cancelled_jobs")


class LiveBatch:
    """One decode engine and the generation jobs whose rows it holds: `add` prefills jobs into the
    engine (they join at its next step); `step` drops cancelled rows, gives every live row one
    token and hands each token to its job, ending the jobs it finishes. The scheduler keeps one
    for the server's life; after a failed step, each job is retried in a LiveBatch of its own."""

    def __init__(self, engine: DecodeBatch, tok, stats: collections.Counter):
        self.engine, self.tok, self.stats = engine, tok, stats
        self.jobs: dict[int, GenJob] = {}  # row id -> job, until the engine hands the row back

    @property
    def finished(self) -> bool:
        """Nothing decoding or joining (rows that finished at the last step still leave at the next)."""
        return self.engine.finished

    @property
    def live(self) -> int:
        """Jobs still decoding: the rows that count against max_batch."""
        return sum(not j.finished for j in self.jobs.values())

    def add(self, jobs: list[GenJob]) -> None:
        """Prefill `jobs` (one key: the same decoding settings) now; they join at the next step.
        Raises as the engine does, having added none of them."""
        t0 = time.perf_counter()
        cfg = jobs[0].config()
        ids = self.engine.add([(j.prompt, j.ids) for j in jobs], cfg, max_new=[j.max_new for j in jobs],
                              seeds=[j.seed for j in jobs] if cfg.sample else None)
        self.stats["prefill_seconds"] += time.perf_counter() - t0
        self.stats["gen_rows"] += len(jobs)
        self.jobs.update(zip(ids, jobs))

    def step(self) -> None:
        for rid, j in self.jobs.items():
            if j.cancelled and not j.finished:  # its client left: the row leaves before the forward
                self.engine.stop(rid)
                self.stats["cancelled_jobs"] += 1
                j.finish("cancelled")
        t0 = time.perf_counter()
        out = self.engine.step()
        self.stats["decode_seconds"] += time.perf_counter() - t0
        self.stats["decode_steps"] += bool(out)
        self.stats["decode_rows"] += len(out)
        self.stats["generated_tokens"] += len(out)
        for rid, t in out.items():
            j = self.jobs[rid]
            if j.finished:
                continue
            if j.push(self.tok, t, t in self.engine.eos):
                self.engine.stop(rid)  # a stop string (EOS has already ended the row)
                j.finish("stop")
            elif len(j.tokens) >= j.max_new:  # the engine ends the row at the same count
                j.finish("length")
        for rid in list(self.engine.results):  # rows that left at this step: forget them
            row = self.engine.pop(rid)
            j = self.jobs.pop(rid, None)
            if j is not None and row.error is not None:  # its own token could not be chosen: it fails alone
                self.stats["failed_jobs"] += 1
                j.fail(row.error)
            elif j is not None and not j.finished:  # ended by the engine for a reason not handled above
                j.finish("stop" if row.stopped_by_eos else "length")

    def abandon(self) -> list[GenJob]:
        """Forget every row (the engine failed, or the server is closing): the jobs not yet finished."""
        left = [j for j in self.jobs.values() if not j.finished]
        self.jobs = {}
        return left


class Scheduler:
    def __init__(self, model, tok, max_batch: int = 16, max_queue: int = 64, batch_wait_ms: float = 5.0,
                 live_prompts: Callable[[], list[torch.Tensor]] | None = None, chunk_positions: int = 2048):
        self.model, self.tok = model, tok
        self.max_batch, self.max_queue, self.batch_wait = max(1, max_batch), max_queue, batch_wait_ms / 1000
        # Classification with multi-token labels runs in chunks of about this many token positions, one
        # chunk between two decode steps, so that a long one does not hold every decoding row.
        self.chunk_positions = chunk_positions
        self.chunks: collections.deque[tuple[ClassifyJob, list[int]]] = collections.deque()  # (job, label indexes)
        self.reserved = 0  # queue places held for requests' later jobs (their scoring after generation)
        self.live_prompts = live_prompts
        self.kv = PromptKV(model)
        self.stats: collections.Counter = collections.Counter()
        # One engine for the server's life: on a GPU its CUDA graphs are captured once per bucket.
        self.batch = self.new_batch()
        self.in_flight = 0  # rows decoding, as of the worker's last step (read by /metrics)
        self._queue: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None

    def new_batch(self) -> LiveBatch:
        return LiveBatch(decode_batch_for(self.model, self.tok, self.kv), self.tok, self.stats)

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

    def submit(self, jobs: list[Job], reserve: int = 0, held: int = 0) -> None:
        """Queue all of `jobs` or none of them (QueueFull). `reserve`: places to hold besides for the
        same request's later jobs, so that they cannot be refused after its first ones ran; `held`:
        places an earlier `reserve` held for these jobs (all of them are released)."""
        with self._cv:
            others = self.reserved - held
            if len(self._queue) + others + len(jobs) + reserve > self.max_queue:
                self.stats["rejected_jobs"] += len(jobs)
                raise QueueFull(f"queue full ({len(self._queue)} waiting, {others} held, limit {self.max_queue})")
            self.reserved = others + reserve
            self._queue.extend(jobs)
            self._cv.notify_all()

    def release(self, places: int) -> None:
        """Give back places a `submit(reserve=...)` held that will not be used (the request ended)."""
        with self._cv:
            self.reserved = max(0, self.reserved - places)

    # ------------------------------------------------------------ the worker thread

    def _loop(self) -> None:
        try:
            while not self._closing:
                jobs = self._take()
                try:
                    if jobs:
                        self._retain()
                        self._admit(jobs)
                    if self.chunks:
                        self._classify_chunk()
                    if not self.batch.finished:
                        self._step()
                except Exception as e:  # a bug, not a request's fault: the worker must outlive it
                    log.exception("scheduler iteration failed")
                    for j in jobs + self.batch.abandon():
                        j.fail(e)
                    self.batch = self.new_batch()
                self.in_flight = self.batch.live
        finally:
            for j, _ in self.chunks:
                j.fail(RuntimeError("the server is shutting down"))
            self.chunks.clear()
            for j in self.batch.abandon():  # closing: nobody waits for these any more
                if j.cancelled:
                    self.stats["cancelled_jobs"] += 1
                    j.finish("cancelled")
                else:
                    j.fail(RuntimeError("the server is shutting down"))
            self.in_flight = 0

    def _take(self) -> list[Job]:
        """The jobs to admit now, in arrival order, up to max_batch rows in flight. Waits only when
        nothing is decoding: for a first job, then `batch_wait` for company (a step of many rows
        costs about as much as one of a few)."""
        with self._cv:
            if self.batch.finished and not self.chunks:
                while not self._queue and not self._closing:
                    self._cv.wait(0.5)
                deadline = time.monotonic() + self.batch_wait
                while len(self._queue) < self.max_batch and not self._closing:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cv.wait(left)
            if self._closing:
                return []
            room, taken = self.max_batch - self.batch.live, []
            if self._queue and room > 0:
                rows = collections.Counter(request_of(j) for j in self.batch.jobs.values() if not j.finished)
                while self._queue and len(taken) < room:
                    taken.append(self._next_fair(rows))
        return taken

    def _next_fair(self, rows: collections.Counter) -> Job:
        """Pop the queued job whose request holds the fewest rows (decoding or just taken), the
        earliest among equals: one request's many choices do not take every place while another
        waits (with 64 prompts in one request, a 1-token request waited for all of them)."""
        best, seen = 0, set()
        for i, j in enumerate(self._queue):
            r = request_of(j)
            if r in seen:
                continue
            seen.add(r)
            if rows[r] < rows[request_of(self._queue[best])]:
                best = i
            if rows[r] == 0:  # none fewer: the earliest such request
                break
        job = self._queue[best]
        del self._queue[best]
        rows[request_of(job)] += 1
        return job

    def _retain(self) -> None:
        """Drop the cached KV of prompts unloaded meanwhile (rows already decoding hold their own copy)."""
        if self.live_prompts is not None:
            self.kv.retain(self.live_prompts())

    def _admit(self, jobs: list[Job]) -> None:
        """Classification jobs run now; generation jobs are prefilled and join at the next step."""
        self.stats["batches"] += 1
        self.stats["batch_jobs"] += len(jobs)
        groups: dict[tuple, list[Job]] = {}
        for j in jobs:
            if j.cancelled:  # its client left while it waited: it costs nothing more
                self.stats["cancelled_jobs"] += 1
                (j.finish("cancelled") if isinstance(j, GenJob) else j.fail(RuntimeError("cancelled")))
            else:
                groups.setdefault(j.key(), []).append(j)  # dicts keep arrival order
        runs = {"classify": self._classify, "score": self._score}
        for key, group in groups.items():
            self._isolated(runs.get(key[0], self.batch.add), group)

    def _isolated(self, run: Callable[[list], None], group: list[Job]) -> None:
        """run(group); if it raises, run each job alone, so that only one that fails alone fails."""
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

    def _step(self) -> None:
        try:
            self.batch.step()
        except Exception as e:  # the engine's state is unknown now: start a new one
            jobs, self.batch = self.batch.abandon(), self.new_batch()
            log.warning("a decode step of %d rows failed (%s: %s); retrying them one by one", len(jobs),
                        type(e).__name__, e)
            self.stats["batch_retries"] += 1
            for j in jobs:
                self._alone(j, e)

    def _alone(self, job: GenJob, exc: Exception) -> None:
        """Decode `job` again from its start in an engine of its own (the growing cache: nothing to
        capture); it fails with `exc` if it already streamed text, or with its own error."""
        if job.cancelled:
            self.stats["cancelled_jobs"] += 1
            job.finish("cancelled")
            return
        if not job.reset():
            self.stats["failed_jobs"] += 1
            job.fail(exc)
            return
        own = LiveBatch(DecodeBatch(self.model, self.tok, self.kv), self.tok, self.stats)
        try:
            own.add([job])
            while not own.finished:
                own.step()
        except Exception as e:
            self.stats["failed_jobs"] += 1
            job.fail(e)

    def _classify(self, jobs: list[ClassifyJob]) -> None:
        """Single-token labels: one pass over the texts now. Longer labels: one pass per label, in
        chunks of about `chunk_positions` token positions, run one per loop turn (`_classify_chunk`)."""
        if all(len(c) == 1 for j in jobs for c in j.candidates):
            return self._classify_now(jobs)
        for j in jobs:
            chunk, cost = [], 0
            for k, c in enumerate(j.candidates):
                if chunk and cost + len(j.ids) + len(c) > self.chunk_positions:
                    self.chunks.append((j, chunk))
                    chunk, cost = [], 0
                chunk.append(k)
                cost += len(j.ids) + len(c)
            self.chunks.append((j, chunk))

    @torch.no_grad()
    def _classify_chunk(self) -> None:
        """Score the next chunk of a classification job's labels; the job's result once all are."""
        job, labels = self.chunks.popleft()
        if job.finished:  # an earlier chunk failed
            return
        if job.cancelled:
            self.stats["cancelled_jobs"] += 1
            job.fail(RuntimeError("cancelled"))
            return
        t0 = time.perf_counter()
        try:
            s = label_scores(self.model, [(job.prompt, job.ids)], [[job.candidates[k] for k in labels]],
                             pad_id(self.tok), batch_size=len(labels))
        except Exception as e:
            self.stats["failed_jobs"] += 1
            job.fail(e)
            return
        finally:
            self.stats["classify_seconds"] += time.perf_counter() - t0
        job.partial.extend(s[0, :len(labels)].tolist())
        if len(job.partial) == len(job.candidates):
            self.stats["classify_rows"] += 1
            job.future.set_result(list(job.partial))

    @torch.no_grad()
    def _classify_now(self, jobs: list[ClassifyJob]) -> None:
        t0 = time.perf_counter()
        self.stats["classify_rows"] += len(jobs)
        rows = [(j.prompt, j.ids) for j in jobs]
        scores = label_scores(self.model, rows, [j.candidates for j in jobs], pad_id(self.tok),
                              batch_size=sum(len(j.candidates) for j in jobs))
        for j, s in zip(jobs, scores.tolist()):
            j.future.set_result(s[:len(j.candidates)])
        self.stats["classify_seconds"] += time.perf_counter() - t0

    @torch.no_grad()
    def _score(self, jobs: list[ScoreJob]) -> None:
        """One pass over all the jobs' rows (at most max_batch, each within the model's positions)."""
        t0 = time.perf_counter()
        self.stats["score_rows"] += len(jobs)
        out = token_logprobs(self.model, [(j.prompt, j.ids) for j in jobs], [j.cont for j in jobs],
                             pad_id(self.tok), top=max(j.top for j in jobs))
        for j, (lps, tops) in zip(jobs, out):
            j.future.set_result((lps, [t[:j.top] for t in tops]))
        self.stats["score_seconds"] += time.perf_counter() - t0


def request_of(job: Job) -> int:
    """The request a job belongs to (a job without one is a request of its own)."""
    return job.request if job.request is not None else id(job)
