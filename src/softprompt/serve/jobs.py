"""What the scheduler runs: one job per completion choice (GenJob), classification (ClassifyJob) or
scoring of a sequence's tokens (ScoreJob: OpenAI's `logprobs`), each with the future its request
awaits, and the queue-full signal the server turns into a 503.

A GenJob takes its tokens one at a time as the engine produces them: it decodes its text, cuts it
at stop strings, holds back what may still change (a partial UTF-8 character, the start of a stop
string) and tells its listener (the streaming response) what is final.
"""
from __future__ import annotations

import logging
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from ..core.config import GenerateConfig
from ..generation.sampling import Sampling

log = logging.getLogger("softprompt.serve")


class QueueFull(Exception):
    """The bounded queue is full: answer 503 and ask the client to come back later."""


@dataclass(eq=False)
class Job:
    prompt: Any  # [P, H] on the model's device, a prefix Prompt (no input embeddings), or None: the base model
    ids: list[int]
    future: Future = field(default_factory=Future, init=False)
    cancelled: bool = field(default=False, init=False)  # set by the server when the client has gone
    request: int | None = None  # the request it belongs to: the scheduler shares rows fairly between requests

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
    sampling: Sampling = Sampling()  # frozen: one default shared safely; greedy unless sampling.sample
    seed: int = 0
    stop: list[str] = field(default_factory=list)
    index: int = 0  # the choice's index in its response
    listener: Callable[["GenJob", str, Any], None] | None = None
    tokens: list[int] = field(default_factory=list, init=False)
    text: str = field(default="", init=False)
    emitted: int = field(default=0, init=False)  # characters of `text` already passed to the listener
    finish_reason: str | None = field(default=None, init=False)
    eos: int | None = field(default=None, init=False)  # the end-of-sequence token that ended it, if one did

    def key(self) -> tuple:
        """Jobs with equal keys join the engine in one `add` (one GenerateConfig); Sampling.of
        drops a greedy row's temperature and top-p, which do not change its tokens."""
        return ("generate", Sampling.of(self.sampling))

    def _tell(self, kind: str, payload: Any) -> None:
        if self.listener is not None:
            try:
                self.listener(self, kind, payload)
            except Exception:  # a broken listener (closed event loop) must not stop the worker
                log.exception("listener failed")

    def push(self, tok, token: int, is_eos: bool) -> bool:
        """Take one new token; True when a stop string ends this job (the text is cut before it)."""
        if is_eos:
            self.eos = token  # not part of the text, but scored when the client asks for logprobs
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
               "prompt_tokens": len(self.ids), "eos": self.eos}
        self.future.set_result(res)
        self._tell("done", res)

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)
            self._tell("error", exc)

    def config(self) -> GenerateConfig:
        """The engine's settings for this job's row (the budget is passed per row)."""
        return GenerateConfig(max_new_tokens=self.max_new, **asdict(self.sampling))

    def reset(self) -> bool:
        """Forget partial output before a retry; False if some was already streamed (a retry would repeat it)."""
        if self.emitted and self.listener is not None:
            return False
        self.emitted = 0
        self.tokens, self.text, self.finish_reason, self.eos = [], "", None, None
        return True


@dataclass(eq=False)
class ClassifyJob(Job):
    """Scores each candidate label's tokens after `ids`; the result is a list of log-probabilities."""
    candidates: list[list[int]] = field(default_factory=list)
    partial: list[float] = field(default_factory=list, init=False)  # scores of the chunks run so far

    def key(self) -> tuple:
        # One forward pass per prompt; single-token labels take the one-position fast path, and a
        # job always takes the same path whatever shares its batch (so its scores do too).
        return ("classify", id(self.prompt), all(len(c) == 1 for c in self.candidates))

    def reset(self) -> bool:
        self.partial = []
        return True


@dataclass(eq=False)
class ScoreJob(Job):
    """Scores `cont` after `ids`: each token's log-probability and the `top` most probable tokens at
    its position (classify.token_logprobs' result for one row)."""
    cont: list[int] = field(default_factory=list)
    top: int = 0

    def key(self) -> tuple:
        # any prompts with input embeddings: token_logprobs runs rows with different prompts together; a
        # prefix's rows only with each other (its keys and values take the shared kv path)
        shared = self.prompt is None or isinstance(self.prompt, torch.Tensor)
        return ("score",) if shared else ("score", id(self.prompt))

    def reset(self) -> bool:
        return True
