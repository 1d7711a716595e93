"""What every route shares: one `ServerContext` per app and the request helpers built on it.

The context holds the model, tokenizer, config, base model name, prompt registry, scheduler,
metrics and position limit. Its helpers are the steps every route takes: tokenise and bound an
input (`encode`, or `token_ids` for ids the client tokenised itself; `fits`), read OpenAI's
decoding fields (`gen_params`), queue jobs or answer 503 (`submit`), and wait for their results
(`results`). Routes receive it as a FastAPI dependency (`Ctx`), so a route module needs nothing
but its own endpoints.
"""
from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Request

from ..core.config import ServeConfig
from ..core.utils import SoftpromptError
from ..generation.sampling import Sampling
from .chat_input import chat_ids
from .metrics import CLIENT_GONE, Metrics
from .protocol import ApiError
from .registry import Loaded, Registry
from .jobs import Job, QueueFull
from .scheduler import Scheduler


@dataclass
class Hold:
    """Queue places a request holds for its later jobs (scoring after generation): admission takes
    the whole request's work at once, so that it is never refused half-way. `release` what is left."""
    places: int = 0


@dataclass
class ServerContext:
    model: Any
    tok: Any
    cfg: ServeConfig
    base: str  # the base model's name: clients pass it as `model` for no prompt
    registry: Registry
    scheduler: Scheduler
    metrics: Metrics
    limit: int | None  # the model's position limit (None: no fixed limit)
    # Set when a graceful shutdown's deadline passes: requests still waiting end with a 503 (runner.Server).
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    def encode(self, text: str, param: str) -> list[int]:
        """Token ids of a raw text input (the tokenizer's BOS rule applies), bounded. Blocking:
        routes call it off the event loop."""
        if not text:
            raise ApiError(400, f"{param} is empty: give at least one token of input", param)
        self.within_characters(len(text), param)
        head = text[:self.cfg.max_input_tokens * 8]
        if len(head) < len(text):  # a long text: a head already over the limit need not be followed further
            n = len(self.tok(head).input_ids)
            if n > self.cfg.max_input_tokens + 1:  # + 1: the cut may split one token in two
                raise ApiError(400, f"{param} has more than {n - 1} tokens, over this server's limit of "
                                    f"{self.cfg.max_input_tokens}", param, "context_length_exceeded")
        return self.bounded(self.tok(text).input_ids, param)

    def encode_messages(self, messages: list[dict[str, str]], param: str) -> list[int]:
        """Token ids of chat messages through the chat template (their content as text), bounded.
        Blocking: routes call it off the event loop."""
        if len(messages) > self.cfg.max_input_tokens:  # each message costs at least one token
            raise ApiError(400, f"{param} has {len(messages)} messages, more than this server's limit of "
                                f"{self.cfg.max_input_tokens} input tokens", param, "context_length_exceeded")
        self.within_characters(sum(len(m["content"]) + len(m["role"]) for m in messages), param)
        return self.bounded(chat_ids(self.tok, messages, param), param)

    def within_characters(self, n: int, param: str) -> None:
        """Refuse, before tokenising, inputs too long for any tokenizer to fit within the limit."""
        if n > self.cfg.max_input_tokens * 64:
            raise ApiError(400, f"{param} is too long ({n} characters)", param, "context_length_exceeded")

    def bounded(self, ids: list[int], param: str) -> list[int]:
        if not ids:
            raise ApiError(400, f"{param} is empty: give at least one token of input", param)
        if len(ids) > self.cfg.max_input_tokens:
            raise ApiError(400, f"{param} has {len(ids)} tokens, over this server's limit of "
                                f"{self.cfg.max_input_tokens}", param, "context_length_exceeded")
        return ids

    def token_ids(self, ids: list[int], param: str) -> list[int]:
        """A prompt sent as token ids, checked as `encode` checks text, and against the vocabulary."""
        if not ids:
            raise ApiError(400, f"{param} is empty: give at least one token of input", param)
        if len(ids) > self.cfg.max_input_tokens:
            raise ApiError(400, f"{param} has {len(ids)} tokens, over this server's limit of "
                                f"{self.cfg.max_input_tokens}", param, "context_length_exceeded")
        # Both bounds: an id the tokenizer knows but the embedding lacks would fail inside the model.
        vocab = min(len(self.tok), self.model.get_input_embeddings().num_embeddings)
        bad = next((i for i in ids if i >= vocab), None)
        if bad is not None:
            raise ApiError(400, f"{param}: token id {bad} is out of range (this model's vocabulary has {vocab} "
                                "tokens)", param)
        return list(ids)

    def fits(self, entry: Loaded, ids: list[int], new: int, param: str) -> None:
        """Refuse a request whose prompt, input and new tokens pass the model's positions."""
        P = entry.virtual_tokens
        if self.limit and P + len(ids) + new > self.limit:
            raise ApiError(400, f"{param}: {P} virtual + {len(ids)} input + {new} new tokens exceed the "
                                f"model's {self.limit} positions", param, "context_length_exceeded")

    def gen_params(self, req) -> dict[str, Any]:
        """A completion or chat request's decoding settings, checked against this server's caps."""
        cfg = self.cfg
        refused = req.unsupported_field()
        if refused:
            name, off = refused
            raise ApiError(400, f"{name} is not supported by this server: leave it out (or send "
                                f"{' or '.join(map(repr, off))})", name, "unsupported_parameter")
        if req.stream_options is not None and not req.stream:
            raise ApiError(400, "stream_options needs stream: true", "stream_options")
        given = [v for v in (getattr(req, "max_completion_tokens", None), req.max_tokens) if v is not None]
        mt = given[0] if given else cfg.default_max_tokens
        if mt == 0 and not getattr(req, "echo", None):  # nothing to generate and nothing to return
            raise ApiError(400, "max_tokens 0 scores the prompt only: it needs echo: true", "max_tokens")
        if mt > cfg.max_new_tokens:
            raise ApiError(400, f"max_tokens {mt} is over this server's cap of {cfg.max_new_tokens}", "max_tokens")
        if req.n > cfg.max_n:
            raise ApiError(400, f"n {req.n} is over this server's cap of {cfg.max_n}", "n")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise ApiError(400, "stop takes at most 4 non-empty strings", "stop")
        sample = bool(req.temperature)
        seed = req.seed if req.seed is not None else secrets.randbits(31)
        # The settings as decoding reads them: Sampling.of drops a greedy row's temperature and top_p
        # (GenJob.key applies the same rule to jobs built by other callers).
        sampling = Sampling.of(Sampling(sample, req.temperature or 1.0, req.top_p, req.repetition_penalty,
                                        req.presence_penalty or 0.0, req.frequency_penalty or 0.0))
        return {"max_new": mt, "sampling": sampling, "seed": seed, "stop": stop}

    def queueable(self, count: int, param: str | None) -> None:
        """Refuse (400) a request of `count` jobs that the queue could never hold at once: a 503
        would send its client back to retry for ever. `param` names the field to change."""
        most = self.scheduler.max_queue
        if count > most:
            raise ApiError(400, f"{param}: this request needs {count} queue places (prompts x n), more than the "
                                f"{most} this server has: send fewer per request", param, "request_too_large")

    def submit(self, jobs: list[Job], param: str | None = None, reserve: Hold | None = None,
               use: Hold | None = None) -> None:
        """Queue all of `jobs`, or answer 503 with Retry-After when the queue is full. `reserve`: hold
        its places too, for the request's later jobs (its scoring), which then `use` them."""
        self.queueable(len(jobs) + (reserve.places if reserve else 0), param)
        try:
            self.scheduler.submit(jobs, reserve=reserve.places if reserve else 0, held=use.places if use else 0)
            if use is not None:
                use.places = 0
        except QueueFull as e:
            if reserve is not None:
                reserve.places = 0
            raise ApiError(503, f"server busy: {e}; retry after {self.cfg.retry_after} s", None, "queue_full",
                           headers={"Retry-After": str(self.cfg.retry_after)}) from None

    def release(self, hold: Hold) -> None:
        if hold.places:
            self.scheduler.release(hold.places)
            hold.places = 0

    async def results(self, jobs: list[Job], request: Request) -> list:
        """The jobs' results in order. A client that disconnects meanwhile (or a shutdown that
        cancels the request) cancels its jobs: the scheduler drops them at its next step."""
        waiting = asyncio.gather(*(asyncio.wrap_future(j.future) for j in jobs))
        gone = asyncio.ensure_future(disconnected(request))
        stop = asyncio.ensure_future(self.stopping.wait())
        try:
            await asyncio.wait({waiting, gone, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            stop.cancel()
            if not waiting.done():
                for j in jobs:  # the scheduler ends them ("cancelled") and counts them
                    j.cancelled = True
                waiting.add_done_callback(lambda f: f.cancelled() or f.exception())  # read: asyncio warns otherwise
        if not waiting.done() and self.stopping.is_set():
            raise shutting_down()
        if not waiting.done():
            raise ApiError(CLIENT_GONE, "the client closed the request")
        try:
            return waiting.result()
        except SoftpromptError as e:
            raise ApiError(400, str(e)) from None
        except Exception as e:
            raise ApiError(500, f"generation failed: {type(e).__name__}: {e}") from None

    def model_card(self, e: Loaded) -> dict[str, Any]:
        """A loaded prompt (or the base model) as /v1/models lists it."""
        return {"id": e.name, "object": "model", "created": e.created, "owned_by": "softprompt",
                "virtual_tokens": e.virtual_tokens,
                "base_model": self.base, "task": e.meta.get("task"), "labels": e.meta.get("labels"),
                "chat": bool(e.meta.get("chat"))}


def shutting_down() -> ApiError:
    return ApiError(503, "the server is shutting down and this request did not finish in time: send it again",
                    None, "shutting_down", headers={"Connection": "close"})


async def disconnected(request: Request) -> None:
    """Returns once the client has gone (its connection's next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def get_context(request: Request) -> ServerContext:
    return request.app.state.ctx


Ctx = Annotated[ServerContext, Depends(get_context)]  # a route's parameter `ctx: Ctx` receives the context
