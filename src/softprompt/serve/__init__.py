"""The HTTP server: many soft prompts in front of one frozen model, OpenAI-compatible.

- app.py: `create_app(model, tok, prompts, ServeConfig)`, the FastAPI app (its OpenAPI page at /docs);
- context.py: the one ServerContext every route shares, and the request helpers;
- routes/: the endpoints by concern (OpenAI, classify, admin, ops);
- protocol.py: request bodies and OpenAI-shaped errors; metrics.py: Prometheus metrics and the
  request guard; registry.py: the loaded prompts; scheduler.py: the batching worker;
- runner.py: `serve` (foreground) and `Running` (a background thread, for tests);
- command.py: the `softprompt serve` command (`add_arguments`, `run`).
Every request is validated and tokenised on the event loop, then decoded by the scheduler thread
in shared batches. fastapi and uvicorn (the `serve` extra) are imported only when a server is
built, so `add_arguments` and `run` import without them.
"""
from __future__ import annotations

import importlib

from .command import add_arguments, require_extra, run

__all__ = ["create_app", "serve", "Running", "add_arguments", "run"]

_LAZY = {"create_app": ".app", "serve": ".runner", "Running": ".runner"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    require_extra()
    return getattr(importlib.import_module(_LAZY[name], __name__), name)
