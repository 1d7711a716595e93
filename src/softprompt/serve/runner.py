"""Running the app under uvicorn: in the foreground (`softprompt serve`) or on a background thread
(`Running`, for tests and bench/load_test.py).

Shutdown is graceful either way (SIGTERM or Ctrl-C in the foreground, `stop()` on a thread):
uvicorn closes the listening socket first, waits up to ServeConfig.shutdown_timeout seconds for the
requests in flight to finish, then cancels those left, which cancels their jobs in the
scheduler; the app's lifespan then stops the scheduler thread. A SIGTERM so handled exits 0.
"""
from __future__ import annotations

import signal
import socket
import threading
import time

import uvicorn

from ..config import ServeConfig
from .app import create_app


class Running:
    """A uvicorn server on a background thread; `stop()` ends it gracefully."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                                    timeout_graceful_shutdown=app.state.config.shutdown_timeout))
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


def serve(model, tok, prompts: dict[str, str], cfg: ServeConfig, model_name: str) -> None:
    """Run the server in the foreground until SIGTERM or Ctrl-C (`softprompt serve`)."""
    app = create_app(model, tok, prompts, cfg, model_name)
    server = uvicorn.Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="info",
                                           timeout_graceful_shutdown=cfg.shutdown_timeout))
    names = ", ".join(prompts) or "none"
    print(f"[softprompt] serving {model_name} with prompts: {names} on http://{cfg.host}:{cfg.port} "
          f"(API docs at /docs)", flush=True)
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        return server.run()
    # After its graceful shutdown uvicorn raises the signal again, for the default action (exit 143).
    # A SIGTERM it has handled is a clean stop, so that second one meets a handler that does nothing.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
