"""OpenAI `logprobs` and `echo` on the server (issue 16), over real HTTP with the tiny Llama: echoed
prompt log-probabilities equal a hand-built log_softmax over [soft prompt ; text] and
classify.continuation_logprobs; generated tokens' equal the offline scores of those tokens, the
greedy one first among top_logprobs; token-id prompts equal text prompts; chat's shape; bad values
are a 400 naming the field. Slow: lm_eval's own `local-completions` model scores a live server as
softprompt does."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from softprompt.core.config import GenerateConfig, ServeConfig  # noqa: E402
from softprompt.forward.classify import continuation_logprobs  # noqa: E402
from softprompt.generation.generate import generate_batch  # noqa: E402
from serve_helpers import gated, in_threads, served, wait_depth  # noqa: E402

TEXTS = ["Country: France\nFacts:", "Review: a dull film\nSentiment:", "Act as a teacher.\nPrompt:"]
NAMES = ["tiny-base", "facts", "chatty"]


@pytest.fixture(scope="module")
def lp(llama_dir, tmp_path_factory):
    cfg = ServeConfig(max_batch=8, max_queue=16, batch_wait_ms=2, max_input_tokens=48, max_new_tokens=16,
                      default_max_tokens=4)
    specs = {"facts": (4, 0.5, {}), "chatty": (3, 0.5, {"chat": True})}
    with served(llama_dir, tmp_path_factory.mktemp("prompts"), specs, cfg, seed=3, timeout=60) as s:
        yield s


def post(s, body: dict, path: str = "/v1/completions") -> dict:
    r = s.client.post(path, json=body)
    assert r.status_code == 200, r.text
    return r.json()


@torch.no_grad()
def reference(s, name: str, ids: list[int], first: bool = False) -> torch.Tensor:
    """Hand-built: log_softmax [len(ids) - 1, V] of the model run on [soft prompt ; ids], row t
    predicting ids[t + 1] (the model's own forward, not softprompt's); with `first` and a soft prompt,
    [len(ids), V] from the prompt's last position on, row t predicting ids[t]."""
    x = s.model.get_input_embeddings()(torch.tensor([ids]))
    prompt = s.prompts[name]
    if prompt is not None:
        x = torch.cat([prompt[None].to(x.dtype), x], 1)
    z = s.model(inputs_embeds=x).logits[0].float()
    P = 0 if prompt is None else prompt.shape[0]
    start = P - 1 if first and P else P
    return torch.log_softmax(z, -1)[start:P + len(ids) - 1]


def served_ids(s, name: str, text: str) -> list[int]:
    """The input ids the server runs for `text` (a chat prompt's inputs go through the chat template)."""
    if name == "chatty":
        from softprompt.data.formatting import chat_wrap

        return s.tok(chat_wrap(s.tok, text), add_special_tokens=False).input_ids
    return s.tok(text).input_ids


