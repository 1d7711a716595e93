"""Issue 26's serving polish: OpenAI's presence and frequency penalties (server and `generate`)
against a decoder written by hand, replacing a loaded prompt under a live stream, and the
start-up line of the installed `softprompt serve`."""
from __future__ import annotations

import functools
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from softprompt.core.config import GenerateConfig, ServeConfig  # noqa: E402
from softprompt.generation.decode import DecodeBatch  # noqa: E402
from softprompt.generation.generate import generate_batch  # noqa: E402
from softprompt.prompts.prompt import SoftPrompt, save_prompt  # noqa: E402
from serve_helpers import held_step, in_threads, running, served, wait_depth  # noqa: E402

TOKEN = "polish-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CFG = ServeConfig(max_batch=8, max_queue=16, batch_wait_ms=0, max_input_tokens=64, max_new_tokens=200,
                  admin_token=TOKEN)
TEXT = "Country: Peru\nFacts:"
# (presence, frequency): each alone, both, negative (repetition encouraged), the bounds.
PENALTIES = [(1.5, 0.0), (0.0, 0.7), (0.4, 1.1), (-2.0, 0.0), (2.0, -2.0)]


@pytest.fixture(scope="module")
def ps(llama_dir, tmp_path_factory):
    with served(llama_dir, tmp_path_factory.mktemp("polish"), {"facts": (4, 0.5, {})}, CFG, seed=3) as s:
        yield s


@torch.no_grad()
def by_hand(model, prompt, ids: list[int], n: int, presence: float, frequency: float, eos: set[int]) -> list[int]:
    """Greedy decoding recomputed in full at every step, OpenAI's formula applied token by token:
    logit[j] -= frequency * c[j] + presence * (c[j] > 0), c counting the generated tokens only."""
    out: list[int] = []
    for _ in range(n):
        emb = model.get_input_embeddings()(torch.tensor([ids + out]))
        if prompt is not None:
            emb = torch.cat([prompt[None].to(emb.dtype), emb], 1)
        z = model(inputs_embeds=emb).logits[0, -1].float()
        for j in set(out):
            c = out.count(j)
            z[j] -= frequency * c + presence * (c > 0)
        t = int(z.argmax())
        if t in eos:
            break
        out.append(t)
    return out


def test_penalties_equal_the_formula_by_hand_on_server_and_generate(ps):
    ids = ps.tok(TEXT).input_ids
    eos = {ps.tok.eos_token_id}
    plain = by_hand(ps.model, ps.prompts["facts"], ids, 24, 0.0, 0.0, eos)
    outs = {}
    for pres, freq in PENALTIES:
        ref = outs[pres, freq] = by_hand(ps.model, ps.prompts["facts"], ids, 24, pres, freq, eos)
        cfg = GenerateConfig(max_new_tokens=24, presence_penalty=pres, frequency_penalty=freq)
        assert generate_batch(ps.model, ps.tok, [(ps.prompts["facts"], ids)], cfg)[0] == ref, (pres, freq)
        r = ps.client.post("/v1/completions", json={"model": "facts", "prompt": ids, "max_tokens": 24,
                                                    "presence_penalty": pres, "frequency_penalty": freq})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == ps.tok.decode(ref, skip_special_tokens=True), (pres, freq)
    assert len(plain) > len(set(plain))  # premise: the tiny model repeats itself...
    for setting in [(1.5, 0.0), (0.0, 0.7), (0.4, 1.1)]:  # ...positive penalties change that...
        assert outs[setting] != plain and len(set(outs[setting])) > len(set(plain)), setting
    assert len(set(outs[-2.0, 0.0])) < len(set(plain))  # ...and a negative one makes it worse


