"""Server metrics (prometheus_client, one registry per app) and the ASGI guard around every request.

The guard reads each request body before the app sees it: as JSON (415 for another Content-Type or
any Content-Encoding), at most `limit` bytes (413 beyond, chunked bodies included), within
`read_timeout` seconds (408 for a client that sends less than it announced), in UTF-8 and without
a key twice in one object (400 otherwise: JSON parsers keep the last, silently). That check parses
the body, off the event loop when it is big, and `ParsedBodyRoute` hands the routes that parse, so
a body is parsed once (a 4000-message chat costs ~4 ms to parse: twice, on the loop, it was most of
what kept /health waiting under abuse). It answers
whatever escapes the app with a logged JSON 500, and counts every request once: its status code,
or 499 when the client left first (streams too).

A request is counted under the path template of the route it matches ("/v1/classify",
"/v1/admin/prompts/{name}"), or "other": labels stay few whatever paths clients send. The app
passes its routes' templates in, so a new route is counted without being listed here.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from fastapi import Request
from fastapi.routing import APIRoute
from starlette.requests import ClientDisconnect
from starlette.routing import compile_path

from .protocol import ApiError, error_response

log = logging.getLogger("softprompt.serve")

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
CLIENT_GONE = 499  # nginx's code for "client closed the request"; no response reached anyone
PARSED = "softprompt.parsed_body"  # the scope key of the body as the guard parsed it


class Metrics:
    """Request counts and latencies, plus the server's state read at each scrape (`watch`).
    Its own registry, not prometheus_client's global one: a process may hold several apps (tests)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("softprompt_requests", "HTTP requests by endpoint and status code.",
                                ["endpoint", "code"], registry=self.registry)
        self.seconds = Histogram("softprompt_request_seconds", "Time to the end of the response (streams included).",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry)

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.seconds.labels(endpoint).observe(seconds)

    def watch(self, state: Callable[[], tuple[dict[str, float], dict[str, float]]]) -> None:
        """Report `state()`'s (counters, gauges) as softprompt_NAME_total and softprompt_NAME at each scrape."""
        self.registry.register(_StateCollector(state))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _StateCollector:
    def __init__(self, state):
        self.state = state

    def collect(self):
        counters, gauges = self.state()
        for name, v in counters.items():
            yield CounterMetricFamily(f"softprompt_{name}", name.replace("_", " "), value=v)
        for name, v in gauges.items():
            yield GaugeMetricFamily(f"softprompt_{name}", name.replace("_", " "), value=v)


class RequestGuard:
    """ASGI middleware: bounded body reads, a JSON 500 for anything the app lets escape, and one
    metrics observation per request."""

    def __init__(self, app, limit: int, metrics: Metrics, endpoints: list[str], read_timeout: float):
        self.app, self.limit, self.metrics, self.read_timeout = app, limit, metrics, read_timeout
        self.endpoints = [(compile_path(p)[0], p) for p in endpoints]  # (regex, template) per route

    def endpoint(self, path: str) -> str:
        """The template of the route `path` matches (whatever the method), or 'other'."""
        return next((p for regex, p in self.endpoints if regex.match(path)), "other")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, seen = time.perf_counter(), {"status": None, "done": False}

        async def send_(msg):
            if msg["type"] == "http.response.start":
                seen["status"] = msg["status"]
            await send(msg)
            if msg["type"] == "http.response.body" and not msg.get("more_body"):
                seen["done"] = True

        status = CLIENT_GONE  # unless a response is finished below
        try:
            if scope["method"] in ("POST", "PUT", "PATCH"):
                check_media(scope)
            body = await self.read_body(scope, receive)
            await self.app(scope, replay(body, receive), send_)
        except (ClientGone, ClientDisconnect):
            pass  # counted as 499
        except ApiError as e:  # 413, 408 or 400 from read_body
            if seen["status"] is None:
                await error_response(e.status, e.message, e.param, headers=e.headers)(scope, receive, send_)
        except Exception:  # nothing a client sends should get here; if it does, log it and say little
            log.exception("unhandled error on %s %s", scope["method"], scope["path"])
            if seen["status"] is None:
                await error_response(500, "internal server error (logged on the server)")(scope, receive, send_)
            status = 500
        finally:
            if seen["done"]:
                status = seen["status"]
            self.metrics.observe(self.endpoint(scope["path"]), status, time.perf_counter() - t0)

    async def read_body(self, scope, receive) -> bytes:
        """The whole request body, refused at `limit` bytes (413) or after `read_timeout` seconds (408)."""
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            raise ApiError(413, f"request body of {int(length)} bytes is over the {self.limit}-byte limit")
        chunks, size, deadline = [], 0, time.monotonic() + self.read_timeout
        while True:
            try:
                msg = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise ApiError(408, f"request body not received within {self.read_timeout:g} s",
                               headers={"Connection": "close"}) from None
            if msg["type"] == "http.disconnect":
                raise ClientGone()
            size += len(msg.get("body", b""))
            if size > self.limit:  # chunked bodies announce no length: count as they come
                raise ApiError(413, f"request body is over the {self.limit}-byte limit",
                               headers={"Connection": "close"})
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body"):
                body = b"".join(chunks)
                try:  # every body here is JSON, which is UTF-8 (RFC 8259)
                    body.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ApiError(400, f"request body is not UTF-8 (byte {e.start}): send JSON as UTF-8") from None
                if len(body) > 32_768:  # a big body: parse it off the event loop, which /health shares
                    parsed = await asyncio.to_thread(check_keys, body)
                else:
                    parsed = check_keys(body)
                if parsed is not NOT_JSON:
                    scope[PARSED] = parsed
                return body


