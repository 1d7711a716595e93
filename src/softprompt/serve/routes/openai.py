"""OpenAI-compatible generation: POST /v1/completions and /v1/chat/completions.

OpenAI's request and response shapes; `model` names a soft prompt, or the base model for none.
Greedy unless `temperature` > 0. With `stream: true` the answer comes as server-sent events, one
per new piece of text, ending with `data: [DONE]`.

`logprobs` (and `echo`, and chat's `logprobs`/`top_logprobs`) are the soft prompt's: after
generation, one ScoreJob per distinct choice runs [prompt ; input ; generated tokens] through
classify.token_logprobs (the scoring pass, rather than the decode steps' logits: the engine's
CUDA-graph steps stay as they are). `echo` with `max_tokens: 0` scores the prompt alone, as
lm-evaluation-harness's `local-completions` asks. Neither streams: both are refused by name there.
A prompt of token ids is taken as sent (no BOS, no chat template), so that the client's own
token count (lm_eval's context length) indexes the echoed tokens.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from typing import Any, Callable

import torch
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from ...core.utils import SoftpromptError
from ...data.chat import as_turns
from ..context import Ctx, Hold, ServerContext, shutting_down
from ..jobs import GenJob, ScoreJob
from ..logprobs import chat_logprobs, completion_logprobs
from ..metrics import ParsedBodyRoute
from ..protocol import ApiError, ChatCompletionRequest, CompletionRequest, error_body
from ..registry import Loaded

router = APIRouter(tags=["openai"], route_class=ParsedBodyRoute)
REQUESTS = itertools.count()  # numbers a request's jobs, for the scheduler's fair share


@router.post("/v1/completions", summary="Complete text (OpenAI shape)")
async def completions(req: CompletionRequest, ctx: Ctx, request: Request):
    entry = ctx.registry.get(req.model)
    p = ctx.gen_params(req)
    if req.stream and (req.logprobs is not None or req.echo):
        name = "logprobs" if req.logprobs is not None else "echo"
        raise ApiError(400, f"{name} is not supported with stream: true: leave one of them out", name,
                       "unsupported_parameter")
    prompts = prompt_list(req.prompt)
    if not prompts:
        raise ApiError(400, "prompt is empty: give a string, token ids, or a non-empty list of them", "prompt")
    # A choice that is scored after it is generated holds a second queue place from the start (N5).
    scored = req.logprobs is not None and p["max_new"] > 0
    ctx.queueable(len(prompts) * req.n * (1 + scored), queue_param(ctx, len(prompts)))  # before tokenising
    if req.echo and entry.meta.get("chat") and any(isinstance(t, str) for t in prompts):
        raise ApiError(400, f"echo is not supported for {req.model!r}: it wraps a text prompt in the chat template, "
                            "whose tokens are not the prompt's; send the prompt as token ids to score them as sent",
                       "echo", "unsupported_parameter")
    inputs = await run_in_threadpool(lambda: [prompt_ids(ctx, entry, t) for t in prompts])  # off the event loop
    for ids in inputs:
        ctx.fits(entry, ids, p["max_new"], "prompt")
    rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

    def chunk(idx, text, finish):
        return {"id": rid, "object": "text_completion", "created": created, "model": req.model,
                "choices": [{"index": idx, "text": text or "", "logprobs": None, "finish_reason": finish}]}

    def usage_chunk(res):
        return {"id": rid, "object": "text_completion", "created": created, "model": req.model, "choices": [],
                "usage": usage(inputs, res)}

    if req.stream:
        return stream(ctx, lambda lis: make_jobs(ctx, entry, inputs, req.n, p, lis), chunk,
                      usage_chunk=usage_chunk if include_usage(req) else None)
    hold = Hold(len(inputs) * req.n if scored else 0)
    try:
        res = await generated(ctx, entry, inputs, req.n, p, request, hold)
        shown = [t if isinstance(t, str) else ctx.tok.decode(t, skip_special_tokens=False) for t in prompts]
        lps = (await completion_scores(ctx, entry, inputs, shown, res, req, request, hold)
               if req.logprobs is not None else [None] * len(res))
    finally:
        ctx.release(hold)
    return {"id": rid, "object": "text_completion", "created": created, "model": req.model,
            "choices": [{"index": i, "text": (shown[i // req.n] if req.echo else "") + r["text"], "logprobs": lp,
                         "finish_reason": r["finish_reason"]} for i, (r, lp) in enumerate(zip(res, lps))],
            "usage": usage(inputs, res)}


def prompt_list(prompt: str | list) -> list[str | list[int]]:
    """The prompts of a request: one text, one list of token ids, or a list of either."""
    if isinstance(prompt, str) or (prompt and all(isinstance(x, int) for x in prompt)):
        return [prompt]
    return list(prompt)


def prompt_ids(ctx: ServerContext, entry: Loaded, prompt: str | list[int]) -> list[int]:
    """A prompt's input ids: token ids as sent; text chat-wrapped for a prompt trained on
    chat-wrapped inputs (as generation and /v1/classify do), then tokenised."""
    if isinstance(prompt, list):
        return ctx.token_ids(prompt, "prompt")
    if entry.meta.get("chat") and prompt:
        return ctx.encode_messages([{"role": "user", "content": prompt}], "prompt")
    return ctx.encode(prompt, "prompt")


async def generated(ctx: ServerContext, entry: Loaded, inputs: list[list[int]], n: int, p: dict[str, Any],
                    request: Request, hold: Hold | None = None) -> list[dict]:
    """Each choice's result; with max_tokens 0 (echo only) nothing is generated. `hold`: queue
    places to hold from now for the choices' scoring."""
    if p["max_new"] == 0:
        return [{"text": "", "tokens": [], "finish_reason": "length", "eos": None} for _ in range(len(inputs) * n)]
    return await ctx.results(make_jobs(ctx, entry, inputs, n, p, reserve=hold), request)