def test_rows_with_and_without_penalties_in_one_batch_equal_each_alone(ps):
    m, tok = ps.model, ps.tok
    rows = [(ps.prompts["facts"], tok(TEXT).input_ids), (None, tok("Act as a teacher").input_ids)]
    cfgs = [GenerateConfig(max_new_tokens=24), GenerateConfig(max_new_tokens=24, presence_penalty=1.5),
            GenerateConfig(max_new_tokens=24, frequency_penalty=1.1, repetition_penalty=1.3),
            GenerateConfig(max_new_tokens=24, sample=True, temperature=0.9, frequency_penalty=-1.0, seed=4)]
    dec = DecodeBatch(m, tok)
    ids = [dec.add(rows, cfg) for cfg in cfgs]  # four settings, eight rows, one batch
    while not dec.finished:
        dec.step()
    together = [[t for t in dec.pop(i).new if t not in dec.eos] for group in ids for i in group]
    alone = [generate_batch(m, tok, [r], cfg if not cfg.sample else GenerateConfig(
        **{**cfg.__dict__, "seed": cfg.seed + k}))[0] for cfg in cfgs for k, r in enumerate(rows)]
    assert together == alone
    per_cfg = {(tuple(a), tuple(b)) for a, b in zip(together[::2], together[1::2])}
    assert len(per_cfg) == len(cfgs)  # the settings really differ


