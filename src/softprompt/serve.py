"""The HTTP server: many soft prompts in front of one frozen model, OpenAI-compatible.

`create_app(model, tok, prompts, ServeConfig)` builds a FastAPI app (its OpenAPI page at /docs):
- POST /v1/completions, /v1/chat/completions: OpenAI's request and response shapes (streaming
  with `stream: true` as server-sent events ending in `data: [DONE]`); `model` names a soft prompt,
  or the base model for none. Greedy unless `temperature` > 0.
- POST /v1/classify: rank classification of a text over label words with a prompt.
- GET /v1/models, /health, /metrics (Prometheus text format).
- POST /v1/admin/prompts, DELETE /v1/admin/prompts/{name}: load/unload prompts at run time,
  behind a bearer token.
Every request is validated and tokenised here, then decoded by the `scheduler.Scheduler` thread in
shared batches. Errors are JSON in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
fastapi and uvicorn (the `serve` extra) are imported only when a server is built.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import math
import secrets
import threading
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from .classify import label_token_ids
from .config import ServeConfig
from .data import chat_wrap
from .families import max_positions
from .prompt import SoftPrompt
from .registry import Loaded, Registry
from .metrics import Metrics, _Guard
from .protocol import (ApiError, ChatCompletionRequest, ClassifyRequest, CompletionRequest, LoadPromptRequest,
                       _validation_message, error_body)
from .scheduler import ClassifyJob, GenJob, QueueFull, Scheduler
from .utils import SoftpromptError

try:  # the `serve` extra; the rest of softprompt works without it
    from fastapi import Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise SoftpromptError(f"softprompt serve needs the serve extra: pip install 'softprompt[serve]' ({e})") from None

# ---------------------------------------------------------------- the app

def create_app(model, tok, prompts: dict[str, SoftPrompt | str | Path], cfg: ServeConfig | None = None,
               model_name: str | None = None) -> "FastAPI":
    """The server for `model` with `prompts` (name -> SoftPrompt or prompt folder) loaded."""
    cfg = cfg or ServeConfig()
    base = model_name or Path(str(getattr(model.config, "_name_or_path", "") or "base")).name or "base"
    reg = Registry(model, base)
    for name, p in prompts.items():
        if name == base:
            raise SoftpromptError(f"prompt name {name!r} is the base model's name: choose another")
        try:
            reg.add(name, p)
        except ApiError as e:
            raise SoftpromptError(e.message) from None
    sched = Scheduler(model, tok, cfg.max_batch, cfg.max_queue, cfg.batch_wait_ms, live_prompts=reg.tensors)
    metrics = Metrics()
    limit = max_positions(model)

    @asynccontextmanager
    async def lifespan(app):
        sched.start()
        yield
        sched.close()

    app = FastAPI(title="softprompt", version="1", lifespan=lifespan,
                  description="Many soft prompts served from one frozen model, with mixed-prompt batching. "
                              "OpenAI-compatible: `model` names a soft prompt, or the base model for none.")
    app.state.scheduler, app.state.registry, app.state.config, app.state.metrics = sched, reg, cfg, metrics
    app.add_middleware(_Guard, limit=cfg.max_body_bytes, metrics=metrics)

    # -------------------------------------------------------- error handlers: one JSON shape for all

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return JSONResponse(error_body(exc.status, exc.message, exc.param, exc.code), exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        msg, param = _validation_message(exc)
        return JSONResponse(error_body(400, msg, param), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(SoftpromptError)
    async def _user_error(request, exc: SoftpromptError):
        return JSONResponse(error_body(400, str(exc)), 400)

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        return JSONResponse(error_body(500, f"internal error: {type(exc).__name__}: {exc}"), 500)

    # -------------------------------------------------------- shared request handling

    def encode(text: str, chat: bool, param: str, raw: str | None = None) -> list[int]:
        """Token ids of `text` (`raw`: what the client sent, before any chat template)."""
        if not (text if raw is None else raw):
            raise ApiError(400, f"{param} is empty: give at least one token of input", param)
        if len(text) > cfg.max_input_tokens * 64:  # do not even tokenise absurd inputs
            raise ApiError(400, f"{param} is too long ({len(text)} characters)", param, "context_length_exceeded")
        ids = tok(text, add_special_tokens=not chat).input_ids
        if not ids:
            raise ApiError(400, f"{param} is empty: give at least one token of input", param)
        if len(ids) > cfg.max_input_tokens:
            raise ApiError(400, f"{param} has {len(ids)} tokens, over this server's limit of "
                                f"{cfg.max_input_tokens}", param, "context_length_exceeded")
        return ids

    def fits(entry: Loaded, ids: list[int], new: int, param: str) -> None:
        P = 0 if entry.tensor is None else entry.tensor.shape[0]
        if limit and P + len(ids) + new > limit:
            raise ApiError(400, f"{param}: {P} virtual + {len(ids)} input + {new} new tokens exceed the "
                                f"model's {limit} positions", param, "context_length_exceeded")

    def gen_params(req) -> dict[str, Any]:
        mt = getattr(req, "max_completion_tokens", None) or req.max_tokens or cfg.default_max_tokens
        if mt > cfg.max_new_tokens:
            raise ApiError(400, f"max_tokens {mt} is over this server's cap of {cfg.max_new_tokens}", "max_tokens")
        if req.n > cfg.max_n:
            raise ApiError(400, f"n {req.n} is over this server's cap of {cfg.max_n}", "n")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise ApiError(400, "stop takes at most 4 non-empty strings", "stop")
        if req.logprobs:
            raise ApiError(400, "logprobs are not supported by this server", "logprobs")
        sample = bool(req.temperature)
        seed = req.seed if req.seed is not None else secrets.randbits(31)
        return {"max_new": mt, "sample": sample, "temperature": req.temperature or 1.0,
                "top_p": req.top_p if sample else 1.0, "repetition_penalty": req.repetition_penalty,
                "seed": seed, "stop": stop}

    def make_jobs(entry: Loaded, inputs: list[list[int]], n: int, p: dict[str, Any], listener=None) -> list[GenJob]:
        jobs = [GenJob(entry.tensor, ids, index=i * n + k, listener=listener, **{**p, "seed": p["seed"] + k})
                for i, ids in enumerate(inputs) for k in range(n)]
        try:
            sched.submit(jobs)
        except QueueFull as e:
            raise ApiError(503, f"server busy: {e}; retry after {cfg.retry_after} s", None, "queue_full",
                           headers={"Retry-After": str(cfg.retry_after)}) from None
        return jobs

    async def results(jobs: list) -> list:
        try:
            return await asyncio.gather(*(asyncio.wrap_future(j.future) for j in jobs))
        except asyncio.CancelledError:  # the client went away: stop spending compute on it
            for j in jobs:
                j.cancelled = True
            raise
        except SoftpromptError as e:
            raise ApiError(400, str(e)) from None
        except Exception as e:
            raise ApiError(500, f"generation failed: {type(e).__name__}: {e}") from None

    def usage(inputs: list[list[int]], res: list[dict]) -> dict[str, int]:
        given = sum(len(ids) for ids in inputs)  # n choices of one input count its tokens once
        done = sum(len(r["tokens"]) for r in res)
        return {"prompt_tokens": given, "completion_tokens": done, "total_tokens": given + done}

    def stream(jobs_for, chunk, first_chunks=()) -> StreamingResponse:
        """SSE: `jobs_for(listener)` queues the jobs; `chunk(index, delta, finish)` shapes each event."""
        loop, q = asyncio.get_running_loop(), asyncio.Queue()

        def listener(job, kind, payload):
            loop.call_soon_threadsafe(q.put_nowait, (job.index, kind, payload))

        jobs = jobs_for(listener)  # raises (503...) before any byte is sent

        async def events():
            try:
                for c in first_chunks(len(jobs)) if first_chunks else ():
                    yield f"data: {json.dumps(c)}\n\n"
                left = len(jobs)
                while left:
                    idx, kind, payload = await q.get()
                    if kind == "delta":
                        yield f"data: {json.dumps(chunk(idx, payload, None))}\n\n"
                    elif kind == "done":
                        left -= 1
                        yield f"data: {json.dumps(chunk(idx, None, payload['finish_reason']))}\n\n"
                    else:
                        left -= 1
                        status = 400 if isinstance(payload, SoftpromptError) else 500
                        yield f"data: {json.dumps(error_body(status, f'choice {idx} failed: {payload}'))}\n\n"
                yield "data: [DONE]\n\n"
            finally:  # also runs when the client disconnects mid-stream
                for j in jobs:
                    j.cancelled = True

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # -------------------------------------------------------- OpenAI-compatible generation

    @app.post("/v1/completions", tags=["openai"], summary="Complete text (OpenAI shape)")
    async def completions(req: CompletionRequest):
        entry = reg.get(req.model)
        p = gen_params(req)
        if req.echo:
            raise ApiError(400, "echo is not supported by this server", "echo")
        texts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not texts:
            raise ApiError(400, "prompt is empty: give a string or a non-empty list of strings", "prompt")
        chat = bool(entry.meta.get("chat"))  # a prompt trained on chat-wrapped inputs gets them here too
        inputs = [encode(chat_wrap(tok, t) if chat and t else t, chat, "prompt", t) for t in texts]
        for ids in inputs:
            fits(entry, ids, p["max_new"], "prompt")
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def chunk(idx, text, finish):
            return {"id": rid, "object": "text_completion", "created": created, "model": req.model,
                    "choices": [{"index": idx, "text": text or "", "logprobs": None, "finish_reason": finish}]}

        if req.stream:
            return stream(lambda lis: make_jobs(entry, inputs, req.n, p, lis), chunk)
        res = await results(make_jobs(entry, inputs, req.n, p))
        return {"id": rid, "object": "text_completion", "created": created, "model": req.model,
                "choices": [{"index": i, "text": r["text"], "logprobs": None, "finish_reason": r["finish_reason"]}
                            for i, r in enumerate(res)],
                "usage": usage(inputs, res)}

    @app.post("/v1/chat/completions", tags=["openai"], summary="Chat (OpenAI shape)")
    async def chat_completions(req: ChatCompletionRequest):
        entry = reg.get(req.model)
        p = gen_params(req)
        if not getattr(tok, "chat_template", None):
            raise ApiError(400, "this model's tokenizer has no chat template: use /v1/completions", "messages")
        msgs = []
        for m in req.messages:
            content = m.content if isinstance(m.content, str) else "".join(
                part.get("text", "") for part in m.content if part.get("type") == "text")
            msgs.append({"role": m.role, "content": content})
        try:
            rendered = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # templates raise on roles they do not know, etc.
            raise ApiError(400, f"cannot render messages with the chat template: {e}", "messages") from None
        ids = encode(rendered, True, "messages")
        fits(entry, ids, p["max_new"], "messages")
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def chunk(idx, text, finish):
            delta = {"content": text} if text is not None else {}
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": req.model,
                    "choices": [{"index": idx, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        def first(n):
            return [{"id": rid, "object": "chat.completion.chunk", "created": created, "model": req.model,
                     "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}]} for i in range(n)]

        if req.stream:
            return stream(lambda lis: make_jobs(entry, [ids], req.n, p, lis), chunk, first)
        res = await results(make_jobs(entry, [ids], req.n, p))
        return {"id": rid, "object": "chat.completion", "created": created, "model": req.model,
                "choices": [{"index": i, "message": {"role": "assistant", "content": r["text"]}, "logprobs": None,
                             "finish_reason": r["finish_reason"]} for i, r in enumerate(res)],
                "usage": usage([ids], res)}

    # -------------------------------------------------------- classification

    @app.post("/v1/classify", tags=["softprompt"], summary="Rank-classify a text over label words")
    async def classify(req: ClassifyRequest):
        """The label whose tokens the model finds most probable after the text (with the task's prompt);
        `scores` are log-probabilities of each label's tokens, `probabilities` their softmax."""
        entry = reg.get(req.task, "task")
        labels = req.labels if req.labels is not None else list(entry.meta.get("labels") or [])
        if len(labels) < 2:
            raise ApiError(400, "labels: give at least two label words (this task has none of its own)", "labels")
        if len(labels) > 64 or len(set(labels)) != len(labels) or any(not w.strip() for w in labels):
            raise ApiError(400, "labels must be 2 to 64 distinct non-empty words", "labels")
        chat = bool(entry.meta.get("chat"))
        rendered = chat_wrap(tok, req.text) if chat and req.text else req.text
        ids = encode(rendered, chat, "text", req.text)
        cands = label_token_ids(tok, labels, rendered)
        fits(entry, ids, max(len(c) for c in cands), "text")
        job = ClassifyJob(entry.tensor, ids, candidates=cands)
        try:
            sched.submit([job])
        except QueueFull as e:
            raise ApiError(503, f"server busy: {e}; retry after {cfg.retry_after} s", None, "queue_full",
                           headers={"Retry-After": str(cfg.retry_after)}) from None
        (scores,) = await results([job])
        m = max(scores)
        z = sum(math.exp(s - m) for s in scores)
        best = max(range(len(labels)), key=lambda k: scores[k])
        return {"task": req.task, "label": labels[best], "scores": dict(zip(labels, scores)),
                "probabilities": {w: math.exp(s - m) / z for w, s in zip(labels, scores)},
                "usage": {"prompt_tokens": len(ids)}}

    # -------------------------------------------------------- models, health, metrics

    def model_card(e: Loaded) -> dict[str, Any]:
        return {"id": e.name, "object": "model", "created": e.created, "owned_by": "softprompt",
                "virtual_tokens": 0 if e.tensor is None else int(e.tensor.shape[0]),
                "base_model": base, "task": e.meta.get("task"), "labels": e.meta.get("labels"),
                "chat": bool(e.meta.get("chat"))}

    @app.get("/v1/models", tags=["openai"], summary="The loaded prompts and the base model")
    async def models():
        return {"object": "list", "data": [model_card(e) for e in reg.items.values()]}

    @app.get("/health", tags=["ops"], summary="Liveness: 200 while the scheduler thread runs")
    async def health():
        ok = sched.alive
        body = {"status": "ok" if ok else "scheduler stopped", "model": base, "prompts": len(reg.items) - 1,
                "queue": sched.depth}
        return JSONResponse(body, 200 if ok else 503)

    @app.get("/metrics", tags=["ops"], summary="Prometheus text metrics", response_class=PlainTextResponse)
    async def metrics_page():
        s = sched.stats
        text = metrics.render(
            gauges={"queue_depth": sched.depth, "queue_limit": cfg.max_queue, "prompts_loaded": len(reg.items) - 1,
                    "prompt_kv_cached": len(sched.kv.store), "scheduler_up": int(sched.alive)},
            counters={k: s[k] for k in ("batches", "batch_jobs", "gen_rows", "classify_rows", "generated_tokens",
                                        "failed_jobs", "batch_retries", "rejected_jobs")})
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    # -------------------------------------------------------- admin: prompts at run time

    def admin(request: Request) -> None:
        if not cfg.admin_token:
            raise ApiError(403, "admin endpoints are off: start the server with --admin-token or "
                                "SOFTPROMPT_ADMIN_TOKEN")
        got = request.headers.get("authorization", "")
        token = got[7:] if got.lower().startswith("bearer ") else request.headers.get("x-admin-token", "")
        if not token or not hmac.compare_digest(token.encode(), cfg.admin_token.encode()):
            raise ApiError(401, "missing or wrong admin token (send Authorization: Bearer TOKEN)",
                           headers={"WWW-Authenticate": "Bearer"})

    @app.post("/v1/admin/prompts", tags=["admin"], status_code=201, dependencies=[Depends(admin)],
              summary="Load a prompt folder from the server's disk (safetensors only, hidden size checked)")
    def load(req: LoadPromptRequest):
        if req.name in reg.items:
            raise ApiError(409, f"a model named {req.name!r} is already loaded: unload it first", "name")
        try:
            return model_card(reg.add(req.name, req.path))
        except SoftpromptError as e:
            raise ApiError(400, str(e), "path") from None

    @app.delete("/v1/admin/prompts/{name}", tags=["admin"], dependencies=[Depends(admin)],
                summary="Unload a prompt (requests already queued with it still finish)")
    def unload(name: str):
        reg.remove(name)
        return {"id": name, "object": "model", "deleted": True}

    return app


# ---------------------------------------------------------------- running it

class Running:
    """A uvicorn server on a background thread (tests, the load test); `stop()` ends it."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import socket

        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() - t0 > 30:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()


def serve(model, tok, prompts: dict[str, str], cfg: ServeConfig, model_name: str) -> None:
    """Run the server in the foreground until interrupted (`softprompt serve`)."""
    import uvicorn

    app = create_app(model, tok, prompts, cfg, model_name)
    names = ", ".join(prompts) or "none"
    print(f"[softprompt] serving {model_name} with prompts: {names} on http://{cfg.host}:{cfg.port} "
          f"(API docs at /docs)", flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info")
