"""Helpers shared by the server tests: a server on a loopback port (and the tiny Llama served with
random prompts, the server tests' one fixture), a worker held at a gate, raw sockets for clients
that misbehave, and Prometheus samples read with prometheus_client."""
from __future__ import annotations

import json
import socket
import threading
import time
from contextlib import contextmanager
from types import SimpleNamespace


@contextmanager
def running(model, tok, prompts: dict, cfg):
    """create_app + Running on 127.0.0.1; yields (app, Running), stops the server afterwards."""
    from softprompt.serve import Running, create_app

    app = create_app(model, tok, prompts, cfg, model_name="tiny-base")
    run = Running(app)
    try:
        yield app, run
    finally:
        run.stop()


@contextmanager
def served(llama_dir, root, specs: dict[str, tuple[int, float, dict]], cfg, seed: int, timeout: float = 30):
    """The tiny Llama served with one random soft prompt per spec (name -> (P, scale, meta)), drawn
    in order from a generator seeded with `seed` and saved under `root`. Yields a namespace: model,
    tok, app, run, url, port, client (httpx), sched, root, cfg, llama_dir, and prompts (name -> the
    [P, H] tensor as loaded; the base model "tiny-base" -> None)."""
    import httpx
    import torch

    from softprompt.base.models import load_model
    from softprompt.prompts.prompt import SoftPrompt, load_prompt, save_prompt

    model, tok = load_model(str(llama_dir))
    H = model.config.hidden_size
    gen = torch.Generator().manual_seed(seed)
    dirs = {name: save_prompt(SoftPrompt(torch.randn(P, H, generator=gen) * scale), root / name, meta)
            for name, (P, scale, meta) in specs.items()}
    with running(model, tok, {k: str(v) for k, v in dirs.items()}, cfg) as (app, run):
        with httpx.Client(base_url=run.url, timeout=timeout) as client:
            prompts = {k: load_prompt(str(v), model).embeds.detach() for k, v in dirs.items()}
            yield SimpleNamespace(model=model, tok=tok, app=app, run=run, url=run.url, port=run.port, client=client,
                                  sched=app.state.scheduler, root=root, cfg=cfg, llama_dir=llama_dir,
                                  prompts={**prompts, "tiny-base": None})


def metric(text: str, name: str, **labels) -> float:
    """The value of sample `name` with exactly `labels` in Prometheus text (0 when absent),
    read with prometheus_client's own parser (which also checks the format)."""
    from prometheus_client.parser import text_string_to_metric_families

    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0


def gated(sched, monkeypatch):
    """Hold the worker as it next admits jobs from the queue, until `gate` is set; records how many
    jobs each admission takes."""
    gate, entered, sizes = threading.Event(), threading.Event(), []
    orig = sched._admit

    def admit(jobs):
        sizes.append(len(jobs))
        entered.set()
        gate.wait(20)
        orig(jobs)

    monkeypatch.setattr(sched, "_admit", admit)
    return gate, entered, sizes


def held_step(sched, monkeypatch):
    """Hold the engine's next step until `go` is set (`stepped` is set once it has run); records
    the engine's rows (live and joining) at every step."""
    # An earlier test's request still decoding would take the held first step (CI, once: the request
    # meant to join it waited one more step, and the continuous-batching test saw sizes [1, 1, ...]).
    wait_until(lambda: sched.batch.finished and not sched.depth, "an idle scheduler")
    stepped, go, sizes = threading.Event(), threading.Event(), []
    engine = sched.batch.engine
    orig = engine.step

    def step():
        sizes.append(engine.size)
        out = orig()
        if not stepped.is_set():
            stepped.set()
            # The test sets `go` once what it sends is queued; the limit only ends a hang. 20 s was too
            # short on a loaded machine (CI beside other work: the step went on before a request joined).
            go.wait(90)
        return out

    monkeypatch.setattr(engine, "step", step)
    return stepped, go, sizes


def in_threads(fn, args: list) -> tuple[list[threading.Thread], list]:
    out = [None] * len(args)

    def go(i):
        out[i] = fn(args[i])

    ts = [threading.Thread(target=go, args=(i,)) for i in range(len(args))]
    for t in ts:
        t.start()
    return ts, out


def wait_until(cond, what: str, limit: float = 15.0) -> None:
    """Poll `cond()` until true; fail naming `what` if it never is (a hang, not a timing check)."""
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < limit, f"never happened: {what}"
        time.sleep(0.005)


def wait_depth(sched, n: int) -> None:
    wait_until(lambda: sched.depth >= n, f"queue depth {n}")


def raw_request(port: int, path: str, body: bytes | dict, headers: dict[str, str] | None = None,
                send_body: bool = True) -> socket.socket:
    """An HTTP/1.1 POST written by hand on a fresh socket (for clients that break the rules)."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    head = {"Host": "127.0.0.1", "Content-Type": "application/json", "Content-Length": str(len(data)),
            **(headers or {})}
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(f"POST {path} HTTP/1.1\r\n".encode() + "".join(f"{k}: {v}\r\n" for k, v in head.items()).encode()
              + b"\r\n" + (data if send_body else b""))
    return s


def read_all(s: socket.socket) -> bytes:
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out
