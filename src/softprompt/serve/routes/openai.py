"""OpenAI-compatible generation: POST /v1/completions and /v1/chat/completions.

OpenAI's request and response shapes; `model` names a soft prompt, or the base model for none.
Greedy unless `temperature` > 0. With `stream: true` the answer comes as server-sent events, one
per new piece of text, ending with `data: [DONE]`.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, Callable

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from ...data import chat_wrap
from ...utils import SoftpromptError
from ..context import Ctx, ServerContext
from ..protocol import ApiError, ChatCompletionRequest, CompletionRequest, error_body
from ..registry import Loaded
from ..jobs import GenJob

router = APIRouter(tags=["openai"])


@router.post("/v1/completions", summary="Complete text (OpenAI shape)")
async def completions(req: CompletionRequest, ctx: Ctx, request: Request):
    entry = ctx.registry.get(req.model)
    p = ctx.gen_params(req)
    texts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
    if not texts:
        raise ApiError(400, "prompt is empty: give a string or a non-empty list of strings", "prompt")
    ctx.queueable(len(texts) * req.n, queue_param(ctx, len(texts)))  # before tokenising a long list
    chat = bool(entry.meta.get("chat"))  # a prompt trained on chat-wrapped inputs gets them here too
    inputs = [ctx.encode(chat_wrap(ctx.tok, t) if chat and t else t, chat, "prompt", t) for t in texts]
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
        return stream(lambda lis: make_jobs(ctx, entry, inputs, req.n, p, lis), chunk,
                      usage_chunk=usage_chunk if include_usage(req) else None)
    res = await ctx.results(make_jobs(ctx, entry, inputs, req.n, p), request)
    return {"id": rid, "object": "text_completion", "created": created, "model": req.model,
            "choices": [{"index": i, "text": r["text"], "logprobs": None, "finish_reason": r["finish_reason"]}
                        for i, r in enumerate(res)],
            "usage": usage(inputs, res)}


@router.post("/v1/chat/completions", summary="Chat (OpenAI shape)")
async def chat_completions(req: ChatCompletionRequest, ctx: Ctx, request: Request):
    entry = ctx.registry.get(req.model)
    p = ctx.gen_params(req)
    ids = ctx.encode(render_chat(ctx.tok, req), True, "messages")
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
        return stream(lambda lis: make_jobs(ctx, entry, [ids], req.n, p, lis), chunk, first,
                      usage_chunk if include_usage(req) else None)
    res = await ctx.results(make_jobs(ctx, entry, [ids], req.n, p), request)
    return {"id": rid, "object": "chat.completion", "created": created, "model": req.model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": r["text"]}, "logprobs": None,
                         "finish_reason": r["finish_reason"]} for i, r in enumerate(res)],
            "usage": usage([ids], res)}


def render_chat(tok, req: ChatCompletionRequest) -> str:
    """The messages through the tokenizer's chat template, ready for the assistant's turn."""
    if not getattr(tok, "chat_template", None):
        raise ApiError(400, "this model's tokenizer has no chat template: use /v1/completions", "messages")
    msgs = []
    for m in req.messages:
        content = m.content if isinstance(m.content, str) else "".join(
            part.text for part in m.content)
        msgs.append({"role": m.role, "content": content})
    try:
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # templates raise on roles they do not know, etc.
        raise ApiError(400, f"cannot render messages with the chat template: {e}", "messages") from None


def make_jobs(ctx: ServerContext, entry: Loaded, inputs: list[list[int]], n: int, p: dict[str, Any],
              listener=None) -> list[GenJob]:
    """n choices per input, queued together; choice k is seeded with seed + k."""
    jobs = [GenJob(entry.tensor, ids, index=i * n + k, listener=listener, **{**p, "seed": p["seed"] + k})
            for i, ids in enumerate(inputs) for k in range(n)]
    ctx.submit(jobs, queue_param(ctx, len(inputs)))
    return jobs


def queue_param(ctx: ServerContext, prompts: int) -> str:
    return "prompt" if prompts > ctx.scheduler.max_queue else "n"


def include_usage(req) -> bool:
    return bool(req.stream_options and req.stream_options.include_usage)


def usage(inputs: list[list[int]], res: list[dict]) -> dict[str, int]:
    given = sum(len(ids) for ids in inputs)  # n choices of one input count its tokens once
    done = sum(len(r["tokens"]) for r in res)
    return {"prompt_tokens": given, "completion_tokens": done, "total_tokens": given + done}


def stream(jobs_for: Callable, chunk: Callable, first_chunks: Callable | None = None,
           usage_chunk: Callable | None = None) -> StreamingResponse:
    """SSE: `jobs_for(listener)` queues the jobs; `chunk(index, delta, finish)` shapes each event;
    `usage_chunk(results)`, when given, shapes a last event with the usage (stream_options)."""
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
                idx, kind, payload = await q.get()
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