def test_penalties_outside_their_range_are_refused_naming_the_field(ps, llama_dir, capsys):
    from softprompt.cli import main

    for field in ("presence_penalty", "frequency_penalty"):
        for value in (2.5, -2.01, 1e300):
            r = ps.client.post("/v1/chat/completions", json={"model": "facts", field: value,
                                                            "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
        body = ('{"model": "facts", "prompt": "x", "%s": NaN}' % field).encode()
        r = ps.client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400 and "finite" in r.json()["error"]["message"], r.text
        plain = ps.client.post("/v1/completions", json={"model": "facts", "prompt": "x", "max_tokens": 8})
        null = ps.client.post("/v1/completions", json={"model": "facts", "prompt": "x", "max_tokens": 8, field: None})
        assert null.json()["choices"] == plain.json()["choices"]  # null is OpenAI's "off"
        flag = "--" + field.replace("_", "-")
        for value in ("3", "-2.5", "nan"):
            rc = main(["generate", "--model", str(llama_dir), flag, value, "Country:"])
            err = capsys.readouterr().err
            assert rc == 2 and err.count("\n") == 1 and flag in err, err


def test_cli_generate_takes_the_penalty_flags(llama_dir, ps, capsys):
    from softprompt.cli import main

    ref = by_hand(ps.model, None, ps.tok(TEXT).input_ids, 12, 0.5, 1.0, {ps.tok.eos_token_id})
    assert main(["generate", "--model", str(llama_dir), "--max-new-tokens", "12", "--presence-penalty", "0.5",
                 "--frequency-penalty", "1", "--json", TEXT]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out[0]["baseline"] == ps.tok.decode(ref, skip_special_tokens=True)


def stream_text(client, body: dict) -> str:
    text = ""
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        for ln in r.iter_lines():
            if ln.startswith("data: ") and ln != "data: [DONE]":
                text += "".join(c["text"] for c in json.loads(ln[6:])["choices"])
    return text


def test_replace_under_a_live_stream(ps, monkeypatch):
    c, sched, H = ps.client, ps.sched, ps.model.config.hidden_size
    new_dir = save_prompt(SoftPrompt(torch.randn(6, H, generator=torch.Generator().manual_seed(11)) * 0.5),
                          ps.root / "facts-v2", {})
    long = {"model": "facts", "prompt": TEXT, "max_tokens": 40}
    short = {"model": "facts", "prompt": "Act as", "max_tokens": 6}
    old_long = c.post("/v1/completions", json=long).json()["choices"][0]["text"]
    old_short = c.post("/v1/completions", json=short).json()["choices"][0]["text"]
    old = ps.app.state.registry.items["facts"].tensor

    refused = c.post("/v1/admin/prompts", json={"name": "facts", "path": str(new_dir)}, headers=AUTH)
    assert refused.status_code == 409 and "replace: true" in refused.json()["error"]["message"]
    base = c.post("/v1/admin/prompts", json={"name": "tiny-base", "path": str(new_dir), "replace": True}, headers=AUTH)
    assert base.status_code == 400, base.text

    stepped, go, _ = held_step(sched, monkeypatch)
    streams, streamed = in_threads(lambda b: stream_text(c, b), [long])
    assert stepped.wait(20)  # the stream's row decodes (held at its first step)...
    queued, answers = in_threads(lambda b: c.post("/v1/completions", json=b), [short])
    wait_depth(sched, 1)  # ...and a request with the old prompt waits in the queue
    r = c.post("/v1/admin/prompts", json={"name": "facts", "path": str(new_dir), "replace": True}, headers=AUTH)
    assert r.status_code == 201 and r.json()["virtual_tokens"] == 6, r.text
    go.set()
    for t in streams + queued:
        t.join(60)
    assert streamed[0] == old_long and answers[0].json()["choices"][0]["text"] == old_short

    new_long = c.post("/v1/completions", json=long).json()["choices"][0]["text"]
    assert all(s.source is not old for s in sched.kv.store.values())  # the old prompt's KV is gone
    with running(ps.model, ps.tok, {"facts": str(new_dir)}, CFG) as (_, fresh):
        expected = httpx.post(fresh.url + "/v1/completions", json=long, timeout=60).json()["choices"][0]["text"]
    assert new_long == expected and new_long != old_long


def test_installed_serve_prints_what_it_serves_and_where(llama_dir, tmp_path):
    H = json.loads((Path(llama_dir) / "config.json").read_text())["hidden_size"]
    pdir = save_prompt(SoftPrompt(torch.randn(3, H)), tmp_path / "p", {})
    exe = Path(sys.executable).parent / "softprompt"
    proc = subprocess.Popen([str(exe), "serve", "--model", str(llama_dir), "--device", "cpu", "--port", "0",
                             "--prompt", f"sst2={pdir}", "--prompt", f"acts={pdir}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        t0 = time.monotonic()
        while not any(ln.startswith("[softprompt] serving") for ln in lines):
            assert proc.poll() is None and time.monotonic() - t0 < 120, "".join(lines)
            time.sleep(0.05)
        line = next(ln for ln in lines if ln.startswith("[softprompt] serving")).strip()
        prefix = f"[softprompt] serving {Path(llama_dir).name} with prompts sst2, acts on http://127.0.0.1:"
        assert line.startswith(prefix) and line.endswith(" (docs at /docs)"), line
        port = int(line[len(prefix):].split()[0])
        assert port > 0
        # The line comes once the server accepts connections, on the port it names.
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=30).json()["data"][1]["id"] == "sst2"
    finally:
        proc.terminate()
        proc.wait(30)
        reader.join(5)


def test_what_openai_clients_send_as_null_or_newer_fields_is_taken(ps):
    """Hunt 10: `n: null` and `top_p: null` (OpenAI documents both as nullable; the openai client sends
    null for `top_p=None`) were 400s while every other sampling field took null; so were a message's
    `name` (LangChain sends it), the `developer` role (OpenAI's newer name for system instructions)
    and `parallel_tool_calls`. Each now answers as the request without it (developer as system)."""
    def answer(path: str, **body) -> list:
        r = ps.client.post(path, json={"model": "facts", "max_tokens": 6, **body})
        assert r.status_code == 200, r.text
        return [{k: v for k, v in c.items() if k != "index"} for c in r.json()["choices"]]

    plain = answer("/v1/completions", prompt=TEXT)
    assert answer("/v1/completions", prompt=TEXT, n=None, top_p=None) == plain and len(plain) == 1
    chat = functools.partial(answer, "/v1/chat/completions", logprobs=True)  # log-probabilities tell inputs apart
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Peru?"}]
    said = chat(messages=system)
    assert chat(messages=[{**system[0], "role": "developer"}, system[1]]) == said
    assert chat(messages=[system[0], {**system[1], "name": "ana"}], parallel_tool_calls=False, n=None) == said
    assert chat(messages=[{**system[0], "role": "user"}, system[1]]) != said  # the role is rendered
