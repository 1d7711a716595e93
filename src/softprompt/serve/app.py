"""The FastAPI app: one ServerContext, the routers of routes/, one JSON error shape, the guard.

`create_app(model, tok, prompts, ServeConfig)` loads the prompts into a Registry, builds the
Scheduler (started and stopped with the app's lifespan) and includes each concern's router.
Every error leaves as OpenAI's {"error": {"message", "type", "param", "code"}}.
"""
from __future__ import annotations

import dataclasses
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..core.config import ServeConfig
from ..base.families import max_positions
from ..core.prompt_protocol import Prompt
from ..core.utils import SoftpromptError
from .context import ServerContext
from .metrics import Metrics, RequestGuard
from .protocol import ApiError, error_response, validation_message
from .registry import Registry
from .routes import admin, classify, openai, ops
from .scheduler import Scheduler

DESCRIPTION = ("Many soft prompts served from one frozen model, with mixed-prompt batching. "
               "OpenAI-compatible: `model` names a soft prompt, or the base model for none.")


def create_app(model, tok, prompts: dict[str, Prompt | str | Path], cfg: ServeConfig | None = None,
               model_name: str | None = None) -> FastAPI:
    """The server for `model` with `prompts` (name -> Prompt, such as a SoftPrompt, or prompt folder) loaded."""
    cfg = cfg or ServeConfig()
    check_config(cfg)
    base = model_name or Path(str(getattr(model.config, "_name_or_path", "") or "base")).name or "base"
    reg = Registry(model, base)
    for name, p in prompts.items():
        if name == base:
            raise SoftpromptError(f"prompt name {name!r} is the base model's name: choose another")
        try:
            reg.add(name, p)
        except ApiError as e:
            raise SoftpromptError(e.message) from None
    sched = Scheduler(model, tok, cfg.max_batch, cfg.max_queue, cfg.batch_wait_ms, live_prompts=reg.tensors,
                      chunk_positions=2 * cfg.max_input_tokens)
    ctx = ServerContext(model, tok, cfg, base, reg, sched, Metrics(), max_positions(model))
    ctx.metrics.watch(lambda: ops.server_state(ctx))

    @asynccontextmanager
    async def lifespan(app):
        sched.start()
        yield
        sched.close()

    app = FastAPI(title="softprompt", version="1", lifespan=lifespan, description=DESCRIPTION)
    app.state.ctx = ctx
    # The parts tests and bench/load_test.py reach for, by their old names.
    app.state.scheduler, app.state.registry, app.state.config, app.state.metrics = sched, reg, cfg, ctx.metrics
    routers = [m.router for m in (openai, classify, admin, ops)]
    for r in routers:
        app.include_router(r)
    app.add_middleware(RequestGuard, limit=cfg.max_body_bytes, metrics=ctx.metrics, read_timeout=cfg.read_timeout,
                       endpoints=[route.path for r in routers for route in r.routes])
    add_error_handlers(app)
    return app


def check_config(cfg: ServeConfig) -> None:
    """ServeConfig's own checks again (a field may have been set since it was built): one line naming the flag."""
    dataclasses.replace(cfg)


def add_error_handlers(app: FastAPI) -> None:
    """One JSON shape for every error, whoever raises it (RequestGuard answers what escapes these)."""

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        msg, param = validation_message(exc)
        return error_response(400, msg, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(SoftpromptError)
    async def _user_error(request, exc: SoftpromptError):
        return error_response(400, str(exc))
