"""Running the app under uvicorn: in the foreground (`softprompt serve`) or on a background thread
(`Running`, for tests and bench/load_test.py)."""
from __future__ import annotations

import socket
import threading
import time

import uvicorn

from ..config import ServeConfig
from .app import create_app


class Running:
    """A uvicorn server on a background thread; `stop()` ends it."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
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
    app = create_app(model, tok, prompts, cfg, model_name)
    names = ", ".join(prompts) or "none"
    print(f"[softprompt] serving {model_name} with prompts: {names} on http://{cfg.host}:{cfg.port} "
          f"(API docs at /docs)", flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info")