async def completion_scores(ctx: ServerContext, entry: Loaded, inputs: list[list[int]], shown: list[str],
                            res: list[dict], req: CompletionRequest, request: Request,
                            hold: Hold | None = None) -> list[dict]:
    """Each choice's legacy logprobs: its generated tokens (the end-of-sequence token included, when
    one ended it: a max_tokens 1 scoring request then still gets one token after the prompt), after
    the prompt's tokens with echo (the first one null where nothing is scored before it: a soft
    prompt's last virtual token predicts it, as `eval` and PEFT score it; a prefix or none does not)."""
    first_scored = 0 if isinstance(entry.tensor, torch.Tensor) and entry.tensor.shape[0] else 1
    seqs, starts = [], []
    for i, r in enumerate(res):
        ids = inputs[i // req.n]
        seqs.append(ids + r["tokens"] + ([r["eos"]] if r["eos"] is not None else []))
        starts.append(first_scored if req.echo else len(ids))
    scores = await score(ctx, entry, [(s[:k], s[k:]) for s, k in zip(seqs, starts)], req.logprobs, request,
                         queue_param(ctx, len(inputs)), hold)
    out = []
    for i, (seq, k, (lps, tops)) in enumerate(zip(seqs, starts, scores)):
        first = 0 if req.echo else k
        offset = 0 if req.echo else len(shown[i // req.n])
        out.append(completion_logprobs(ctx.tok, seq, first, k, lps, tops, offset))
    return out


async def score(ctx: ServerContext, entry: Loaded, rows: list[tuple[list[int], list[int]]], top: int,
                request: Request, param: str | None, hold: Hold | None = None) -> list[tuple[list, list]]:
    """(log-probabilities, top tokens) of each row's continuation after its input, with the entry's
    prompt: one ScoreJob per distinct row (greedy choices of one prompt are alike), in the queue
    places `hold` held for them."""
    jobs: dict[tuple, ScoreJob] = {}
    for ids, cont in rows:
        key = (tuple(ids), tuple(cont))
        if cont and key not in jobs:
            jobs[key] = ScoreJob(entry.tensor, list(ids), cont=list(cont), top=top)
    if jobs:
        ctx.submit(list(jobs.values()), param, use=hold)
    done = dict(zip(jobs, await ctx.results(list(jobs.values()), request))) if jobs else {}
    return [done.get((tuple(ids), tuple(cont)), ([], [])) for ids, cont in rows]


@router.post("/v1/chat/completions", summary="Chat (OpenAI shape)")
async def chat_completions(req: ChatCompletionRequest, ctx: Ctx, request: Request):
    entry = ctx.registry.get(req.model)
    p = ctx.gen_params(req)
    if req.top_logprobs and not req.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    if req.logprobs and req.stream:
        raise ApiError(400, "logprobs is not supported with stream: true: leave one of them out", "logprobs",
                       "unsupported_parameter")
    ids = await run_in_threadpool(ctx.encode_messages, messages(req), "messages")  # off the event loop
    ctx.fits(entry, ids, p["max_new"], "messages")
    rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

    def chunk(idx, text, finish):
        delta = {"content": text} if text is not None else {}
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": req.model,
                "choices": [{"index": idx, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    def first(n):  # OpenAI opens each choice's stream with the assistant's role
        return [{"id": rid, "object": "chat.completion.chunk", "created": created, "model": req.model,
                 "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}]} for i in range(n)]

    def usage_chunk(res):
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": req.model,
                "choices": [], "usage": usage([ids], res)}

    if req.stream:
        return stream(ctx, lambda lis: make_jobs(ctx, entry, [ids], req.n, p, lis), chunk, first,
                      usage_chunk if include_usage(req) else None)
    hold = Hold(req.n if req.logprobs else 0)  # the choices' scoring holds its queue places from the start
    try:
        res = await ctx.results(make_jobs(ctx, entry, [ids], req.n, p, reserve=hold), request)
        lps: list[dict | None] = [None] * len(res)
        if req.logprobs:  # the content's tokens: the end-of-sequence token is not part of it
            scores = await score(ctx, entry, [(ids, r["tokens"]) for r in res], req.top_logprobs or 0, request, "n",
                                 hold)
            lps = [chat_logprobs(ctx.tok, ids, r["tokens"], *s) for r, s in zip(res, scores)]
    finally:
        ctx.release(hold)
    return {"id": rid, "object": "chat.completion", "created": created, "model": req.model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": r["text"]}, "logprobs": lp,
                         "finish_reason": r["finish_reason"]} for i, (r, lp) in enumerate(zip(res, lps))],
            "usage": usage([ids], res)}


def messages(req: ChatCompletionRequest) -> list[dict[str, str]]:
    """The request's messages as every tool takes them (data.chat.as_turns: text parts joined, the
    developer role as system)."""
    return as_turns([m.model_dump() for m in req.messages])


def make_jobs(ctx: ServerContext, entry: Loaded, inputs: list[list[int]], n: int, p: dict[str, Any],
              listener=None, reserve: Hold | None = None) -> list[GenJob]:
    """n choices per input, queued together; choice k is seeded with seed + k."""
    request = next(REQUESTS)
    jobs = [GenJob(entry.tensor, ids, index=i * n + k, listener=listener, request=request,
                   **{**p, "seed": p["seed"] + k}) for i, ids in enumerate(inputs) for k in range(n)]
    ctx.submit(jobs, queue_param(ctx, len(inputs)), reserve=reserve)
    return jobs


def queue_param(ctx: ServerContext, prompts: int) -> str:
    return "prompt" if prompts > ctx.scheduler.max_queue else "n"


def include_usage(req) -> bool:
    return bool(req.stream_options and req.stream_options.include_usage)


def usage(inputs: list[list[int]], res: list[dict]) -> dict[str, int]:
    given = sum(len(ids) for ids in inputs)  # n choices of one input count its tokens once
    done = sum(len(r["tokens"]) for r in res)
    return {"prompt_tokens": given, "completion_tokens": done, "total_tokens": given + done}


def stream(ctx: ServerContext, jobs_for: Callable, chunk: Callable, first_chunks: Callable | None = None,
           usage_chunk: Callable | None = None) -> StreamingResponse:
    """SSE: `jobs_for(listener)` queues the jobs; `chunk(index, delta, finish)` shapes each event;
    `usage_chunk(results)`, when given, shapes a last event with the usage (stream_options). A
    shutdown's deadline ends the stream with an error event and [DONE]."""
    loop, q = asyncio.get_running_loop(), asyncio.Queue()

    def listener(job, kind, payload):  # called on the scheduler thread
        loop.call_soon_threadsafe(q.put_nowait, (job.index, kind, payload))

    jobs = jobs_for(listener)  # raises (503...) before any byte is sent

    async def events():
        try:
            for c in first_chunks(len(jobs)) if first_chunks else ():
                yield f"data: {json.dumps(c)}\n\n"
            left, done = len(jobs), []
            while left:
                got = await next_event(q, ctx.stopping)
                if got is None:
                    yield f"data: {json.dumps(error_body(503, shutting_down().message, code='shutting_down'))}\n\n"
                    yield "data: [DONE]\n\n"
                    return
                idx, kind, payload = got
                if kind == "delta":
                    yield f"data: {json.dumps(chunk(idx, payload, None))}\n\n"
                elif kind == "done":
                    left -= 1
                    done.append(payload)
                    yield f"data: {json.dumps(chunk(idx, None, payload['finish_reason']))}\n\n"
                else:
                    left -= 1
                    status = 400 if isinstance(payload, SoftpromptError) else 500
                    yield f"data: {json.dumps(error_body(status, f'choice {idx} failed: {payload}'))}\n\n"
            if usage_chunk is not None:
                yield f"data: {json.dumps(usage_chunk(done))}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # also runs when the client disconnects mid-stream
            for j in jobs:
                j.cancelled = True

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def next_event(q: asyncio.Queue, stopping: asyncio.Event):
    """The queue's next item, or None once `stopping` is set."""
    if stopping.is_set():
        return None
    get, stop = asyncio.ensure_future(q.get()), asyncio.ensure_future(stopping.wait())
    done, _ = await asyncio.wait({get, stop}, return_when=asyncio.FIRST_COMPLETED)
    stop.cancel()
    if get in done:
        return get.result()
    get.cancel()
    return None
