"""The Hub, offline: `push`'s upload (softprompt files + PEFT layout + card) written to a local folder
and read by both softprompt and PEFT; `hf://REPO_ID[@REV]` and PEFT's own from_pretrained read the
same files from huggingface_hub's cache layout; the network's absence is one error line."""
import json
import shutil

import pytest
import torch

from softprompt.cli import main
from softprompt.core.config import DataConfig, ModelConfig, PromptConfig, TrainConfig
from softprompt.prompts.hub_push import prepare_upload
from softprompt.prompts.prompt import load_prompt
from softprompt.training.train import train

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def run_dir(llama_dir, tmp_path_factory):
    import csv

    from conftest import EXAMPLES

    root = tmp_path_factory.mktemp("hub")
    rows = [json.loads(l) for l in EXAMPLES.read_text().splitlines()]
    data = root / "c.csv"
    with open(data, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["country", "europe"])
        w.writerows([r["country"], int(r["continent"] == "Europe")] for r in rows)
    out = root / "run"
    train(ModelConfig(model=str(llama_dir), device="cpu"),
          DataConfig(data=str(data), template="Country: {country}\\nEurope:", labels="no,yes", label_col="europe"),
          PromptConfig(virtual_tokens=3, init="labels"),
          TrainConfig(out=str(out), max_steps=2, batch_size=4, eval_every=2, save_every=0), quiet=True)
    return out


def test_upload_layout_and_card(run_dir, llama_dir, tmp_path):
    up = prepare_upload(run_dir, tmp_path / "up", "someone/countries-europe")
    names = {p.name for p in up.iterdir()}
    assert {"prompt.safetensors", "prompt_config.json", "adapter_config.json", "adapter_model.safetensors",
            "README.md", "run_config.json", "summary.json", "metrics.jsonl"} <= names
    assert "checkpoint" not in names
    ours = load_prompt(run_dir).embeds
    assert torch.equal(load_prompt(up).embeds, ours)
    from huggingface_hub import ModelCard

    card = ModelCard.load(up / "README.md")
    assert card.data.library_name == "peft" and card.data.base_model == str(llama_dir)
    assert {"softprompt", "prompt-tuning", "peft"} <= set(card.data.tags)
    summary = json.loads((run_dir / "summary.json").read_text())
    acc = f"{100 * summary['final_eval']['accuracy']:.2f}%"
    base_acc = f"{100 * summary['untuned_eval']['accuracy']:.2f}%"
    assert f"| accuracy | {base_acc} | {acc} |" in card.text
    # The template as the model reads it (a real newline, in a code block), not JSON-escaped.
    assert "| task | classify |" in card.text and "```text\nCountry: {country}\nEurope:\n```" in card.text
    assert "PeftModel.from_pretrained(base, 'someone/countries-europe')" in card.text
    # PEFT reads the same folder: its prompt is ours, bit for bit.
    from transformers import AutoModelForCausalLM

    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), str(up))
    assert torch.equal(model.prompt_encoder["default"].embedding.weight.detach(), ours)


def test_card_scores_the_prompt_it_uploads_and_names_the_base_given(run_dir, tmp_path):
    """Under keep-best the uploaded prompt is the best step's, while summary.json's final_eval is the
    last step's: the card shows the prompt's own scores. --base-model names the card's base too."""
    from huggingface_hub import ModelCard

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    summary = json.loads((run / "summary.json").read_text())
    kept = load_prompt(run).meta["eval"]
    summary["final_eval"] = {**kept, "accuracy": 0.123, "loss": 9.875}  # a later, worse step than the kept one
    (run / "summary.json").write_text(json.dumps(summary))
    meta = json.loads((run / "prompt_config.json").read_text())
    meta["config"]["DataConfig"]["eval_data"] = "/somewhere/dev.csv"  # the held-out rows' own file
    (run / "prompt_config.json").write_text(json.dumps(meta))
    card = ModelCard.load(prepare_upload(run, tmp_path / "up", "someone/x", base_model="org/base") / "README.md")
    untuned = summary["untuned_eval"]["accuracy"]
    assert f"| accuracy | {100 * untuned:.2f}% | {100 * kept['accuracy']:.2f}% |" in card.text
    assert "12.30%" not in card.text and "9.875" not in card.text
    held_out = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert held_out["accuracy"] == round(kept["accuracy"], 4)
    assert {r.dataset_name for r in card.data.eval_results} == {"dev.csv"}
    assert card.data.base_model == "org/base" and "from_pretrained('org/base'" in card.text


