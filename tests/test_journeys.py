"""User journeys through the installed `softprompt` command, on the built-in model with a few steps.

Each prompt kind that `train` writes (classification, input/target, plain language modelling and
chat) is trained by the command in a subprocess, and its output folder is handed on as a user hands
it: to `serve` (then the HTTP requests the README shows), hot load, `eval`, `generate`,
`export-peft` (then PEFT's own loader), `push --local-dir` and `--config` replay. Unit and parity
tests passed while `serve` refused every generation prompt `train` writes; these tests run the
commands the way a user does, so that a break between two parts fails here.

Every command runs once as the installed program; its repeats for the other kinds run as
`python -m softprompt` forked from an interpreter that has imported torch (tests/fork_server.py),
still a process of its own with its own exit status and output.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import SHARED
from journey_helpers import ACTS, free_port, two_at_a_time, write_chats

pytestmark = pytest.mark.slow
SP = str(Path(sys.executable).parent / "softprompt")
SST2 = SHARED / "sst2"
FEW = ["--max-steps", "2", "--batch-size", "2", "--max-length", "64", "--eval-limit", "8", "--save-every", "0"]
KINDS = {
    "sst2": ["--data", str(SST2 / "train.tsv"), "--eval-data", str(SST2 / "dev.tsv"), "--template",
             r"Review: {sentence}\nSentiment:", "--labels", "negative,positive", "--loss", "classes",
             "--init", "labels"],
    "acts": ["--data", str(ACTS), "--template", r"Act as a {act}.\nPrompt:", "--target", " {prompt}"],
    "lm": ["--data", str(ACTS), "--text-col", "prompt"],
    "chat": ["--data", "CHATS"],  # written by the fixture: a messages column
}


def sp(*args, cwd: Path, check: bool = True, timeout: int = 900, python: str | None = None
       ) -> subprocess.CompletedProcess:
    """The installed command, or with `python` given, `python -m softprompt` (the same entry point)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    argv = [SP] if python is None else [python, "-m", "softprompt"]
    r = subprocess.run([*argv, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"softprompt {' '.join(map(str, args))} exited {r.returncode}:\n{r.stderr[-3000:]}")
    return r


@pytest.fixture(scope="module")
def runs(tmp_path_factory, fork_python) -> Path:
    """One folder per prompt kind, each written by `softprompt train` in a subprocess."""
    root = tmp_path_factory.mktemp("journeys")
    chats = write_chats(root / "chats.jsonl", 40)
    calls = [("train", *[str(chats) if f == "CHATS" else f for f in flags], *FEW, "--out", root / "runs" / name)
             for name, flags in KINDS.items()]
    sp(*calls[0], cwd=root)  # alone: the first run may convert the built-in model into its cache
    two_at_a_time(lambda *a: sp(*a, cwd=root, python=fork_python), calls[1:])
    return root


@pytest.fixture(scope="module")
def server(runs):
    """`softprompt serve` with every kind of prompt train wrote; yields its base URL."""
    import httpx

    port = free_port()
    args = [SP, "serve", "--port", str(port), "--admin-token", "tok"]
    for name in ("sst2", "acts", "lm"):
        args += ["--prompt", f"{name}=runs/{name}"]
    proc = subprocess.Popen(args, cwd=runs, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            if proc.poll() is not None:
                raise AssertionError(f"serve exited {proc.returncode}:\n{proc.stdout.read()[-3000:]}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            raise AssertionError("serve did not answer /health within 300 s")
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def test_train_writes_every_prompt_kind_and_serve_loads_them(server, runs):
    import httpx

    # chat is hot-loaded through the admin API, as a running server takes a new prompt.
    r = httpx.post(server + "/v1/admin/prompts", json={"name": "chat", "path": str(runs / "runs" / "chat")},
                   headers={"Authorization": "Bearer tok"}, timeout=60)
    assert r.status_code == 201, r.text
    models = {m["id"] for m in httpx.get(server + "/v1/models", timeout=10).json()["data"]}
    assert {"sst2", "acts", "lm", "chat"} <= models


def test_the_readme_requests_answer_for_every_kind(server, runs):
    import httpx

    for name in ("acts", "lm"):
        r = httpx.post(server + "/v1/completions", timeout=120,
                       json={"model": name, "prompt": "Act as a travel guide.\nPrompt:", "max_tokens": 4})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["finish_reason"] in ("length", "stop")
    r = httpx.post(server + "/v1/chat/completions", timeout=120, json={
        "model": "chat", "messages": [{"role": "user", "content": "Act as a poet."}], "max_tokens": 4})
    assert r.status_code == 200, r.text
    assert isinstance(r.json()["choices"][0]["message"]["content"], str)
    r = httpx.post(server + "/v1/classify", timeout=120, json={"task": "sst2", "text": "a wonderful, moving film"})
    assert r.status_code == 200, r.text
    probs = r.json()
    assert json.dumps(probs).count("positive") and json.dumps(probs).count("negative")
    # The text filled sst2's template, as the README says: the tokens of the formatted input, sent as it is
    # to /v1/completions (which applies no template).
    whole = httpx.post(server + "/v1/completions", timeout=120, json={
        "model": "sst2", "prompt": "Review: a wonderful, moving film\nSentiment:", "max_tokens": 1}).json()
    assert probs["usage"]["prompt_tokens"] == whole["usage"]["prompt_tokens"]
    # The text as an object of the recorded template's columns (what an RTE task takes) fills it the same way.
    r = httpx.post(server + "/v1/classify", timeout=120,
                   json={"task": "sst2", "text": {"sentence": "a wonderful, moving film"}})
    assert r.status_code == 200 and r.json()["scores"] == probs["scores"], r.text
    r = httpx.post(server + "/v1/completions", timeout=120, json={
        "model": "acts", "prompt": "Act as a chef.\nPrompt:", "max_tokens": 3, "logprobs": 1})
    lp = r.json()["choices"][0]["logprobs"]
    assert r.status_code == 200 and len(lp["token_logprobs"]) == len(lp["tokens"]) >= 1
    assert all(v <= 0 for v in lp["token_logprobs"])


def test_streaming_equals_the_whole_answer(server):
    import httpx

    body = {"model": "acts", "prompt": "Act as a chef.\nPrompt:", "max_tokens": 6}
    whole = httpx.post(server + "/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
    parts = []
    with httpx.stream("POST", server + "/v1/completions", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                parts.append(json.loads(line[6:])["choices"][0]["text"])
    assert "".join(parts) == whole


def test_eval_generate_and_replay_take_the_run_folders(runs, fork_python):
    # The prompt's recorded template and labels are eval's defaults: the user gives data and prompt.
    out = sp("eval", "--prompt", "runs/sst2", "--data", SST2 / "dev.tsv", "--limit", "8", "--json", cwd=runs)
    scored = json.loads(out.stdout.strip().splitlines()[-1])
    assert 0 <= scored["accuracy"] <= 1
    # generate fills the recorded one-column template ("Act as a {act}.\nPrompt:") with the text.
    filled, raw = two_at_a_time(lambda python, *a: sp(*a, cwd=runs, python=python), [
        (None, "generate", "--prompt", "runs/acts", "--max-new-tokens", "4", "travel guide"),
        (fork_python, "generate", "--prompt", "runs/acts", "--max-new-tokens", "4", "--raw",
         "Act as a travel guide.\nPrompt:")])
    # The two print their inputs as given; the continuations (after the "===" line) are the same.
    assert filled.stdout.strip() and filled.stdout.splitlines()[1:] == raw.stdout.splitlines()[1:]
    # --config replay of a run gives the same prompt bytes (a prefix, trained with scaled steps by default).
    recorded = json.loads((runs / "runs" / "acts" / "run_config.json").read_text())["TrainConfig"]
    assert (recorded["method"], recorded["prefix_scaled_steps"]) == ("prefix", True)
    sp("train", "--config", "runs/acts/run_config.json", "--out", "runs/acts-again", cwd=runs, python=fork_python)
    a, b = (runs / "runs" / d / "prompt.safetensors" for d in ("acts", "acts-again"))
    assert a.read_bytes() == b.read_bytes()


def test_every_kind_evaluates_and_generates_from_its_folder(runs, fork_python):
    """eval and generate take each kind's folder with nothing but data or text: the recorded reading
    (template, target, text column, chat) is the default."""
    data = {"sst2": SST2 / "dev.tsv", "acts": ACTS, "lm": ACTS, "chat": runs / "chats.jsonl"}
    text = {"sst2": "a moving film", "acts": "poet", "lm": "I want you to", "chat": "Act as a poet."}
    outs = two_at_a_time(lambda *a: sp(*a, cwd=runs, python=fork_python), [
        call for name in KINDS for call in (
            ("eval", "--prompt", f"runs/{name}", "--data", data[name], "--limit", "4", "--json"),
            ("generate", "--prompt", f"runs/{name}", "--max-new-tokens", "3", text[name]))])
    for name, scored, generated in zip(KINDS, outs[::2], outs[1::2]):
        scored = json.loads(scored.stdout.strip().splitlines()[-1])
        assert scored["loss"] > 0, (name, scored)
        assert "tuned" in generated.stdout, (name, generated.stdout)


def test_export_push_and_peft_read_what_train_wrote(runs, fork_python):
    """Every kind's folder goes to PEFT's layout (export-peft, push --local-dir), and PEFT's own
    loader reads back the prompt bit for bit."""
    import torch
    from peft import PeftModel

    from softprompt.base.models import load_model
    from softprompt.prompts.prefix import to_flat
    from softprompt.prompts.prompt import load_prompt

    base, tok = load_model("smollm2-135m-instruct")
    calls = [call for name in KINDS for call in (
        ("export-peft", f"runs/{name}", f"runs/{name}-peft"),
        ("push", f"runs/{name}", f"me/{name}", "--local-dir", f"runs/{name}-hub"))]
    two_at_a_time(lambda *a: sp(*a, cwd=runs), calls[:2])  # each command once as the installed program
    two_at_a_time(lambda *a: sp(*a, cwd=runs, python=fork_python), calls[2:])
    kinds = set()
    for name in KINDS:
        prompt = load_prompt(runs / "runs" / name)
        kinds.add(prompt.kind)
        # PEFT's one saved tensor: a soft prompt's [P, H], or a prefix's keys and values as [P, L*2*kv_dim]
        ours = prompt.embeds if prompt.kind == "prompt" else to_flat(prompt.key_values())
        for folder in (f"{name}-peft", f"{name}-hub"):
            peft_model = PeftModel.from_pretrained(base, runs / "runs" / folder)
            got = peft_model.get_prompt_embedding_to_save("default")
            assert torch.equal(got.float(), ours.float()), folder
            base = peft_model.unload() if hasattr(peft_model, "unload") else peft_model.base_model
        cfg = json.loads((runs / "runs" / f"{name}-peft" / "adapter_config.json").read_text())
        peft_type = {"prompt": "PROMPT_TUNING", "prefix": "PREFIX_TUNING"}[prompt.kind]
        assert cfg["peft_type"] == peft_type and cfg["num_virtual_tokens"] == ours.shape[0]
        assert cfg["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert kinds == {"prompt", "prefix"}  # sst2 (--init labels) a soft prompt; the others the default prefix


def test_a_header_less_file_trains_and_evaluates_with_columns(runs, fork_python):
    """AG News as shared here is a header-less TSV (the text, then the label's name): its row 1 was taken
    for column names, so no flag could read it. --columns names them for train and for eval."""
    ag = SHARED / "ag_news" / "alps_dev_10k.tsv"
    reading = ["--data", ag, "--columns", "text,label", "--template", r"Article: {text}\nTopic:"]
    sp("train", *reading, "--labels", "World,Sports,Business,Sci/Tech", *FEW, "--limit", "16",
       "--out", "runs/ag", cwd=runs, python=fork_python)
    record = json.loads((runs / "runs" / "ag" / "run_config.json").read_text())
    assert (record["DataConfig"]["columns"], record["train_examples"], record["eval_examples"]) == ("text,label", 16, 8)
    out = sp("eval", "--prompt", "runs/ag", *reading[:4], "--limit", "8", "--json", cwd=runs, python=fork_python)
    scored = json.loads(out.stdout.strip().splitlines()[-1])
    assert scored["n"] == 8 and 0 <= scored["accuracy"] <= 1, scored
    # The same file without --columns: the prompt's recorded names read it, as they read its training file.
    again = sp("eval", "--prompt", "runs/ag", "--data", ag, "--limit", "8", "--json", cwd=runs, python=fork_python)
    assert json.loads(again.stdout.strip().splitlines()[-1]) == scored
    assert "without a header, its columns named text,label as the prompt's training data was" in again.stderr
