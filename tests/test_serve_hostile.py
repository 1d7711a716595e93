"""The server against hostile or careless clients (issue 17, rows 1-9), over real HTTP: each bad
input gets a 4xx naming the field, never a 500; one request's work is bounded; clients that leave
have their work cancelled and counted; bodies are bounded in size and time; shutdown is graceful."""
from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from softprompt.core.config import ServeConfig  # noqa: E402
from softprompt.prompts.prompt import SoftPrompt, save_prompt  # noqa: E402
from serve_helpers import (gated, held_step, in_threads, metric, raw_request, read_all, running, served,  # noqa: E402
                           wait_until)

TOKEN = "hostile-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CFG = ServeConfig(max_batch=16, max_queue=32, batch_wait_ms=2, max_input_tokens=64, max_new_tokens=300,
                  default_max_tokens=8, max_body_bytes=20_000, admin_token=TOKEN)


@pytest.fixture(scope="module")
def hs(llama_dir, tmp_path_factory):
    specs = {"facts": (4, 1.0, {}), "reviews": (3, 1.0, {"labels": ["negative", "positive"]})}
    with served(llama_dir, tmp_path_factory.mktemp("hostile"), specs, replace(CFG, read_timeout=1.0), seed=1) as s:
        yield s


def metrics(s) -> str:
    return s.client.get("/metrics").text


def count_500s(s) -> float:
    m = metrics(s)
    return sum(metric(m, "softprompt_requests_total", endpoint=ep, code="500")
               for ep in ("/v1/completions", "/v1/chat/completions", "/v1/classify", "/v1/admin/prompts", "other"))


