"""Property-based fuzzing of every endpoint's request body (hypothesis), over real HTTP: whatever
the body, the answer is a 2xx or a 4xx in OpenAI's error shape, never a 5xx, and the server still
answers /health afterwards.

Bodies come from four sources, so that both the parser and the code behind it are reached: any
JSON value; an object of the endpoint's own fields (read from its pydantic model) holding any
values; a valid body with some fields replaced by any values; and raw bytes. Strings include
lone surrogates, numbers include NaN, infinities and integers past 64 bits. The examples are
derandomised, so CI tries the same bodies every run.
"""
from __future__ import annotations

import json
from urllib.parse import quote

import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from softprompt.core.config import ServeConfig  # noqa: E402
from softprompt.prompts.prompt import SoftPrompt, save_prompt  # noqa: E402
from softprompt.serve.protocol import (ChatCompletionRequest, ClassifyRequest, CompletionRequest,  # noqa: E402
                                       LoadPromptRequest)
from serve_helpers import running  # noqa: E402

TOKEN = "fuzz-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
EXAMPLES = 100  # per endpoint
NAMES = ["facts", "reviews", "tiny-base", "nope", ""]

chars = st.characters(exclude_categories=())  # every code point, lone surrogates included
# Strings that have broken servers: lone surrogates, NUL, byte-order and direction marks, the model's own
# special tokens, template braces. Drawn often, since random code points almost never hit them.
NASTY = st.sampled_from(["\ud800", "a\udfffb", "\x00", "\ufeff", "\u202e", "\ufffd", "<eos>", "<pad>",
                         "{{ messages }}", "\r\n", "🤖" * 3])
text = st.text(chars, max_size=12) | NASTY | st.sampled_from(["Country: Peru", "Review: a dull film\nSentiment:",
                                                              " ", "x"])
scalars = (st.none() | st.booleans() | st.integers() | st.integers(-2 ** 70, 2 ** 70) | st.floats()
           | text | st.sampled_from(NAMES + [0, 1, -1, 2 ** 63, 1e308]))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(text | st.sampled_from(["type", "text", "role", "content"]), inner,
                                             max_size=4), max_leaves=12)

# Values a real client might send, so that many bodies get past validation into tokenising,
# scheduling, decoding and streaming; each field also gets any JSON value now and then.
words = (st.text(st.characters(codec="utf-8"), min_size=1, max_size=24) | NASTY
         | st.sampled_from(["Country: Peru\nFacts:", "Review: a great movie\nSentiment:", "é 🤖", "\n", "positive"]))
# Prompts as token ids (lm_eval sends them): in and out of the tiny vocabulary of 400, negative, huge.
token_ids = st.lists(st.integers(0, 399) | st.sampled_from([-1, 400, 2 ** 64]), max_size=6)
content = words | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": words}), max_size=2)
PLAUSIBLE = {
    "model": st.sampled_from(NAMES), "task": st.sampled_from(["reviews", "reviews"] + NAMES),
    "prompt": words | st.lists(words, max_size=3) | token_ids | st.lists(token_ids, max_size=3),
    "text": words, "labels": st.none() | st.lists(words, min_size=2, max_size=4, unique=True),
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]),
                                                "content": content}), min_size=1, max_size=3),
    "max_tokens": st.none() | st.integers(0, 6), "max_completion_tokens": st.none() | st.integers(1, 6),
    "temperature": st.none() | st.floats(0, 2), "top_p": st.floats(0.01, 1), "n": st.integers(1, 2),
    "stop": st.none() | words | st.lists(words, max_size=4), "seed": st.none() | st.integers(-2 ** 63, 2 ** 63 - 1),
    "stream": st.booleans(), "stream_options": st.none() | st.fixed_dictionaries({"include_usage": st.booleans()}),
    "repetition_penalty": st.floats(0.5, 2), "user": words,
    "logprobs": st.none() | st.integers(-1, 6) | st.booleans(), "echo": st.none() | st.booleans(),
    "top_logprobs": st.none() | st.integers(-1, 21),
    "presence_penalty": st.none() | st.floats(-2, 2) | st.sampled_from([0, -2, 2]),
    "frequency_penalty": st.none() | st.floats(-2, 2) | st.sampled_from([0, -2, 2]),
    "logit_bias": st.sampled_from([{}, None, {"1": 2}]),
    "name": st.sampled_from(["fuzzed", "facts", "tiny-base"]) | words,
    "path": st.sampled_from(["PROMPT", "/nonexistent", "", "/"]),
}


