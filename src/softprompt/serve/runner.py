"""Running the app under uvicorn: in the foreground (`softprompt serve`) or on a background thread
(`Running`, for tests and bench/load_test.py).

Shutdown is graceful either way (SIGTERM or Ctrl-C in the foreground, `stop()` on a thread):
uvicorn closes the listening socket first and the requests in flight have up to
ServeConfig.shutdown_timeout seconds to finish; then the app ends those left itself (a JSON 503,
or an error event and [DONE] on a stream), which cancels their jobs in the scheduler, before
uvicorn's own deadline (a few seconds later) would cut them with a plain-text 500. The app's
lifespan then stops the scheduler thread. A SIGTERM so handled exits 0.

Connections are bounded (uvicorn has no header timeout of its own): a client has
ServeConfig.header_timeout seconds from connecting, or from its last response, to send a request's
headers, or its connection is closed; at most ServeConfig.max_connections are served at once (a
request beyond gets uvicorn's 503). A request uvicorn cannot parse gets a JSON 400. The listening
socket is bound before the model loads, so a port in use fails in one line at once (`listen`).

A new connection whose first request is `GET /health` (or HEAD) is answered by the protocol itself,
from routes/ops.health_state, without the app's middleware and task: a liveness probe then waits for
one turn of the event loop, not behind every request in flight (bench/health_under_abuse.py). It is
counted in the metrics as any /health, and not written to the access log.
"""
from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import signal
import socket
import threading
import time

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..core.config import ServeConfig
from ..core.utils import SoftpromptError
from .app import create_app
from .protocol import error_body
from .routes.ops import health_state

SHUTDOWN_MARGIN = 5.0  # seconds uvicorn waits past the app's own deadline, for the last answers to go out


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (port 0: any free one), or one line saying why not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise SoftpromptError(f"cannot listen on {host}:{port} (--host/--port): {e.strerror or e}") from None
    return sock


HEALTH_HEADS = (b"GET /health HTTP/1.", b"HEAD /health HTTP/1.")
REASONS = {200: b"OK", 503: b"Service Unavailable"}


def bare_health(data: bytes) -> bool:
    """`data` is exactly one well-formed GET or HEAD /health request head, with no body (h11 reads it)."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    try:
        req = conn.next_event()
        return (isinstance(req, h11.Request) and req.target == b"/health" and conn.next_event() == h11.EndOfMessage()
                and conn.next_event() is h11.NEED_DATA)
    except h11.RemoteProtocolError:
        return False


def bounded_h11(header_timeout: float, ctx=None) -> type:
    """uvicorn's h11 protocol with a header timeout: the connection closes when no complete request
    head has arrived `header_timeout` seconds after it opened or after its last response. With the
    app's `ctx`, a connection's first request for /health is answered at once (`health`)."""

    class BoundedH11(H11Protocol):
        header_task = None

        def data_received(self, data: bytes) -> None:
            # Only a whole, well-formed request head without a body as the connection's first bytes,
            # within the connection limit (uvicorn's own test, so that its 503 still comes): anything
            # else goes to h11 and the app, which answer it (a malformed head: the JSON 400 below).
            if (ctx is not None and self.cycle is None and data.startswith(HEALTH_HEADS)
                    and data.endswith(b"\r\n\r\n") and not self.over_limit() and bare_health(data)):
                return self.health(head_only=data.startswith(b"HEAD"))
            super().data_received(data)

        def over_limit(self) -> bool:
            limit = self.limit_concurrency
            return limit is not None and (len(self.connections) >= limit or len(self.tasks) >= limit)

        def health(self, head_only: bool) -> None:
            t0 = time.perf_counter()
            body, status = health_state(ctx)
            raw = json.dumps(body, separators=(",", ":")).encode()
            head = (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                    b"connection: close\r\n\r\n" % (status, REASONS[status], len(raw)))
            self.disarm()
            self.transport.write(head if head_only else head + raw)
            self.transport.close()
            ctx.metrics.observe("/health", status, time.perf_counter() - t0)

        def connection_made(self, transport):
            super().connection_made(transport)
            self.arm()

        def arm(self) -> None:
            self.disarm()
            self.header_task = self.loop.call_later(header_timeout, self.header_timed_out)

        def disarm(self) -> None:
            if self.header_task is not None:
                self.header_task.cancel()
                self.header_task = None

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not None and not self.cycle.response_complete:  # a request head has come
                self.disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self.arm()

        def connection_lost(self, exc):
            self.disarm()
            super().connection_lost(exc)

        def send_400_response(self, msg: str) -> None:
            """A request uvicorn cannot parse, answered in the app's JSON error shape, not plain text."""
            body = json.dumps(error_body(400, f"malformed HTTP request: {msg}")).encode()
            headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
            for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                          h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self.transport.close()

        def header_timed_out(self) -> None:
            if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
                self.transport.close()

    return BoundedH11


