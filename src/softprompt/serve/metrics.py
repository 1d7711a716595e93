"""Server metrics in Prometheus' text format, and the ASGI middleware that records every request
(status, time to its last byte) and refuses oversized bodies with 413.

A request is counted under the path template of the route it matches ("/v1/classify",
"/v1/admin/prompts/{name}"), or "other": labels stay few whatever paths clients send. The app
passes its routes' templates in, so a new route is counted without being listed here.
"""
from __future__ import annotations

import json
import threading
import time

from starlette.routing import compile_path

from .protocol import error_body

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.hist: dict[str, list[float]] = {}  # endpoint -> bucket counts + [sum, count]

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        with self.lock:
            self.requests[(endpoint, status)] = self.requests.get((endpoint, status), 0) + 1
            h = self.hist.setdefault(endpoint, [0.0] * (len(LATENCY_BUCKETS) + 2))
            for i, b in enumerate(LATENCY_BUCKETS):
                if seconds <= b:
                    h[i] += 1
            h[-2] += seconds
            h[-1] += 1

    def render(self, gauges: dict[str, float], counters: dict[str, float]) -> str:
        out = ["# HELP softprompt_requests_total HTTP requests by endpoint and status code.",
               "# TYPE softprompt_requests_total counter"]
        with self.lock:
            for (ep, code), n in sorted(self.requests.items()):
                out.append(f'softprompt_requests_total{{endpoint="{ep}",code="{code}"}} {n}')
            out += ["# HELP softprompt_request_seconds Time to the end of the response (streams included).",
                    "# TYPE softprompt_request_seconds histogram"]
            for ep, h in sorted(self.hist.items()):
                for i, b in enumerate(LATENCY_BUCKETS):
                    out.append(f'softprompt_request_seconds_bucket{{endpoint="{ep}",le="{b}"}} {int(h[i])}')
                out.append(f'softprompt_request_seconds_bucket{{endpoint="{ep}",le="+Inf"}} {int(h[-1])}')
                out.append(f'softprompt_request_seconds_sum{{endpoint="{ep}"}} {h[-2]:.6f}')
                out.append(f'softprompt_request_seconds_count{{endpoint="{ep}"}} {int(h[-1])}')
        for name, v in counters.items():
            out += [f"# TYPE softprompt_{name}_total counter", f"softprompt_{name}_total {int(v)}"]
        for name, v in gauges.items():
            out += [f"# TYPE softprompt_{name} gauge", f"softprompt_{name} {v:g}"]
        return "\n".join(out) + "\n"


class RequestGuard:
    """ASGI middleware: refuses bodies over the limit (413) and records each request's status and
    time to its last byte (so streams count whole) in the metrics."""

    def __init__(self, app, limit: int, metrics: Metrics, endpoints: list[str]):
        self.app, self.limit, self.metrics = app, limit, metrics
        self.endpoints = [(compile_path(p)[0], p) for p in endpoints]  # (regex, template) per route

    def endpoint(self, path: str) -> str:
        """The template of the route `path` matches (whatever the method), or 'other'."""
        return next((p for regex, p in self.endpoints if regex.match(path)), "other")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        ep = self.endpoint(scope["path"])
        state = {"status": 500, "started": False, "seen": 0}

        async def send_(msg):
            if msg["type"] == "http.response.start":
                state["status"], state["started"] = msg["status"], True
            await send(msg)
            if msg["type"] == "http.response.body" and not msg.get("more_body"):
                self.metrics.observe(ep, state["status"], time.perf_counter() - t0)

        async def reply(status: int, message: str):
            body = json.dumps(error_body(status, message)).encode()
            await send_({"type": "http.response.start", "status": status,
                         "headers": [(b"content-type", b"application/json")]})
            await send_({"type": "http.response.body", "body": body})

        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await reply(413, f"request body of {int(length)} bytes is over the {self.limit}-byte limit")

        async def receive_():  # bodies without a Content-Length are counted as they arrive
            msg = await receive()
            if msg["type"] == "http.request":
                state["seen"] += len(msg.get("body", b""))
                if state["seen"] > self.limit:
                    raise _TooLarge()
            return msg

        try:
            await self.app(scope, receive_, send_)
        except _TooLarge:
            if not state["started"]:
                await reply(413, f"request body is over the {self.limit}-byte limit")


class _TooLarge(Exception):
    """Raised inside the app's body read once the body passes the limit; the guard answers 413."""