def structured(model, required: list[str]):
    """Bodies a client might send: the required fields and any of the others, with plausible
    values; half of them then get one field (or a stray one) set to any JSON value."""
    clean = st.fixed_dictionaries({f: PLAUSIBLE[f] for f in required},
                                  optional={f: PLAUSIBLE[f] for f in model.model_fields
                                            if f in PLAUSIBLE and f not in required})
    keys = st.sampled_from(sorted(model.model_fields) + ["unknown"])
    one_wild = st.tuples(clean, keys, json_values).map(lambda t: {**t[0], t[1]: t[2]})
    return clean | one_wild


def scratch(model):
    """Objects over the model's field names (and a stray one) holding any JSON values."""
    keys = st.sampled_from(sorted(model.model_fields) + ["unknown"])
    return st.dictionaries(keys, json_values, max_size=6)


MODELS = {"/v1/completions": (CompletionRequest, ["model", "prompt"]),
          "/v1/chat/completions": (ChatCompletionRequest, ["model", "messages"]),
          "/v1/classify": (ClassifyRequest, ["task", "text"]),
          "/v1/admin/prompts": (LoadPromptRequest, ["name", "path"])}


def body_strategy(path: str):
    model, required = MODELS[path]
    as_json = st.one_of(structured(model, required), structured(model, required), scratch(model), json_values)
    return as_json.map(lambda v: json.dumps(v).encode()) | st.binary(max_size=64)  # json.dumps writes NaN too


@pytest.fixture(scope="module")
def fz(llama_dir, tmp_path_factory):
    from softprompt.base.models import load_model

    model, tok = load_model(str(llama_dir))
    root = tmp_path_factory.mktemp("fuzz")
    H = model.config.hidden_size
    prompts = {"facts": str(save_prompt(SoftPrompt(torch.randn(4, H)), root / "facts", {})),
               "reviews": str(save_prompt(SoftPrompt(torch.randn(3, H)), root / "reviews",
                                          {"labels": ["negative", "positive"]}))}
    cfg = ServeConfig(max_batch=8, max_queue=16, batch_wait_ms=0, max_input_tokens=32, max_new_tokens=4,
                      default_max_tokens=2, max_body_bytes=20_000, max_n=2, admin_token=TOKEN)
    with running(model, tok, prompts, cfg) as (app, run):
        with httpx.Client(base_url=run.url, timeout=60) as client:
            yield client, prompts["facts"], app


def check(client, method: str, path: str, body: bytes | None = None) -> None:
    r = client.request(method, path, content=body, headers={"content-type": "application/json", **AUTH})
    assert r.status_code < 500, (path, body, r.status_code, r.text)
    if r.status_code >= 400:
        err = r.json()["error"]
        assert isinstance(err["message"], str) and err["message"] and err["type"], r.text


FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.mark.parametrize("path", sorted(MODELS))
def test_any_body_gets_a_2xx_or_4xx_never_a_5xx(fz, path):
    client, prompt_dir, app = fz
    tried, served = [], set(app.state.registry.items)

    @FUZZ
    @given(body=body_strategy(path))
    def run(body):
        tried.append(body)
        check(client, "POST", path, body.replace(b'"PROMPT"', json.dumps(prompt_dir).encode()))
        for name in set(app.state.registry.items) - served:  # a load that succeeded: unload it again
            assert client.delete("/v1/admin/prompts/" + quote(name, safe=""), headers=AUTH).status_code == 200

    run()
    assert client.get("/health").json()["status"] == "ok"
    explored(path, tried)


def test_any_prompt_name_to_unload_gets_a_4xx(fz):
    client, _, app = fz
    tried = []

    @FUZZ
    @given(name=st.text(chars, min_size=1, max_size=20))
    def run(name):
        tried.append(name)
        if name not in app.state.registry.items:  # the loaded ones would be unloaded for real
            check(client, "DELETE", "/v1/admin/prompts/" + quote(name.encode("utf-8", "surrogatepass"), safe=""))

    run()
    assert client.get("/health").json()["status"] == "ok" and len(app.state.registry.items) == 3
    explored("/v1/admin/prompts/{name}", tried)


