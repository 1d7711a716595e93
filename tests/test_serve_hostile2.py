"""The server against hostile input, round two (issue 27): one test per defect, named after it, over
real HTTP on a tiny model. Each failed on the code before its fix."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from softprompt.config import ServeConfig  # noqa: E402
from softprompt.prompt import SoftPrompt, save_prompt  # noqa: E402
from serve_helpers import metric, running, wait_until  # noqa: E402

TOKEN = "hostile2-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CFG = ServeConfig(max_batch=16, max_queue=32, batch_wait_ms=2, max_input_tokens=64, max_new_tokens=300,
                  default_max_tokens=8, max_body_bytes=50_000, admin_token=TOKEN)


@pytest.fixture(scope="module")
def hs(llama_dir, tmp_path_factory):
    from softprompt.models import load_model

    model, tok = load_model(str(llama_dir))
    root = tmp_path_factory.mktemp("hostile2")
    H = model.config.hidden_size
    gen = torch.Generator().manual_seed(1)
    prompts = {"facts": str(save_prompt(SoftPrompt(torch.randn(4, H, generator=gen)), root / "facts", {})),
               "reviews": str(save_prompt(SoftPrompt(torch.randn(3, H, generator=gen)), root / "reviews",
                                          {"labels": ["negative", "positive"]})),
               "chat": str(save_prompt(SoftPrompt(torch.randn(2, H, generator=gen)), root / "chat",
                                       {"chat": True}))}
    with running(model, tok, prompts, CFG) as (app, run):
        client = httpx.Client(base_url=run.url, timeout=60)

        class S:
            pass

        s = S()
        s.model, s.tok, s.app, s.run, s.client, s.root, s.prompts = model, tok, app, run, client, root, prompts
        s.sched, s.port = app.state.scheduler, run.port
        yield s
        client.close()


def count_500s(s) -> float:
    m = s.client.get("/metrics").text
    return sum(metric(m, "softprompt_requests_total", endpoint=ep, code="500")
               for ep in ("/v1/completions", "/v1/chat/completions", "/v1/classify", "/v1/admin/prompts", "other"))


def sse(lines) -> tuple[list[dict], bool]:
    """A stream's JSON events, and whether it ended with [DONE]."""
    events, done = [], False
    for ln in lines:
        if ln == "data: [DONE]":
            done = True
        elif ln.startswith("data: "):
            events.append(json.loads(ln[6:]))
    return events, done


def stream_while(s, body: dict, during) -> tuple[str, list[dict], bool]:
    """Stream `body`; once its first text has come, call `during()`; the text, events and [DONE]."""
    events, done, called = [], False, False
    with s.client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        for ln in r.iter_lines():
            if ln == "data: [DONE]":
                done = True
            elif ln.startswith("data: "):
                events.append(json.loads(ln[6:]))
                if not called:
                    called = True
                    during()
    text = "".join(c["text"] for e in events for c in e.get("choices", []))
    return text, events, done


# ---------------------------------------------------------------- N2: numeric extremes of the sampling fields

LONG = {"model": "facts", "prompt": "Country: Peru", "max_tokens": 120}


def test_N2_bad_repetition_penalty_fails_only_its_row(hs):
    alone = hs.client.post("/v1/completions", json=LONG).json()["choices"][0]["text"]
    answers = []

    def hostile():
        for rp in (1e-300, 1e-40, 1e300, 0.0, -0.0, 5e-324):
            answers.append(hs.client.post("/v1/completions", json={
                "model": "facts", "prompt": "hello", "max_tokens": 4, "temperature": 1, "repetition_penalty": rp}))

    text, events, done = stream_while(hs, LONG, hostile)
    assert done and not any("error" in e for e in events), events[-3:]
    assert text == alone
    for r in answers:
        assert r.status_code == 400 and r.json()["error"]["param"] == "repetition_penalty", r.text


def test_N2_a_sampling_failure_fails_only_its_row(hs, monkeypatch):
    """Whatever still goes wrong choosing one row's token (here: a processor that raises for one
    temperature) fails that row's request alone; the stream decoding beside it completes intact."""
    from softprompt import sampling

    orig = sampling.Sampling.processors

    def processors(self):
        if self.sample and self.temperature == 1.25:
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return orig(self)

    monkeypatch.setattr(sampling.Sampling, "processors", processors)
    alone = hs.client.post("/v1/completions", json=LONG).json()["choices"][0]["text"]
    answers = []

    def hostile():
        answers.append(hs.client.post("/v1/completions", json={"model": "facts", "prompt": "hello", "max_tokens": 4,
                                                                "temperature": 1.25}))

    text, events, done = stream_while(hs, LONG, hostile)
    assert done and not any("error" in e for e in events), events[-3:]
    assert text == alone
    assert answers[0].status_code == 500 and "inf, nan" in answers[0].json()["error"]["message"]


def test_N2_non_finite_scores_are_sanitised_per_row():
    from softprompt.sampling import Sampling, pick

    torch.manual_seed(0)
    z = torch.randn(3, 50)
    z[1] = float("nan")
    z[2, 7] = float("inf")
    s = Sampling(True, 1.0, 0.9, 0.01)
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    failed: dict = {}
    out = pick(z, [s] * 3, [[1, 2], [3], [7, 4]], gens, failed)
    assert not failed and ((out >= 0) & (out < 50)).all()
    assert out[2] == 7  # +inf is the largest score: it stays the surest token
    alone = pick(z[:1], [s], [[1, 2]], [torch.Generator().manual_seed(0)])
    assert out[0] == alone[0]  # the other rows' trouble does not change row 0's draw
    extreme = pick(torch.randn(2, 50) * 1e30, [Sampling(True, 1e-300, 1e-300, 0.01)] * 2, [[1], [2]],
                   [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)])
    assert ((extreme >= 0) & (extreme < 50)).all()


def test_N2_cli_refuses_an_extreme_repetition_penalty_in_one_line(llama_dir, capsys):
    from softprompt.cli import main

    for value in ("1e-300", "1e300", "0.001"):
        rc = main(["generate", "--model", str(llama_dir), "--sample", "--repetition-penalty", value, "Country:"])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and "--repetition-penalty" in err, err
    assert main(["generate", "--model", str(llama_dir), "--temperature", "1e300", "Country:"]) == 2
    assert "--temperature" in capsys.readouterr().err