def test_a_hub_uri_folded_by_a_path_is_named_as_written():
    """serve's loader wraps `--prompt NAME=hf://...` in a Path, which folds "//": the error still names
    hf://REPO@REV."""
    from pathlib import Path

    from softprompt.core.utils import SoftpromptError
    from softprompt.prompts.hub import download

    with pytest.raises(SoftpromptError, match=r"^cannot download prompt hf://someone/not-cached@v2 from the Hug"):
        download(Path("hf://someone/not-cached@v2"))


def _cache(root, repo_id, folder, ref="main", sha="a" * 40):
    """huggingface_hub's cache layout: models--org--name/{refs/REF, snapshots/SHA/...}."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, repo / "snapshots" / sha)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(sha)
    return repo


def test_hf_uri_and_peft_read_the_hub_cache(run_dir, llama_dir, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    up = prepare_upload(run_dir, tmp_path / "up", "someone/countries-europe")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    _cache(tmp_path / "cache", "someone/countries-europe", up)
    _cache(tmp_path / "cache", "someone/countries-europe", up, ref="v1", sha="b" * 40)
    ours = load_prompt(run_dir).embeds
    for uri in ("hf://someone/countries-europe", "hf://someone/countries-europe@v1", "hf:/someone/countries-europe"):
        assert torch.equal(load_prompt(uri).embeds, ours), uri
    # The server's prompt loader (serve --prompt NAME=hf://...) wraps the spec in a Path, which folds "//".
    from pathlib import Path

    from softprompt.base.models import load_model
    from softprompt.serve.registry import read

    assert torch.equal(read(Path("hf://someone/countries-europe"), load_model(str(llama_dir))[0]).embeds, ours)
    # The CLI: eval scores the cached prompt as it scores the run folder.
    data = ["--model", str(llama_dir), "--device", "cpu", "--data", str(run_dir.parent / "c.csv"), "--template",
            "Country: {country}\\nEurope:", "--labels", "no,yes", "--label-col", "europe", "--json"]
    assert main(["eval", *data, "--prompt", str(run_dir)]) == 0
    local = json.loads(capsys.readouterr().out)
    assert main(["eval", *data, "--prompt", "hf://someone/countries-europe"]) == 0
    hub = json.loads(capsys.readouterr().out)
    assert hub["accuracy"] == local["accuracy"] and hub["loss"] == local["loss"]
    assert main(["import-peft", "hf://someone/countries-europe@v1", str(tmp_path / "back")]) == 0
    assert torch.equal(load_prompt(tmp_path / "back").embeds, ours)
    # PEFT's own loader, given the repository id, finds the same files in the cache.
    from transformers import AutoModelForCausalLM

    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), "someone/countries-europe")
    assert torch.equal(model.prompt_encoder["default"].embedding.weight.detach(), ours)


@pytest.mark.parametrize("argv,msg", [
    (["export-peft", "hf://someone/not-cached", "OUT"],
     "cannot download prompt hf://someone/not-cached from the Hugging Face Hub"),
    (["export-peft", "hf://a/b/c", "OUT"], "hf://a/b/c: expected hf://REPO_ID or hf://REPO_ID@REVISION"),
    (["push", "{run}", "someone/x"], "cannot push to the Hugging Face Hub as someone/x (offline, unreachable"),
])
def test_offline_is_one_error_line(run_dir, argv, msg, capsys):
    assert main([a.format(run=run_dir) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("softprompt: error: " + msg), err


def test_push_local_dir_from_the_command_line(run_dir, tmp_path, capsys):
    assert main(["push", str(run_dir), "someone/x", "--local-dir", str(tmp_path / "up")]) == 0
    assert (tmp_path / "up" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("method, named, tag", [("prefix", "prefix tuning", "prefix-tuning"),
                                                ("residual", "residual prompt tuning", "residual-prompt-tuning")])
def test_card_names_the_method(method, named, tag, run_dir, llama_dir, tmp_path):
    """The card says which --method made the prompt (issue 23): its name and paper, its Hub tag, and
    for a prefix the PEFT layout it is uploaded in; the prompt-tuning card still says prompt tuning."""
    from huggingface_hub import ModelCard

    out = tmp_path / "run"
    train(ModelConfig(model=str(llama_dir), device="cpu"),
          DataConfig(data=str(run_dir.parent / "c.csv"), template="Country: {country}\\nEurope:", labels="no,yes",
                     label_col="europe"),
          PromptConfig(virtual_tokens=3, init="text"),
          TrainConfig(out=str(out), method=method, max_steps=1, warmup_steps=0, batch_size=4, eval_every=0,
                      save_every=0), quiet=True)
    card = ModelCard.load(prepare_upload(out, tmp_path / "up", "someone/x") / "README.md")
    assert f"| method | {named} (`--method {method}`) |" in card.text and f"by {named} (" in card.text
    assert tag in card.data.tags and "prompt-tuning" not in card.data.tags
    peft_type = json.loads((tmp_path / "up" / "adapter_config.json").read_text())["peft_type"]
    if method == "prefix":
        assert peft_type == "PREFIX_TUNING" and "PEFT's prefix-tuning layout" in card.text
        # The prefix's own PEFT example (its keys and values as generate's cache), not the soft prompt's
        # (which prepends embeddings a prefix does not have); test_api runs both as written.
        assert "cache=cache" in card.text and "inputs_embeds" not in card.text
    else:
        assert peft_type == "PROMPT_TUNING" and "an encoder produced it while training" in card.text
        assert "inputs_embeds" in card.text and "cache=cache" not in card.text  # a soft prompt's example
    prompt_card = ModelCard.load(prepare_upload(run_dir, tmp_path / "up2", "someone/y") / "README.md")
    assert "| method | prompt tuning (`--method prompt`) |" in prompt_card.text


def test_a_hub_host_that_does_not_resolve_runs_offline():
    """Only a failed lookup turns the libraries offline: an offline variable given either way, or a proxy
    (which resolves for the client), leaves them as they are."""
    from softprompt.core.offline import offline_where_unresolvable

    env = {"HF_ENDPOINT": "https://hub.invalid"}  # .invalid never resolves (RFC 2606)
    assert offline_where_unresolvable(env) and env["HF_HUB_OFFLINE"] == env["HF_DATASETS_OFFLINE"] == "1"
    for kept in ({"HF_ENDPOINT": "https://hub.invalid", "HF_HUB_OFFLINE": "0"},
                 {"HF_ENDPOINT": "https://hub.invalid", "https_proxy": "http://proxy:3128"},
                 {"HF_ENDPOINT": "https://localhost"}):
        before = dict(kept)
        assert not offline_where_unresolvable(kept) and kept == before, kept


def test_the_command_without_network_or_offline_variables_says_one_line(tmp_path):
    """Offline without HF_HUB_OFFLINE, `train --data ORG/NAME` printed ten of huggingface_hub's
    "Retrying in 8s" lines over 25 s before its error (a Hub --model: 50 s); now the error line alone."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE") and "proxy" not in k.lower()}
    env["HF_ENDPOINT"] = "https://hub.invalid"
    r = subprocess.run([str(Path(sys.executable).parent / "softprompt"), "train", "--data", "nobody/nothing",
                        "--template", "{text}", "--out", str(tmp_path / "run")], capture_output=True, text=True,
                       env=env, timeout=300)
    said = "softprompt: error: cannot load dataset 'nobody/nothing'"
    assert r.returncode == 2 and r.stderr.startswith(said) and r.stderr.count("\n") == 1, r.stderr
