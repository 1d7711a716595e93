"""The HTTP server, tested over real HTTP (httpx and the official openai client) against uvicorn on a
loopback port with the tiny Llama and three random soft prompts: every endpoint, OpenAI shapes,
streaming, mixed-prompt batches equal to requests served alone, each error case, the 503 path,
failure isolation and the admin token."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from softprompt.core.config import GenerateConfig, ServeConfig  # noqa: E402
from softprompt.data.batching import Example, collate  # noqa: E402
from softprompt.forward.hidden import row_logprobs  # noqa: E402
from softprompt.generation.generate import generate_batch  # noqa: E402
from softprompt.prompts.prompt import SoftPrompt, load_prompt, save_prompt  # noqa: E402
from serve_helpers import gated, held_step, in_threads, metric, served, wait_depth  # noqa: E402

TOKEN = "test-admin-token"
TEXTS = ["Country: France\nFacts:", "Review: a dull film\nSentiment:", "Act as a teacher.\nPrompt:",
         "Country: Peru\nFacts: capital"]


@pytest.fixture(scope="module")
def srv(llama_dir, tmp_path_factory):
    cfg = ServeConfig(max_batch=16, max_queue=32, batch_wait_ms=2, max_input_tokens=64, max_new_tokens=300,
                      default_max_tokens=8, max_body_bytes=20_000, admin_token=TOKEN)
    specs = {"facts": (4, 0.5, {"model": "tiny"}),
             "reviews": (7, 0.5, {"model": "tiny", "labels": ["negative", "positive"]}),
             "acts": (5, 0.5, {"model": "tiny"})}
    with served(llama_dir, tmp_path_factory.mktemp("prompts"), specs, cfg, seed=0) as s:
        yield s


def ref(s, model_name: str, ids: list[int], max_new: int) -> str:
    """The answer generate_batch gives this request alone."""
    out = generate_batch(s.model, s.tok, [(s.prompts[model_name], ids)], GenerateConfig(max_new_tokens=max_new))
    return s.tok.decode(out[0], skip_special_tokens=True)


def test_models_health_openapi_metrics(srv):
    c = srv.client
    ids = [m["id"] for m in c.get("/v1/models").json()["data"]]
    assert ids == ["tiny-base", "facts", "reviews", "acts"]
    cards = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
    assert cards["reviews"]["virtual_tokens"] == 7 and cards["reviews"]["labels"] == ["negative", "positive"]
    h = c.get("/health")
    assert h.status_code == 200 and h.json()["status"] == "ok" and h.json()["prompts"] == 3
    paths = c.get("/openapi.json").json()["paths"]
    for p in ("/v1/completions", "/v1/chat/completions", "/v1/classify", "/v1/models", "/v1/models/{model}", "/health",
              "/metrics", "/v1/admin/prompts", "/v1/admin/prompts/{name}"):
        assert p in paths
    assert "max_tokens" in json.dumps(c.get("/openapi.json").json()["components"]["schemas"]["CompletionRequest"])
    assert c.get("/docs").status_code == 200
    c.post("/v1/completions", json={"model": "facts", "prompt": "Country: Chile\nFacts:", "max_tokens": 2})
    m = c.get("/metrics").text
    assert metric(m, "softprompt_requests_total", endpoint="/v1/completions", code="200") >= 1
    assert metric(m, "softprompt_request_seconds_count", endpoint="/v1/completions") >= 1
    assert metric(m, "softprompt_queue_depth") == 0 and metric(m, "softprompt_prompts_loaded") == 3
    assert metric(m, "softprompt_generated_tokens_total") >= 2


@pytest.mark.parametrize("name", ["tiny-base", "facts", "reviews", "acts"])
def test_completion_equals_generate_alone(srv, name):
    r = srv.client.post("/v1/completions", json={"model": name, "prompt": TEXTS[0], "max_tokens": 12})
    assert r.status_code == 200, r.text
    body = r.json()
    ids = srv.tok(TEXTS[0]).input_ids
    assert body["object"] == "text_completion" and body["model"] == name
    assert body["choices"][0]["text"] == ref(srv, name, ids, 12)
    assert body["choices"][0]["finish_reason"] in ("length", "stop")
    assert body["usage"]["prompt_tokens"] == len(ids)


def test_openai_client_completions_chat_and_streaming(srv):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny-base", "facts", "reviews", "acts"]
    got = client.models.retrieve("reviews")  # OpenAI's retrieve call, which clients use to check a name
    assert (got.id, got.virtual_tokens, got.labels) == ("reviews", 7, ["negative", "positive"])
    with pytest.raises(openai.NotFoundError, match="unknown model 'nope'"):
        client.models.retrieve("nope")
    ids = srv.tok(TEXTS[1]).input_ids
    want = ref(srv, "reviews", ids, 10)
    c = client.completions.create(model="reviews", prompt=TEXTS[1], max_tokens=10, temperature=0)
    assert c.choices[0].text == want and c.usage.completion_tokens > 0
    chunks = list(client.completions.create(model="reviews", prompt=TEXTS[1], max_tokens=10, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == want
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    # Chat: the messages rendered by the tokenizer's chat template, then the soft prompt's decoding.
    msgs = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Country: Peru?"}]
    chat_ids = srv.tok(srv.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
                       add_special_tokens=False).input_ids
    want = ref(srv, "acts", chat_ids, 9)
    r = client.chat.completions.create(model="acts", messages=msgs, max_tokens=9)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want
    parts = list(client.chat.completions.create(model="acts", messages=msgs, max_tokens=9, stream=True))
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts) == want
    with pytest.raises(openai.NotFoundError, match="unknown model 'nope'"):
        client.completions.create(model="nope", prompt="x", max_tokens=2)


def test_raw_sse_stream_and_stop_strings(srv):
    ids = srv.tok(TEXTS[0]).input_ids
    full = ref(srv, "facts", ids, 16)
    stop = full[len(full) // 2:len(full) // 2 + 2]
    assert stop.strip(), full
    cut = full[:full.find(stop)]
    body = {"model": "facts", "prompt": TEXTS[0], "max_tokens": 16, "stop": [stop]}
    r = srv.client.post("/v1/completions", json=body)
    assert r.json()["choices"][0]["text"] == cut and r.json()["choices"][0]["finish_reason"] == "stop"
    with srv.client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines) and lines[-1] == "data: [DONE]"
    events = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert "".join(e["choices"][0]["text"] for e in events) == cut
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


def test_mixed_prompt_batch_equals_single_requests(srv, monkeypatch):
    """Requests for every prompt (and none), with different lengths and budgets, classification
    among them, decoded in one shared batch: each answer equals the request served alone."""
    gate, entered, sizes = gated(srv.sched, monkeypatch)
    names = ["tiny-base", "facts", "reviews", "acts"]
    reqs = [("/v1/completions", {"model": names[i % 4], "prompt": TEXTS[(i * 3) % 4], "max_tokens": 4 + i % 7})
            for i in range(12)]
    reqs += [("/v1/classify", {"task": "reviews", "text": "Review: a great movie\nSentiment:"}),
             ("/v1/classify", {"task": "facts", "text": TEXTS[0], "labels": ["yes", "no", "maybe"]})]
    post = lambda a: httpx.post(srv.url + a[0], json=a[1], timeout=30)  # noqa: E731
    t0, _ = in_threads(post, [("/v1/completions", {"model": "facts", "prompt": "x", "max_tokens": 1})])
    assert entered.wait(10)  # the worker is busy with that one; the others queue up behind it
    ts, out = in_threads(post, reqs)
    wait_depth(srv.sched, len(reqs))
    gate.set()
    for t in t0 + ts:
        t.join(30)
    assert sizes == [1, len(reqs)]  # all of them shared one batch
    for (path, body), r in zip(reqs, out):
        assert r.status_code == 200, r.text
        if path == "/v1/completions":
            want = ref(srv, body["model"], srv.tok(body["prompt"]).input_ids, body["max_tokens"])
            assert r.json()["choices"][0]["text"] == want, body
        else:
            alone = srv.client.post(path, json=body).json()  # now served alone
            assert r.json()["label"] == alone["label"]
            for k, v in alone["scores"].items():
                assert r.json()["scores"][k] == pytest.approx(v, abs=1e-4)


def test_classify_matches_direct_scoring(srv):
    text, labels = "Review: a dull film\nSentiment:", ["negative", "positive", "so so"]
    r = srv.client.post("/v1/classify", json={"task": "reviews", "text": text, "labels": labels})
    assert r.status_code == 200, r.text
    body = r.json()
    ids = srv.tok(text).input_ids
    p = srv.prompts["reviews"]
    want = []
    for w in labels:
        c = srv.tok(" " + w, add_special_tokens=False).input_ids
        s, _ = row_logprobs(srv.model, p, collate([Example(ids + c, len(ids))], srv.tok.pad_token_id))
        want.append(float(s[0]))
    assert [body["scores"][w] for w in labels] == pytest.approx(want, abs=1e-4)
    assert body["label"] == labels[max(range(3), key=lambda k: want[k])]
    assert sum(body["probabilities"].values()) == pytest.approx(1.0)
    # Labels default to the prompt's own (recorded when it was trained).
    d = srv.client.post("/v1/classify", json={"task": "reviews", "text": text}).json()
    assert set(d["scores"]) == {"negative", "positive"}
    # A template of one column given with the request fills it with the text (another task of a
    # mixture's prompt, or the base model): the same input, so the same scores.
    t = srv.client.post("/v1/classify", json={"task": "reviews", "text": "a dull film", "labels": labels,
                                              "template": "Review: {review}\\nSentiment:"}).json()
    assert t["scores"] == body["scores"] and t["usage"] == body["usage"]
    # A format spec would pad the text to any size before any length check (GBs from a 100-byte request).
    for bad in ("Premise: {a}\nHypothesis: {b}", "no column", "{x:>400000000}", "{x!r}", "{x:{y}}"):
        r = srv.client.post("/v1/classify", json={"task": "reviews", "text": "x", "template": bad})
        assert r.status_code == 400 and "must name exactly one column" in r.json()["error"]["message"], r.text


def test_sampling_is_seeded_per_request(srv):
    body = {"model": "acts", "prompt": TEXTS[2], "max_tokens": 8, "temperature": 1.5, "seed": 3, "n": 2}
    a = srv.client.post("/v1/completions", json=body).json()
    b = srv.client.post("/v1/completions", json=body).json()
    assert [c["text"] for c in a["choices"]] == [c["text"] for c in b["choices"]] and len(a["choices"]) == 2


ERRORS = [
    ("/v1/completions", b'{"model": "facts", "prompt": ', 400, "malformed JSON"),
    ("/v1/completions", {"model": "nope", "prompt": "x"}, 404, "unknown model 'nope'"),
    ("/v1/completions", {"prompt": "x"}, 400, "model: Field required"),
    ("/v1/completions", {"model": "facts", "prompt": ""}, 400, "prompt is empty"),
    ("/v1/completions", {"model": "facts", "prompt": []}, 400, "prompt is empty"),
    ("/v1/completions", {"model": "facts", "prompt": 5}, 400, "prompt"),
    ("/v1/completions", {"model": "facts", "prompt": "Country " * 80}, 400, "over this server's limit of 64"),
    ("/v1/completions", {"model": "facts", "prompt": "x" * 30_000}, 413, "over the 20000-byte limit"),
    ("/v1/completions", {"model": "facts", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": "facts", "prompt": "x", "max_tokens": 301}, 400, "cap of 300"),
    ("/v1/completions", {"model": "facts", "prompt": "Act as", "max_tokens": 260}, 400, "model's 256 positions"),
    ("/v1/completions", {"model": "facts", "prompt": "x", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"model": "facts", "prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"model": "facts", "prompt": "x", "n": 9}, 400, "n 9 is over"),
    ("/v1/completions", {"model": "facts", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("/v1/completions", {"model": "facts", "prompt": "x", "logprobs": 6}, 400, "logprobs: Input should be less"),
    ("/v1/chat/completions", {"model": "facts", "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "unknown"),
    ("/v1/classify", {"task": "facts", "text": "x"}, 400, "at least two label words (this task has none of its own)"),
    ("/v1/classify", {"task": "reviews", "text": ""}, 400, "text is empty"),
    ("/v1/classify", {"task": "nope", "text": "x", "labels": ["a", "b"]}, 404, "unknown model 'nope'"),
    ("/v1/classify", {"task": "facts", "text": "x", "labels": ["a", "a"]}, 400, "distinct"),
    ("/v1/nowhere", {}, 404, "Not Found"),
]


@pytest.mark.parametrize("path,body,status,msg", ERRORS, ids=[f"{e[2]}-{e[3][:24]}" for e in ERRORS])
def test_errors_are_json_naming_the_problem(srv, path, body, status, msg):
    if isinstance(body, bytes):
        r = srv.client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = srv.client.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert msg in err["message"] and err["type"]


def test_one_label_sent_is_refused_without_blaming_the_task(srv):
    r = srv.client.post("/v1/classify", json={"task": "reviews", "text": "x", "labels": ["a"]})
    assert r.status_code == 400 and r.json()["error"]["message"] == "labels: give at least two label words"


def test_chat_without_template_is_a_clear_400(srv, monkeypatch):
    monkeypatch.setattr(srv.tok, "chat_template", None)
    r = srv.client.post("/v1/chat/completions", json={"model": "facts", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 400 and "no chat template" in r.json()["error"]["message"]


def test_full_queue_answers_503_with_retry_after(srv, monkeypatch):
    monkeypatch.setattr(srv.sched, "max_queue", 2)
    monkeypatch.setattr(srv.sched, "max_batch", 1)
    gate, entered, _ = gated(srv.sched, monkeypatch)
    body = {"model": "facts", "prompt": TEXTS[0], "max_tokens": 3}
    ts, out = in_threads(lambda b: httpx.post(srv.url + "/v1/completions", json=b, timeout=30), [body])
    assert entered.wait(10)  # the worker holds one request...
    ts2, out2 = in_threads(lambda b: httpx.post(srv.url + "/v1/completions", json=b, timeout=30), [body, body])
    wait_depth(srv.sched, 2)  # ...and two wait: the queue is full
    r = srv.client.post("/v1/completions", json=body)
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "queue_full" and "server busy" in r.json()["error"]["message"]
    s = srv.client.post("/v1/completions", json={**body, "stream": True})
    assert s.status_code == 503  # refused before any event is sent
    gate.set()
    for t in ts + ts2:
        t.join(30)
    want = ref(srv, "facts", srv.tok(TEXTS[0]).input_ids, 3)
    assert all(r.status_code == 200 and r.json()["choices"][0]["text"] == want for r in out + out2)
    assert metric(srv.client.get("/metrics").text, "softprompt_rejected_jobs_total") == 2


def test_one_failing_request_does_not_take_down_others(srv, monkeypatch):
    """An admission that raises is retried job by job: only the request that fails alone gets the error."""
    poison = srv.tok("Act as a teacher.\nPrompt:").input_ids
    engine = srv.sched.batch.engine
    orig = engine.add

    def flaky(rows, *a, **kw):
        if any(ids == poison for _, ids in rows):
            raise RuntimeError("simulated kernel failure")
        return orig(rows, *a, **kw)

    monkeypatch.setattr(engine, "add", flaky)
    gate, entered, sizes = gated(srv.sched, monkeypatch)
    reqs = [{"model": m, "prompt": t, "max_tokens": 5} for m in ("facts", "acts") for t in TEXTS]
    post = lambda b: httpx.post(srv.url + "/v1/completions", json=b, timeout=30)  # noqa: E731
    t0, _ = in_threads(post, [{"model": "facts", "prompt": "x", "max_tokens": 1}])
    assert entered.wait(10)
    ts, out = in_threads(post, reqs)
    wait_depth(srv.sched, len(reqs))
    retries = srv.sched.stats["batch_retries"]
    gate.set()
    for t in t0 + ts:
        t.join(30)
    assert sizes == [1, len(reqs)] and srv.sched.stats["batch_retries"] > retries
    for b, r in zip(reqs, out):
        if b["prompt"] == TEXTS[2]:
            assert r.status_code == 500 and "simulated kernel failure" in r.json()["error"]["message"]
        else:
            assert r.status_code == 200
            assert r.json()["choices"][0]["text"] == ref(srv, b["model"], srv.tok(b["prompt"]).input_ids, 5)
    assert srv.client.get("/health").json()["status"] == "ok"


def test_a_failing_step_is_retried_alone_in_a_new_engine(srv, monkeypatch):
    """A step that raises mid-decode leaves the engine's state unknown: the scheduler replaces the
    engine and decodes each of its requests again from the start, alone (their partial output
    forgotten), so every answer still equals the request served alone."""
    old = srv.sched.batch.engine
    orig, calls = old.step, []

    def step():
        calls.append(old.size)
        if len(calls) == 3:  # the four requests below have one token each by now
            raise RuntimeError("simulated step failure")
        return orig()

    monkeypatch.setattr(old, "step", step)
    gate, entered, sizes = gated(srv.sched, monkeypatch)
    reqs = [{"model": m, "prompt": TEXTS[k], "max_tokens": 6} for k, m in enumerate(["tiny-base", "facts", "reviews",
                                                                                       "acts"])]
    post = lambda b: httpx.post(srv.url + "/v1/completions", json=b, timeout=30)  # noqa: E731
    t0, _ = in_threads(post, [{"model": "facts", "prompt": "x", "max_tokens": 1}])
    assert entered.wait(10)
    ts, out = in_threads(post, reqs)
    wait_depth(srv.sched, len(reqs))
    gate.set()
    for t in t0 + ts:
        t.join(30)
    assert sizes == [1, len(reqs)] and calls[2] == len(reqs)  # the failed step held all four
    assert srv.sched.batch.engine is not old
    for b, r in zip(reqs, out):
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == ref(srv, b["model"], srv.tok(b["prompt"]).input_ids, 6)
    again = srv.client.post("/v1/completions", json=reqs[1]).json()  # served by the new engine
    assert again["choices"][0]["text"] == out[1].json()["choices"][0]["text"]


def test_a_request_arriving_mid_decode_joins_the_running_batch(srv, monkeypatch):
    """Continuous batching: a request sent while a long one decodes joins it at the next step (the
    engine holds both rows), leaves as soon as it is done while the long one goes on, and both
    answers equal the requests served alone."""
    stepped, go, sizes = held_step(srv.sched, monkeypatch)
    long, short = ({"model": "facts", "prompt": TEXTS[0], "max_tokens": 40},
                   {"model": "acts", "prompt": TEXTS[2], "max_tokens": 5})
    post = lambda b: httpx.post(srv.url + "/v1/completions", json=b, timeout=30)  # noqa: E731
    t1, out1 = in_threads(post, [long])
    assert stepped.wait(20)  # the long request has its first token; the worker waits inside that step
    t2, out2 = in_threads(post, [short])
    wait_depth(srv.sched, 1)
    go.set()
    for t in t1 + t2:
        t.join(30)
    for body, r in ((long, out1[0]), (short, out2[0])):
        assert r.status_code == 200, r.text
        want = ref(srv, body["model"], srv.tok(body["prompt"]).input_ids, body["max_tokens"])
        assert r.json()["choices"][0]["text"] == want
    assert out1[0].json()["usage"]["completion_tokens"] == 40  # premise: the long one decoded throughout
    # Step 1: the long row alone; step 2: the short one joined; it gives its 5 tokens, leaves at the
    # step after its last, and the long one finishes alone.
    assert sizes[:2] == [1, 2] and sizes.count(2) == 6 and set(sizes[7:]) == {1}, sizes


def test_admin_token_load_and_unload(srv, monkeypatch):
    c, H = srv.client, srv.model.config.hidden_size
    good = save_prompt(SoftPrompt(torch.randn(3, H, generator=torch.Generator().manual_seed(9))), srv.root / "new", {})
    wrong = save_prompt(SoftPrompt(torch.zeros(3, H + 8)), srv.root / "wrong", {"model": "other"})
    (srv.root / "pickled").mkdir()
    torch.save({"prompt_embeddings": torch.zeros(3, H)}, srv.root / "pickled" / "prompt.bin")
    body = {"name": "new", "path": str(good)}
    assert c.post("/v1/admin/prompts", json=body).status_code == 401
    assert c.post("/v1/admin/prompts", json=body, headers={"Authorization": "Bearer nope"}).status_code == 401
    assert c.delete("/v1/admin/prompts/facts").status_code == 401
    auth = {"Authorization": f"Bearer {TOKEN}"}
    r = c.post("/v1/admin/prompts", json=body, headers=auth)
    assert r.status_code == 201 and r.json()["virtual_tokens"] == 3
    assert "new" in [m["id"] for m in c.get("/v1/models").json()["data"]]
    srv.prompts["new"] = load_prompt(good).embeds.detach()
    got = c.post("/v1/completions", json={"model": "new", "prompt": TEXTS[3], "max_tokens": 6}).json()
    assert got["choices"][0]["text"] == ref(srv, "new", srv.tok(TEXTS[3]).input_ids, 6)
    assert c.post("/v1/admin/prompts", json=body, headers=auth).status_code == 409
    base = c.post("/v1/admin/prompts", json={"name": "tiny-base", "path": str(good)}, headers=auth)
    assert base.status_code == 400 and "is the base model's name" in base.json()["error"]["message"]
    bad = c.post("/v1/admin/prompts", json={"name": "w", "path": str(wrong)}, headers=auth)
    assert bad.status_code == 400 and "hidden size 40 but the model's is 32" in bad.json()["error"]["message"]
    pk = c.post("/v1/admin/prompts", json={"name": "p", "path": str(srv.root / "pickled")}, headers=auth)
    assert pk.status_code == 400 and "missing prompt file" in pk.json()["error"]["message"]
    assert c.post("/v1/admin/prompts", json={"name": "bad name!", "path": str(good)}, headers=auth).status_code == 400
    loaded = srv.app.state.registry.items["new"].tensor
    assert c.delete("/v1/admin/prompts/new", headers=auth).status_code == 200
    assert c.post("/v1/completions", json={"model": "new", "prompt": "x"}).status_code == 404
    assert c.delete("/v1/admin/prompts/new", headers=auth).status_code == 404
    c.get("/health")  # the worker drops the unloaded prompt's KV after its next batch
    c.post("/v1/completions", json={"model": "facts", "prompt": "x", "max_tokens": 1})
    assert all(s.source is not loaded for s in srv.sched.kv.store.values())
    monkeypatch.setattr(srv.cfg, "admin_token", "")
    r = c.post("/v1/admin/prompts", json=body, headers=auth)
    assert r.status_code == 403 and "admin endpoints are off" in r.json()["error"]["message"]


@pytest.mark.parametrize("spec,msg", [("facts", "--prompt 'facts': expected NAME=DIR"),
                                      ("a=/no/prompt", "missing prompt file: /no/prompt/prompt.safetensors"),
                                      ("wrong=WRONG", "hidden size 40 but the model's is 32")])
def test_serve_command_refuses_bad_prompts_in_one_line(spec, msg, llama_dir, tmp_path, capsys):
    import argparse

    from softprompt.cli import main
    from softprompt.serve import add_arguments, run
    from softprompt.core.utils import SoftpromptError

    wrong = save_prompt(SoftPrompt(torch.zeros(2, 40)), tmp_path / "wrong", {})
    argv = ["--model", str(llama_dir), "--device", "cpu", "--prompt", spec.replace("WRONG", str(wrong))]
    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("softprompt: error: ") and msg in err[-1], err
    # The command's own module (what the CLI's command table calls) raises the same one-line error.
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(SoftpromptError) as e:
        run(parser.parse_args(argv))
    assert msg in str(e.value)


@pytest.mark.parametrize("flag,value,msg", [("--read-timeout", "0", "--read-timeout must be a finite number"),
                                            ("--read-timeout", "nan", "--read-timeout must be a finite number"),
                                            ("--shutdown-timeout", "-1", "--shutdown-timeout must be a finite")])
def test_serve_command_refuses_bad_timeouts_before_loading(flag, value, msg, tmp_path, capsys):
    import argparse

    from softprompt.cli import main
    from softprompt.core.config import from_args
    from softprompt.serve import add_arguments

    # A model that does not exist: the timeouts are refused before anything loads.
    assert main(["serve", "--model", str(tmp_path / "no-model"), flag, value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("softprompt: error: ") and msg in err[-1], err
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg = from_args(ServeConfig, parser.parse_args(["--read-timeout", "2.5", "--shutdown-timeout", "0"]))
    assert (cfg.read_timeout, cfg.shutdown_timeout) == (2.5, 0.0)


def test_serve_reads_every_prompt_folder_before_the_model_loads(tmp_path, capsys):
    """Hunt 10: a typo in the second --prompt was found only after the model loaded (the first prompt's
    folder is read early: it names the base). Every folder is now read first; a --model that does not
    exist would be named otherwise."""
    from softprompt.cli import main

    good = save_prompt(SoftPrompt(torch.zeros(2, 32)), tmp_path / "good", {})
    assert main(["serve", "--model", str(tmp_path / "no-model"), "--prompt", f"a={good}", "--prompt",
                 f"b={tmp_path / 'typo'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"missing prompt file: {tmp_path / 'typo'}" in err and "no-model" not in err, err


def test_admin_load_of_a_prompt_for_another_base_says_so_to_the_client(srv, monkeypatch):
    """Hunt 10: a prompt recorded for another base of the same hidden size loaded with a plain 201 (the
    warning went to the server's log alone); the answer now carries it. A prompt of this base has none."""
    c, H, auth = srv.client, srv.model.config.hidden_size, {"Authorization": f"Bearer {TOKEN}"}
    monkeypatch.setattr(srv.model, "softprompt_model", "tiny", raising=False)  # as load_model names it
    for name, model in (("mine", "tiny"), ("theirs", "someone/other-model")):
        path = save_prompt(SoftPrompt(torch.zeros(2, H)), srv.root / name, {"model": model})
        r = c.post("/v1/admin/prompts", json={"name": name, "path": str(path)}, headers=auth)
        assert r.status_code == 201, r.text
        said = r.json().get("warnings", [])
        assert said == ([] if model == "tiny" else [f"prompt {path} was trained for 'someone/other-model', not "
                                                    "'tiny': the hidden sizes match, but its vectors were learnt "
                                                    "for the other model"]), said
        assert c.delete(f"/v1/admin/prompts/{name}", headers=auth).status_code == 200


def test_serve_refuses_a_prompt_of_another_width_before_the_model_loads(llama_dir, tmp_path, capsys, monkeypatch):
    """Hunt 11: a --prompt whose record gives another hidden size was refused only after the model loaded
    (minutes for a large base); the base's config.json, where it is on this machine, says it first."""
    import softprompt.base.models as models
    from softprompt.cli import main

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(models, "load_model", no_load)
    wide = save_prompt(SoftPrompt(torch.zeros(2, 40)), tmp_path / "wide", {"model": "someone/wide"})
    assert main(["serve", "--model", str(llama_dir), "--prompt", f"w={wide}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"prompt {wide} has hidden size 40 but the model's is 32 (it was trained for " \
                                   "someone/wide)" in err, err


def test_classify_with_a_task_trained_on_several_columns_asks_for_the_formatted_text(srv, monkeypatch):
    """Hunt 12: an RTE prompt (template of premise and hypothesis) scored a bare text with a 200: not the
    input it was trained on, and a confident answer that meant nothing. It is a 400 naming the columns;
    the formatted text with template '' is scored as given."""
    entry = srv.app.state.registry.items["reviews"]
    template = "Premise: {premise}\\nHypothesis: {hypothesis}\\nAnswer:"
    monkeypatch.setitem(entry.meta, "template", template)
    r = srv.client.post("/v1/classify", json={"task": "reviews", "text": "A man is sleeping."})
    assert r.status_code == 400 and r.json()["error"]["param"] == "text", r.text
    assert "trained on a template of the columns premise, hypothesis" in r.json()["error"]["message"]
    assert 'send text as an object of them ({"premise": ..., "hypothesis": ...})' in r.json()["error"]["message"]
    text = "Premise: A man is sleeping.\nHypothesis: A man rests.\nAnswer:"
    ok = srv.client.post("/v1/classify", json={"task": "reviews", "text": text, "template": ""})
    assert ok.status_code == 200 and ok.json()["usage"]["prompt_tokens"] == len(srv.tok(text).input_ids), ok.text


def test_classify_takes_an_object_of_a_templates_columns(srv, monkeypatch):
    """A task of several columns takes them as an object, filled through its recorded template as train
    fills a row: the same scores as the text the client formats itself. A missing column, an object for
    a task with no template, and a template with a :format spec are 400s naming the field."""
    entry = srv.app.state.registry.items["reviews"]
    monkeypatch.setitem(entry.meta, "template", "Premise: {premise}\\nHypothesis: {hypothesis}\\nAnswer:")
    text = "Premise: A man is sleeping.\nHypothesis: A man rests.\nAnswer:"
    formatted = srv.client.post("/v1/classify", json={"task": "reviews", "text": text, "template": ""}).json()
    row = {"hypothesis": "A man rests.", "premise": "A man is sleeping."}
    r = srv.client.post("/v1/classify", json={"task": "reviews", "text": row})
    assert r.status_code == 200, r.text
    assert r.json()["scores"] == formatted["scores"] and r.json()["usage"] == formatted["usage"]
    own = srv.client.post("/v1/classify", json={"task": "reviews", "text": row, "template": "{premise}? {hypothesis}"})
    assert own.status_code == 200 and own.json()["usage"]["prompt_tokens"] == len(
        srv.tok("A man is sleeping.? A man rests.").input_ids), own.text
    for body, param, words in [
            ({"text": {"premise": "x"}}, "text", "text lacks the column 'hypothesis'"),
            ({"text": row, "template": ""}, "text", "but no template names them"),
            ({"text": row, "template": "{premise:>9} {hypothesis}"}, "template", "plain columns only"),
            ({"text": {"premise": "x", "hypothesis": 3}}, "text", "text.hypothesis: Input should be a valid string")]:
        bad = srv.client.post("/v1/classify", json={"task": "reviews", **body})
        err = bad.json()["error"]
        assert bad.status_code == 400 and words in err["message"] and err["param"] == param, bad.text