SURROGATE = b'{"model": "facts", "prompt": "\\ud800"}'
BAD = [  # (row, path, body, param, words in the message, code)
    ("2a", "/v1/completions", SURROGATE, "prompt", "lone surrogate", None),
    ("2a", "/v1/classify", b'{"task": "reviews", "text": "x", "labels": ["a", "\\udfff"]}', "labels.1",
     "lone surrogate", None),
    ("2b", "/v1/chat/completions", {"model": "facts", "messages": [{"role": "user", "content": [
        {"type": "text", "text": 5}]}]}, "messages.0.content", "valid string", None),
    ("2b", "/v1/chat/completions", {"model": "facts", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages.0.content", "'text'", None),
    ("3", "/v1/completions", {"model": "facts", "prompt": "x", "seed": 2 ** 70, "temperature": 1}, "seed",
     "less than or equal", None),
    ("4", "/v1/completions", {"model": "facts", "prompt": ["x"] * 100}, "prompt", "100 queue places",
     "request_too_large"),
    ("4", "/v1/completions", {"model": "facts", "prompt": ["x"] * 5, "n": 8}, "n", "40 queue places",
     "request_too_large"),
    ("8", "/v1/completions", {"model": "facts", "prompt": "x", "logit_bias": {"5": 10}}, "logit_bias",
     "not supported", "unsupported_parameter"),
    # Implemented since issue 26 (OpenAI's range, -2 to 2): refused outside it.
    ("8", "/v1/completions", {"model": "facts", "prompt": "x", "presence_penalty": 2.5}, "presence_penalty",
     "less than or equal to 2", None),
    ("8", "/v1/completions", {"model": "facts", "prompt": "x", "frequency_penalty": -3}, "frequency_penalty",
     "greater than or equal to -2", None),
    ("8", "/v1/completions", {"model": "facts", "prompt": "x", "best_of": 3}, "best_of", "not supported",
     "unsupported_parameter"),
    ("8", "/v1/completions", {"model": "facts", "prompt": "x", "suffix": "!"}, "suffix", "not supported",
     "unsupported_parameter"),
    ("8", "/v1/completions", {"model": "facts", "prompt": "x", "echo": True, "stream": True}, "echo",
     "not supported with stream", "unsupported_parameter"),
    ("8", "/v1/chat/completions", {"model": "facts", "messages": [{"role": "user", "content": "x"}],
                                   "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools",
     "not supported", "unsupported_parameter"),
    ("8", "/v1/chat/completions", {"model": "facts", "messages": [{"role": "user", "content": "x"}],
                                   "response_format": {"type": "json_object"}}, "response_format",
     "not supported", "unsupported_parameter"),
    ("8", "/v1/completions", {"model": "facts", "prompt": "x", "top_k": 5}, "top_k", "unknown field", None),
    ("8", "/v1/classify", {"task": "reviews", "text": "x", "label": "a"}, "label", "unknown field", None),
]


@pytest.mark.parametrize("row,path,body,param,words,code", BAD,
                         ids=[f"row{b[0]}-{b[3]}-{i}" for i, b in enumerate(BAD)])
def test_bad_requests_get_a_4xx_naming_the_field(hs, row, path, body, param, words, code):
    errors = count_500s(hs)
    if isinstance(body, bytes):
        r = hs.client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = hs.client.post(path, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err
    assert err["type"] == "invalid_request_error" and (code is None or err["code"] == code)
    assert count_500s(hs) == errors


def test_row1_classify_work_is_bounded_by_one_batch_prefill(hs):
    """Label tokens times passes are capped at max_batch x max_input_tokens: the most labels
    under the cap are scored, one more is refused before anything is queued."""
    from softprompt.forward.classify import label_token_ids

    text = "Review: a dull film, long and slow\nSentiment:"
    ids = hs.tok(text).input_ids
    assert 20 < len(ids) <= 64
    labels = [f"label {i} of many" for i in range(64)]
    budget = CFG.max_batch * CFG.max_input_tokens

    def cost(k):
        return sum(len(ids) + len(c) for c in label_token_ids(hs.tok, labels[:k], text))

    k = max(k for k in range(2, len(labels) + 1) if cost(k) <= budget)
    assert k < len(labels) and cost(k + 1) > budget
    before = hs.sched.stats["classify_rows"]
    ok = hs.client.post("/v1/classify", json={"task": "reviews", "text": text, "labels": labels[:k]})
    assert ok.status_code == 200 and set(ok.json()["scores"]) == set(labels[:k])
    over = hs.client.post("/v1/classify", json={"task": "reviews", "text": text, "labels": labels[:k + 1]})
    assert over.status_code == 400, over.text
    err = over.json()["error"]
    assert err["param"] == "labels" and err["code"] == "request_too_large"
    assert f"runs {cost(k + 1)} token positions, over this server's {budget}" in err["message"]
    assert hs.sched.stats["classify_rows"] == before + 1  # the refused one never reached the scheduler
    # The case: 64 labels of about 11 words each on that text.
    huge = [f"{i} " + " ".join(["word"] * 10) for i in range(64)]
    assert hs.client.post("/v1/classify", json={"task": "reviews", "text": text, "labels": huge}).status_code == 400


def test_row2_an_internal_failure_is_a_counted_json_500_without_internals(hs, monkeypatch):
    def broken(*a, **kw):
        raise RuntimeError("secret detail of the server")

    monkeypatch.setattr(hs.app.state.registry, "get", broken)
    before = metric(metrics(hs), "softprompt_requests_total", endpoint="/v1/completions", code="500")
    r = hs.client.post("/v1/completions", json={"model": "facts", "prompt": "x"})
    assert r.status_code == 500 and "secret" not in r.text and r.json()["error"]["type"] == "server_error"
    monkeypatch.undo()
    assert metric(metrics(hs), "softprompt_requests_total", endpoint="/v1/completions", code="500") == before + 1
    assert hs.client.get("/health").status_code == 200  # same connection, still answering


def test_row3_seeds_at_the_64_bit_ends_sample(hs):
    for seed in (2 ** 63 - 1, -(2 ** 63)):
        body = {"model": "facts", "prompt": "Country: Peru", "max_tokens": 4, "temperature": 1, "seed": seed, "n": 2}
        a, b = hs.client.post("/v1/completions", json=body), hs.client.post("/v1/completions", json=body)
        assert a.status_code == 200, a.text
        assert [c["text"] for c in a.json()["choices"]] == [c["text"] for c in b.json()["choices"]]


def test_row4_a_request_that_fills_the_queue_exactly_is_served(hs):
    r = hs.client.post("/v1/completions", json={"model": "facts", "prompt": ["Country: Peru"] * 4, "n": 8,
                                                "max_tokens": 2})
    assert r.status_code == 200 and len(r.json()["choices"]) == CFG.max_queue


def test_row5_a_chunked_body_over_the_limit_is_413(hs):
    def chunks(n):
        yield b'{"model": "facts", "prompt": "'
        for _ in range(n):
            yield b"x" * 1000
        yield b'", "max_tokens": 1}'

    r = hs.client.post("/v1/completions", content=chunks(30), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "over the 20000-byte limit" in r.json()["error"]["message"]
    r = hs.client.post("/v1/completions", content=chunks(0), headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"  # read whole; refused as empty


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_row6_row7_a_client_that_leaves_mid_decode_is_cancelled_and_counted(hs, monkeypatch, stream):
    stepped, go, _ = held_step(hs.sched, monkeypatch)  # its first step waits, so the client can leave mid-decode
    m0 = metrics(hs)
    gone0 = metric(m0, "softprompt_requests_total", endpoint="/v1/completions", code="499")
    cancelled0, tokens0 = hs.sched.stats["cancelled_jobs"], hs.sched.stats["generated_tokens"]
    sock = raw_request(hs.port, "/v1/completions", {"model": "facts", "prompt": "Country: Peru", "max_tokens": 200,
                                                    "stream": stream})
    assert stepped.wait(20)
    sock.close()  # the client gives up while its first token is being made
    wait_until(lambda: metric(metrics(hs), "softprompt_requests_total", endpoint="/v1/completions",
                              code="499") == gone0 + 1, "the server notices the client left")
    go.set()
    wait_until(lambda: hs.sched.stats["cancelled_jobs"] == cancelled0 + 1, "the job is cancelled")
    assert hs.sched.stats["generated_tokens"] - tokens0 < 5  # of the 200 asked for
    assert metric(metrics(hs), "softprompt_cancelled_jobs_total") == cancelled0 + 1


def test_row8_off_values_of_unsupported_fields_pass_and_stream_usage_is_implemented(hs):
    body = {"model": "facts", "prompt": "Country: Peru", "max_tokens": 5, "presence_penalty": 0,
            "frequency_penalty": 0.0, "logit_bias": {}, "best_of": 1, "suffix": None, "echo": False, "user": "u"}
    plain = hs.client.post("/v1/completions", json=body)
    assert plain.status_code == 200, plain.text
    chat = hs.client.post("/v1/chat/completions", json={"model": "facts", "max_tokens": 3, "tools": [],
                                                         "messages": [{"role": "user", "content": "x"}],
                                                         "response_format": {"type": "text"}})
    assert chat.status_code == 200, chat.text
    with hs.client.stream("POST", "/v1/completions",
                          json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        events = [json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: {")]
    assert events[-1]["choices"] == [] and events[-1]["usage"] == plain.json()["usage"]
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == plain.json()["choices"][0]["text"]


def write_prompt(root, name, embeds, config) -> str:
    d = save_prompt(SoftPrompt(embeds), root / name, {})
    (d / "prompt_config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return str(d)


def test_row2c_row9_prompts_are_validated_when_loaded(hs):
    errors = count_500s(hs)
    H = hs.model.config.hidden_size
    ok = torch.randn(3, H)
    nan = ok.clone()
    nan[1, 2] = math.nan
    cases = [(write_prompt(hs.root, "list", ok, "[1, 2]"), "must hold a JSON object"),
             (write_prompt(hs.root, "nan", nan, {}), "NaN or infinite"),
             (write_prompt(hs.root, "lstr", ok, {"labels": "negative,positive"}), "labels in its"),
             (write_prompt(hs.root, "lnum", ok, {"labels": 3}), "labels in its"),
             (write_prompt(hs.root, "chat", ok, {"chat": "false"}), "chat in its"),
             (write_prompt(hs.root, "task", ok, {"task": ["a"]}), "task in its"),
             (str(hs.root / ("x" * 300)), "cannot read"),
             ("bad\x00path", "missing prompt file")]
    for path, words in cases:
        r = hs.client.post("/v1/admin/prompts", json={"name": "candidate", "path": path}, headers=AUTH)
        assert r.status_code == 400 and r.json()["error"]["param"] == "path", (path, r.text)
        assert words in r.json()["error"]["message"], (path, r.text)
    assert "candidate" not in hs.app.state.registry.items
    good = write_prompt(hs.root, "good", ok, {"labels": ["no", "yes"], "chat": False})
    r = hs.client.post("/v1/admin/prompts", json={"name": "candidate", "path": good}, headers=AUTH)
    assert r.status_code == 201, r.text
    assert hs.client.delete("/v1/admin/prompts/candidate", headers=AUTH).status_code == 200
    assert count_500s(hs) == errors


def test_a_client_that_sends_less_than_its_content_length_gets_408(hs):
    before = metric(metrics(hs), "softprompt_requests_total", endpoint="/v1/completions", code="408")
    s = raw_request(hs.port, "/v1/completions", b'{"model": "facts", ', headers={"Content-Length": "100"})
    reply = read_all(s)  # returns once the server closes the connection
    s.close()
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b"request body not received within 1 s" in reply
    assert metric(metrics(hs), "softprompt_requests_total", endpoint="/v1/completions", code="408") == before + 1


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return False
    except OSError:
        return True


@pytest.mark.parametrize("ending", ["finishes", "deadline", "ctrl-c again"])
def test_shutdown_stops_accepting_then_finishes_or_cancels_in_flight_work(hs, monkeypatch, ending):
    """What SIGTERM does to a running server (uvicorn's own handler, called here directly): the socket
    closes at once; a request in flight finishes, or is cancelled at the deadline. A second Ctrl-C
    (uvicorn's force-exit: cut streams, tracebacks, now and then an abort; hunt 14) ends it as the
    deadline does, at once: a 503, not after the 30 s deadline."""
    prompts = {"facts": str(hs.root / "facts")}
    with running(hs.model, hs.tok, prompts, replace(CFG, shutdown_timeout=0.5 if ending == "deadline" else 30)) as (
            app, run):
        sched = app.state.scheduler
        gate, entered, _ = gated(sched, monkeypatch)
        body = {"model": "facts", "prompt": "Country: Peru", "max_tokens": 6}
        ts, out = in_threads(lambda b: httpx.post(run.url + "/v1/completions", json=b, timeout=60), [body])
        assert entered.wait(20)
        run.server.handle_exit(signal.SIGINT if ending == "ctrl-c again" else signal.SIGTERM, None)
        wait_until(lambda: refused(run.port), "the listening socket closes")
        if ending == "finishes":
            gate.set()
            ts[0].join(30)
            alone = hs.client.post("/v1/completions", json=body).json()  # the module's server, same prompt
            assert out[0].status_code == 200 and out[0].json()["choices"] == alone["choices"]
        elif ending == "deadline":
            ts[0].join(30)  # the deadline passes with the job held: the request is cancelled
            assert out[0] is None or out[0].status_code >= 400
            gate.set()
            wait_until(lambda: sched.stats["cancelled_jobs"] == 1, "the cancelled job is dropped")
        else:
            run.server.handle_exit(signal.SIGINT, None)
            ts[0].join(20)
            assert not ts[0].is_alive(), "the request waited for the 30 s deadline"
            assert out[0].status_code == 503 and out[0].json()["error"]["code"] == "shutting_down", out[0].text
            gate.set()
        run.thread.join(30)
        assert not run.thread.is_alive() and not sched.alive and not run.server.force_exit


def test_sigterm_exits_0(llama_dir, tmp_path):
    """`softprompt serve` in its own process: SIGTERM ends it gracefully with exit status 0."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "softprompt", "serve", "--model", str(llama_dir), "--device", "cpu",
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "SOFTPROMPT_ADMIN_TOKEN": ""})
    try:
        def up():
            assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(up, "the server answers /health", limit=120)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill() if proc.poll() is None else None
    assert proc.returncode == 0, err.decode()[-2000:]
    assert b"Traceback" not in err