def explored(path: str, tried: list) -> None:
    """Report how much was tried (pytest -s shows it); fail if the search collapsed onto few inputs."""
    print(f"\n[fuzz] {path}: {len(tried)} examples, {len(set(tried))} distinct")
    assert len(tried) >= EXAMPLES and len(set(tried)) >= 0.8 * len(tried)


# Numbers at the ends of what JSON and floats hold (issue 27, N2: a repetition penalty of 1e-300 made
# the sampler fail the whole batch). Every sampling field gets every one, during a live stream.
EXTREMES = [1e-300, 1e300, -0.0, 5e-324, 2.2250738585072014e-308, 1e-40, 1.7976931348623157e308, -1e300, 2 ** 64,
            -(2 ** 64), 10 ** 30, 2 ** 63, -(2 ** 63) - 1, 0, 1, -1]
SAMPLING_FIELDS = ["temperature", "top_p", "top_k", "repetition_penalty", "seed", "presence_penalty",
                   "frequency_penalty", "max_tokens", "n", "logprobs"]
CHAT_FIELDS = ["max_completion_tokens", "top_logprobs", "temperature", "repetition_penalty", "top_p", "seed",
               "presence_penalty", "frequency_penalty"]
PENALTIES = ("presence_penalty", "frequency_penalty")  # OpenAI's: any finite number in [-2, 2], else a 400 naming it


def test_extreme_numbers_in_every_sampling_field_leave_a_live_stream_intact(fz):
    import threading

    from serve_helpers import running as serve_again

    _, prompt_dir, app = fz
    cfg = ServeConfig(max_batch=8, max_queue=64, batch_wait_ms=0, max_input_tokens=32, max_new_tokens=120,
                      max_n=2)
    model, tok = app.state.scheduler.model, app.state.scheduler.tok
    with serve_again(model, tok, {"facts": prompt_dir}, cfg) as (_, run), \
            httpx.Client(base_url=run.url, timeout=120) as client:
        long = {"model": "facts", "prompt": "Country: Peru", "max_tokens": 120}
        alone = client.post("/v1/completions", json=long).json()["choices"][0]["text"]
        bodies = [("/v1/completions", {"model": "facts", "prompt": "hello", "max_tokens": 3, "temperature": 1,
                                       f: v}) for f in SAMPLING_FIELDS for v in EXTREMES]
        bodies += [("/v1/chat/completions", {"model": "facts", "messages": [{"role": "user", "content": "hi"}],
                                             "max_tokens": 3, "temperature": 0.7, "logprobs": True, f: v})
                   for f in CHAT_FIELDS for v in EXTREMES]
        codes: list = []

        def hostile(part):
            with httpx.Client(base_url=run.url, timeout=120) as c:
                for path, body in part:
                    r = c.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})
                    codes.append((r.status_code, path, body, r.text))

        events, threads = [], []
        with client.stream("POST", "/v1/completions", json={**long, "stream": True}) as r:
            for ln in r.iter_lines():
                if ln.startswith("data: "):
                    events.append(ln[6:])
                    if not threads:  # the stream is live: send the extremes from 4 clients at once
                        threads = [threading.Thread(target=hostile, args=(bodies[k::4],)) for k in range(4)]
                        for t in threads:
                            t.start()
        for t in threads:
            t.join(300)
        assert events[-1] == "[DONE]" and not any('"error"' in e for e in events), events[-3:]
        text = "".join(c["text"] for e in events[:-1] for c in json.loads(e)["choices"])
        assert text == alone
        assert len(codes) == len(bodies)
        assert all(c < 500 for c, *_ in codes), [c for c in codes if c[0] >= 500][:5]
        for code, path, body, answer in codes:
            for f in set(PENALTIES) & set(body):
                if -2 <= body[f] <= 2:
                    assert code == 200, (path, body, answer)
                else:
                    assert code == 400 and json.loads(answer)["error"]["param"] == f, (path, body, answer)
        assert client.get("/health").json()["status"] == "ok"