def check_media(scope) -> None:
    """Refuse (415) a body that is not plain JSON: the app would read it as JSON anyway and answer
    something about a 'valid dictionary' or UTF-8. A body without a Content-Type is taken as JSON
    (`requests.post(url, data=json.dumps(...))` sends none): the header is added for FastAPI, which
    otherwise leaves such a body unparsed."""
    h = dict(scope["headers"])
    if b"content-type" not in h:
        scope["headers"] = [*scope["headers"], (b"content-type", b"application/json")]
    enc = h.get(b"content-encoding", b"").decode("latin-1").strip().lower()
    if enc not in ("", "identity"):
        raise ApiError(415, f"Content-Encoding {enc!r} is not supported: send the JSON body uncompressed",
                       headers={"Connection": "close"})
    media = h.get(b"content-type", b"application/json").decode("latin-1").split(";")[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise ApiError(415, f"Content-Type {media!r} is not supported: send the body as application/json",
                       headers={"Connection": "close"})


class DuplicateKey(Exception):
    pass


NOT_JSON = object()


def check_keys(body: bytes) -> object:
    """The JSON body parsed; refused (400) with a key twice in one object, or nested past what a parser
    takes. NOT_JSON for a body (an empty one too) that is not JSON at all, left to the app's parser to
    describe."""
    def pairs(items):
        d = dict(items)  # in C: a Python loop here tripled the parse of a 4000-message chat
        if len(d) != len(items):
            seen = set()
            raise DuplicateKey(next(k for k, _ in items if k in seen or seen.add(k)))
        return d

    try:
        return json.loads(body, object_pairs_hook=pairs)
    except DuplicateKey as e:
        raise ApiError(400, f"duplicate key {e.args[0]!r} in a JSON object of the body: send each field once",
                       e.args[0]) from None
    except RecursionError:
        raise ApiError(400, "JSON body nested too deeply") from None
    except ValueError:
        return NOT_JSON


class ParsedRequest(Request):
    """A request whose JSON body the guard has parsed already: `json()` returns that."""

    async def json(self):
        if PARSED in self.scope:
            return self.scope[PARSED]
        return await super().json()


class ParsedBodyRoute(APIRoute):
    """FastAPI's route, reading the body as the guard parsed it (each router's `route_class`)."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def route(request: Request):
            return await handler(ParsedRequest(request.scope, request.receive))

        return route


class ClientGone(Exception):
    """The client disconnected: nobody is left to answer."""


def replay(body: bytes, receive):
    """An ASGI receive that gives the app `body` in one message, then passes on to the client's
    (whose next message is the disconnect, which streams and long waits listen for)."""
    sent = False

    async def receive_():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return receive_