@pytest.mark.parametrize("name", NAMES)
def test_echo_logprobs_equal_offline_scoring(lp, name):
    ids = served_ids(lp, name, TEXTS[0])
    prompt, shown = TEXTS[0], TEXTS[0]
    if name == "chatty":  # issue 27 N7: a chat prompt's text is wrapped in the template, whose tokens echo would
        # pass off as the text's: refused; its template's ids, sent as ids, are echoed as sent
        r = lp.client.post("/v1/completions", json={"model": name, "prompt": TEXTS[0], "max_tokens": 0, "echo": True,
                                                    "logprobs": 3})
        assert r.status_code == 400 and r.json()["error"]["param"] == "echo", r.text
        prompt, shown = ids, lp.tok.decode(ids, skip_special_tokens=False)
    body = post(lp, {"model": name, "prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 3})
    ch = body["choices"][0]
    got = ch["logprobs"]
    assert ch["text"] == shown and ch["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 0
    assert len(got["tokens"]) == len(ids)
    # Hunt 16: a soft prompt's last virtual token predicts the text's first token (eval and PEFT score
    # it); the echo said null. Nothing predicts it without a prompt.
    if lp.prompts[name] is None:
        assert got["token_logprobs"][0] is None and got["top_logprobs"][0] is None
    else:
        first = reference(lp, name, ids, first=True)[0]
        assert got["token_logprobs"][0] == pytest.approx(float(first[ids[0]]), abs=1e-5)
        assert list(got["top_logprobs"][0].values())[0] == pytest.approx(float(first.max()), abs=1e-5)
    ref = reference(lp, name, ids)
    want = ref.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert got["token_logprobs"][1:] == pytest.approx(want.tolist(), abs=1e-5)
    offline = continuation_logprobs(lp.model, [(lp.prompts[name], ids[:1])], [ids[1:]], lp.tok.pad_token_id)
    assert sum(got["token_logprobs"][1:]) == pytest.approx(float(offline[0]), abs=1e-4)
    for t, top in enumerate(got["top_logprobs"][1:]):
        # The 3 most probable, most probable first, and the chosen token; a dict keyed by text, so
        # two ids that read alike (bytes of one character: U+FFFD) keep the more probable.
        best, chosen = ref[t].topk(3).values.tolist(), got["token_logprobs"][t + 1]
        assert list(top.values())[0] == pytest.approx(best[0], abs=1e-5)
        assert all(min(abs(v - b) for b in best + [chosen]) < 1e-5 for v in top.values())
        assert top[got["tokens"][t + 1]] >= chosen - 1e-5  # the chosen token is always among them
    # Text offsets: where each token starts in the text its tokens spell.
    spelled = "".join(got["tokens"])
    assert got["text_offset"] == [len("".join(got["tokens"][:i])) for i in range(len(ids))]
    if name != "chatty":
        assert spelled == TEXTS[0]


@pytest.mark.parametrize("name", ["tiny-base", "facts"])
def test_generated_logprobs_are_the_offline_scores_and_greedy_comes_first(lp, name):
    ids = served_ids(lp, name, TEXTS[1])
    body = post(lp, {"model": name, "prompt": TEXTS[1], "max_tokens": 6, "logprobs": 2})
    ch = body["choices"][0]
    out = generate_batch(lp.model, lp.tok, [(lp.prompts[name], ids)], GenerateConfig(max_new_tokens=6))[0]
    gen = out + ([lp.tok.eos_token_id] if len(out) < 6 else [])  # generate_batch leaves out the end token
    assert ch["text"] == lp.tok.decode(out, skip_special_tokens=True)
    got = ch["logprobs"]
    assert len(got["tokens"]) == len(gen)  # an end-of-sequence token that ended it is listed too
    ref = reference(lp, name, ids + gen)[len(ids) - 1:]
    want = ref.gather(1, torch.tensor(gen)[:, None])[:, 0]
    assert got["token_logprobs"] == pytest.approx(want.tolist(), abs=1e-5)
    for tok_text, lp_t, top in zip(got["tokens"], got["token_logprobs"], got["top_logprobs"]):
        first = next(iter(top))
        assert first == tok_text and top[first] == pytest.approx(lp_t, abs=1e-6)  # greedy: the most probable
    assert got["text_offset"][0] == len(TEXTS[1])  # OpenAI: offsets count from the prompt's end


def test_echo_with_one_new_token_is_lm_evals_request(lp):
    """lm_eval's local-completions sends echo, logprobs 1, max_tokens 1 and token ids, and reads
    token_logprobs[ctxlen:-1]: the prompt's tokens, then exactly one generated token."""
    ids = lp.tok(TEXTS[2]).input_ids
    body = post(lp, {"model": "facts", "prompt": [ids, ids[:5]], "max_tokens": 1, "logprobs": 1, "echo": True,
                     "temperature": 0, "seed": 1234})
    for ch, want in zip(body["choices"], (ids, ids[:5])):
        got = ch["logprobs"]
        assert len(got["token_logprobs"]) == len(want) + 1
        ref = reference(lp, "facts", want).gather(1, torch.tensor(want[1:])[:, None])[:, 0]
        assert got["token_logprobs"][1:len(want)] == pytest.approx(ref.tolist(), abs=1e-5)


def test_token_id_prompts_equal_text_prompts(lp):
    ids = [lp.tok(t).input_ids for t in TEXTS[:2]]
    base = {"model": "facts", "max_tokens": 3, "logprobs": 2, "echo": True}
    as_text = post(lp, {**base, "prompt": TEXTS[:2]})
    as_ids = post(lp, {**base, "prompt": ids})
    one = post(lp, {**base, "prompt": ids[0]})
    for a, b in zip(as_text["choices"], as_ids["choices"]):
        assert a["text"] == b["text"]
        assert a["logprobs"]["tokens"] == b["logprobs"]["tokens"]
        assert a["logprobs"]["token_logprobs"][1:] == pytest.approx(b["logprobs"]["token_logprobs"][1:], abs=1e-5)
    assert one["choices"][0]["logprobs"] == as_ids["choices"][0]["logprobs"]
    assert as_ids["usage"] == as_text["usage"]


def test_chat_logprobs_and_top_logprobs(lp):
    msgs = [{"role": "user", "content": "Country: Peru?"}]
    ids = lp.tok(lp.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
                 add_special_tokens=False).input_ids
    body = post(lp, {"model": "facts", "messages": msgs, "max_tokens": 5, "logprobs": True, "top_logprobs": 3},
                "/v1/chat/completions")
    ch = body["choices"][0]
    content = ch["logprobs"]["content"]
    gen = generate_batch(lp.model, lp.tok, [(lp.prompts["facts"], ids)], GenerateConfig(max_new_tokens=5))[0]
    assert len(content) == len(gen) == body["usage"]["completion_tokens"]
    ref = reference(lp, "facts", ids + gen)[len(ids) - 1:]
    want = ref.gather(1, torch.tensor(gen)[:, None])[:, 0]
    assert [c["logprob"] for c in content] == pytest.approx(want.tolist(), abs=1e-5)
    assert "".join(c["token"] for c in content) == ch["message"]["content"]
    for c in content:
        assert len(c["top_logprobs"]) == 3 and c["top_logprobs"][0]["token"] == c["token"]
        assert c["bytes"] == list(c["token"].encode("utf-8"))
    plain = post(lp, {"model": "facts", "messages": msgs, "max_tokens": 5}, "/v1/chat/completions")
    assert plain["choices"][0]["logprobs"] is None
    assert plain["choices"][0]["message"]["content"] == ch["message"]["content"]


def test_scoring_rows_with_different_prompts_in_one_pass_equal_each_alone(lp, monkeypatch):
    sched = lp.app.state.scheduler
    # A chat prompt's text is not echoed (issue 27 N7): it is sent as its template's ids.
    bodies = [{"model": n, "prompt": served_ids(lp, n, t) if n == "chatty" else t, "max_tokens": 0, "echo": True,
               "logprobs": 1} for n, t in zip(NAMES, TEXTS)]
    alone = [post(lp, b)["choices"][0]["logprobs"]["token_logprobs"] for b in bodies]
    gate, entered, sizes = gated(sched, monkeypatch)
    threads, out = in_threads(lambda b: lp.client.post("/v1/completions", json=b), [bodies[0]])
    assert entered.wait(20)  # the worker holds the first; the others queue behind it
    more, out2 = in_threads(lambda b: lp.client.post("/v1/completions", json=b), bodies[1:])
    wait_depth(sched, 2)
    gate.set()
    for t in threads + more:
        t.join(60)
    assert sizes[:2] == [1, 2]  # the two others were scored in one pass
    together = [r.json()["choices"][0]["logprobs"]["token_logprobs"] for r in out + out2]
    for name, a, b in zip(NAMES, alone, together):  # the first token is scored after a soft prompt alone
        assert (a[0] is None) == (b[0] is None) == (name == "tiny-base")
        assert a[int(a[0] is None):] == pytest.approx(b[int(b[0] is None):], abs=1e-5)


BAD = [
    ({"prompt": "x", "logprobs": 6}, "logprobs", "less than or equal to 5"),
    ({"prompt": "x", "logprobs": -1}, "logprobs", "greater than or equal to 0"),
    ({"prompt": "x", "logprobs": True}, "logprobs", "valid integer"),
    ({"prompt": "x", "echo": "sometimes"}, "echo", "boolean"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens", "needs echo"),
    ({"prompt": "x", "max_tokens": -1}, "max_tokens", "greater than or equal to 0"),
    ({"prompt": "x", "logprobs": 1, "stream": True}, "logprobs", "stream"),
    ({"prompt": "x", "echo": True, "stream": True}, "echo", "stream"),
    ({"prompt": [400]}, "prompt", "token id 400 is out of range"),
    ({"prompt": [[3], [2 ** 70]]}, "prompt", "out of range"),
    ({"prompt": [-1]}, "prompt", "greater than or equal to 0"),
    ({"prompt": [1, "a"]}, "prompt", "valid"),
    ({"prompt": [1.0]}, "prompt", "valid integer"),
    ({"prompt": [[]]}, "prompt", "empty"),
    ({"prompt": [5] * 49}, "prompt", "over this server's limit of 48"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 21, "logprobs": True}, "top_logprobs", "20"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs", "needs logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": True, "stream": True}, "logprobs", "stream"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": 3}, "logprobs", "boolean"),
]


@pytest.mark.parametrize("body,param,words", BAD, ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD)])
def test_bad_values_are_a_400_naming_the_field(lp, body, param, words):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    r = lp.client.post(path, json={"model": "facts", **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err


def test_off_values_still_pass(lp):
    """What clients send when they want no logprobs: null, echo false, chat logprobs false, top 0."""
    r = post(lp, {"model": "facts", "prompt": "x", "max_tokens": 2, "logprobs": None, "echo": False})
    assert r["choices"][0]["logprobs"] is None
    r = post(lp, {"model": "facts", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
                  "logprobs": False, "top_logprobs": 0}, "/v1/chat/completions")
    assert r["choices"][0]["logprobs"] is None


@pytest.mark.slow
def test_lm_eval_local_completions_scores_the_server_as_softprompt_does(lp):
    """lm_eval's own LocalCompletionsAPI (token-id prompts, echo, logprobs 1, max_tokens 1) against the
    live server: its loglikelihoods equal classify.continuation_logprobs with the prompt prepended,
    and its greedy flags equal argmax checks."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("tenacity")  # lm_eval's API models need it (lm-eval's api extra)
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    lm = LocalCompletionsAPI(base_url=lp.url + "/v1/completions", model="facts", tokenizer_backend="huggingface",
                             tokenizer=str(lp.llama_dir), batch_size=2, max_length=48, max_retries=1)
    pairs = [("Country: France\nFacts:", " capital=Paris"), ("Review: a dull film\nSentiment:", " negative"),
             ("Act as a teacher.", "\nPrompt: explain things"), ("Country: Peru", " and more")]
    pairs.append(greedy_pair(lp, [c for c, _ in pairs]))
    got = lm.loglikelihood([Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i)
                            for i, p in enumerate(pairs)])
    # lm_eval's split: the whole text's tokens, the context's first, the continuation the rest.
    rows, conts = [], []
    for ctx, cont in pairs:
        whole, head = lp.tok(ctx + cont).input_ids, lp.tok(ctx).input_ids
        rows.append((lp.prompts["facts"], head))
        conts.append(whole[len(head):])
    want = continuation_logprobs(lp.model, rows, conts, lp.tok.pad_token_id)
    assert [g for g, _ in got] == pytest.approx(want.tolist(), abs=1e-4)
    for (_, head), cont, (_, flag) in zip(rows, conts, got):
        ref = reference(lp, "facts", head + cont)[len(head) - 1:]
        assert flag == bool((ref.argmax(-1) == torch.tensor(cont)).all())
    assert got[-1][1] and not any(g for _, g in got[:-1])


def greedy_pair(lp, contexts: list[str]) -> tuple[str, str]:
    """A context and the facts prompt's greedy continuation of it, as text that tokenises back to
    the same tokens (a byte token of a split character would not)."""
    for ctx in contexts:
        head = lp.tok(ctx).input_ids
        for n in (3, 2, 1):
            out = generate_batch(lp.model, lp.tok, [(lp.prompts["facts"], head)], GenerateConfig(max_new_tokens=n))[0]
            text = lp.tok.decode(out)
            if out and lp.tok(ctx + text).input_ids == head + out:
                return ctx, text
    raise AssertionError("no greedy continuation tokenises back to itself")


def test_a_character_split_across_tokens_reads_as_its_bytes(tok_dir):
    """A byte-level BPE token that holds part of a character (an emoji is four bytes, four tokens of the
    tiny tokenizer) reads as OpenAI's `bytes:\\xf0...`, not U+FFFD; chat's `bytes` are each token's own,
    so joined they spell the text; legacy text_offset counts the characters before each token."""
    from transformers import AutoTokenizer

    from softprompt.serve.logprobs import chat_logprobs, completion_logprobs

    tok = AutoTokenizer.from_pretrained(tok_dir)
    text = "Hi \U0001F60A caf\u00e9 ok"
    ids = tok(text).input_ids
    n = len(ids)
    tops = [[(ids[k], -0.5), (ids[(k + 1) % n], -1.5)] for k in range(n)]
    chat = chat_logprobs(tok, [], ids, [-0.5] * n, tops)["content"]
    assert b"".join(bytes(c["bytes"]) for c in chat) == text.encode("utf-8")
    shown = [c["token"] for c in chat]
    assert not any("\ufffd" in t for t in shown) and "bytes:\\xf0" in "".join(shown)
    assert [c["top_logprobs"][0]["token"] for c in chat] == shown  # the same token reads alike as an alternative
    legacy = completion_logprobs(tok, ids, 0, 1, [-0.5] * (n - 1), tops[1:], 0)
    assert legacy["tokens"] == shown
    for token, at in zip(legacy["tokens"], legacy["text_offset"]):
        if not token.startswith("bytes:"):
            assert text[at:at + len(token)] == token, (token, at)
    assert legacy["text_offset"][-1] + len(legacy["tokens"][-1]) == len(text)
