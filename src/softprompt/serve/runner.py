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
"""
from __future__ import annotations

import asyncio
import json
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


def bounded_h11(header_timeout: float) -> type:
    """uvicorn's h11 protocol with a header timeout: the connection closes when no complete request
    head has arrived `header_timeout` seconds after it opened or after its last response."""

    class BoundedH11(H11Protocol):
        header_task = None

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

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started and self.banner:
            print(self.banner, flush=True)

    async def shutdown(self, sockets=None) -> None:
        ctx = self.config.app.state.ctx
        asyncio.get_running_loop().call_later(ctx.cfg.shutdown_timeout, ctx.stopping.set)
        await super().shutdown(sockets)


def server_for(app, cfg: ServeConfig, **kw) -> Server:
    return Server(uvicorn.Config(app, http=bounded_h11(cfg.header_timeout), timeout_keep_alive=cfg.keep_alive_timeout,
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
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        return server.run(sockets=[sock])
    # After its graceful shutdown uvicorn raises the signal again, for the default action (exit 143).
    # A SIGTERM it has handled is a clean stop, so that second one meets a handler that does nothing.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