class Server(uvicorn.Server):
    """uvicorn's server, which tells the app when a graceful shutdown's deadline has passed, and
    prints `banner` once it accepts connections."""
    banner: str | None = None
    loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets=None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().startup(sockets)
        if self.started and self.banner:
            print(self.banner, flush=True)

    def handle_exit(self, sig: int, frame) -> None:
        """Ctrl-C during the graceful shutdown ends the requests in flight now, as its deadline would (a
        503, or an error event and [DONE] on a stream). uvicorn's own force-exit left the scheduler
        thread mid-step: tracebacks, cut streams, and now and then an abort at exit (hunt 14)."""
        if self.should_exit and sig == signal.SIGINT and self.loop is not None:
            os.write(2, b"[softprompt] Ctrl-C again: ending the requests in flight now\n")  # safe in a handler
            with contextlib.suppress(RuntimeError):  # the loop already closed: nothing is in flight
                self.loop.call_soon_threadsafe(self.config.app.state.ctx.stopping.set)
            return
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets=None) -> None:
        ctx = self.config.app.state.ctx
        asyncio.get_running_loop().call_later(ctx.cfg.shutdown_timeout, ctx.stopping.set)
        await super().shutdown(sockets)


def server_for(app, cfg: ServeConfig, **kw) -> Server:
    http = bounded_h11(cfg.header_timeout, app.state.ctx)
    return Server(uvicorn.Config(app, http=http, timeout_keep_alive=cfg.keep_alive_timeout,
                                 limit_concurrency=cfg.max_connections,
                                 timeout_graceful_shutdown=cfg.shutdown_timeout + SHUTDOWN_MARGIN, **kw))


class Running:
    """A uvicorn server on a background thread; `stop()` ends it gracefully."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        self.sock = listen(host, port)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.server = server_for(app, app.state.config, log_level="warning", access_log=False)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() - t0 > 30:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)

    def stop(self, wait: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(wait)
        self.sock.close()


def banner(model_name: str, prompts: list[str], sock: socket.socket) -> str:
    """The start-up line: what is served, and where (the port bound: --port 0 picks one)."""
    host, port = sock.getsockname()[:2]
    where = f"[{host}]" if ":" in host else host
    served = f"prompts {', '.join(prompts)}" if prompts else "no prompts"
    return f"[softprompt] serving {model_name} with {served} on http://{where}:{port} (docs at /docs)"


def serve(model, tok, prompts: dict[str, str], cfg: ServeConfig, model_name: str,
          sock: socket.socket | None = None) -> None:
    """Run the server in the foreground until SIGTERM or Ctrl-C (`softprompt serve`) on `sock`
    (bound already by `listen`; bound here if None)."""
    sock = sock or listen(cfg.host, cfg.port)
    app = create_app(model, tok, prompts, cfg, model_name)
    server = server_for(app, cfg, log_level="info")
    server.banner = banner(model_name, list(prompts), sock)
    # The model, torch and transformers are millions of long-lived objects; a full collection walking
    # them stalled every request (/health too) for ~0.5 s now and then. Frozen, they are never walked.
    gc.collect()
    gc.freeze()
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        return server.run(sockets=[sock])
    # After its graceful shutdown uvicorn raises the signal again, for the default action (exit 143).
    # A SIGTERM it has handled is a clean stop, so that second one meets a handler that does nothing.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
