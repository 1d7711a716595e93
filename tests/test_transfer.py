"""Prompt transfer (`train --init-from SOURCE`, prompts/transfer.py): what each method starts from,
numerically, and one error line for every source it cannot take."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from families import tiny_config
from softprompt.core.config import PromptConfig, TrainConfig
from softprompt.core.utils import SoftpromptError
from softprompt.forward.hidden import batch_loss
from softprompt.prompts.prefix import PrefixPrompt, init_prefix
from softprompt.prompts.prompt import SoftPrompt, load_prompt, save_prompt
from softprompt.prompts.transfer import adopt
from softprompt.training.methods import METHODS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
P = 4


def tiny(name, tok_dir, **overrides):
    tok = AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(name, len(tok), tok.pad_token_id, tok.eos_token_id,
                                                         **overrides))
    return model.eval().requires_grad_(False), tok


def soft_source(model, folder, P=P, seed=1):
    """A saved soft prompt of random (non-trivial) embeddings at the scale of the model's."""
    emb = model.get_input_embeddings().weight
    sp = SoftPrompt(torch.randn(P, emb.shape[1], generator=torch.Generator().manual_seed(seed)) * emb.std())
    save_prompt(sp, folder, {"model": "tiny"})
    return sp


def setup(method, model, tok, source, **pkw):
    pcfg = adopt(PromptConfig(init_from=str(source), **pkw), method, "tiny")
    return METHODS[method].setup(model, tok, pcfg, TrainConfig(method=method), ["a", "b"], "Act.", ":")


def label_batch(tok):
    """Rows whose supervised tokens come after the first (a prefix predicts no first text token)."""
    enc = tok(["Review: a great movie\nSentiment: positive", "Review: a dull film\nSentiment: negative"],
              padding=True, return_tensors="pt")
    targets = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    targets[:, :3] = -100
    return SimpleNamespace(input_ids=enc.input_ids, attention_mask=enc.attention_mask, targets=targets)


@pytest.mark.parametrize("family", ["llama", "bloom"])
def test_prompt_to_prefix_is_the_same_prompt(family, tok_dir, tmp_path):
    """The prefix converted from a soft prompt gives the soft prompt's loss (to 1e-5) on the rows after it."""
    model, tok = tiny(family, tok_dir)
    sp = soft_source(model, tmp_path / "src")
    method = setup("prefix", model, tok, tmp_path / "src")
    assert isinstance(method.prompt, PrefixPrompt) and method.prompt.length == P
    b = label_batch(tok)
    with torch.no_grad():
        want, n = batch_loss(model, sp.embeds, b, "kv")
        got, m = batch_loss(model, method.prompt, b, "kv")
    assert n == m and n > 0
    assert abs(float(want) - float(got)) / n < 1e-5
    bare, _ = batch_loss(model, None, b)
    assert abs(float(bare) - float(want)) / n > 1e-3  # the prompt matters: the check can fail


def test_prompt_to_prompt_and_encoders_start_at_the_source(tok_dir, tmp_path):
    model, tok = tiny("llama", tok_dir)
    sp = soft_source(model, tmp_path / "src")
    prompt = setup("prompt", model, tok, tmp_path / "src")
    assert torch.equal(prompt.prompt.embeds.data, sp.embeds.data)
    assert prompt.prompt.meta["init_from"] == str(tmp_path / "src")
    # residual: the MLP branch's last layer (its LayerNorm's affine) starts at zero, so the prompt is the source
    residual = setup("residual", model, tok, tmp_path / "src")
    assert torch.equal(residual.prompt.input_embeds().detach(), sp.embeds.data)
    # ptuning: the encoder's input is the source; its output is an MLP of it
    ptuning = setup("ptuning", model, tok, tmp_path / "src")
    assert torch.equal(ptuning.prompt.encoder.embedding.weight.data, sp.embeds.data)


def test_prefix_to_prefix_copies_the_keys_and_values(tok_dir, tmp_path):
    model, tok = tiny("llama", tok_dir)
    src = init_prefix(model, tok, SimpleNamespace(virtual_tokens=P, init="random", init_text="Act."), seed=3)
    save_prompt(src, tmp_path / "src", {"model": "tiny"})
    method = setup("prefix", model, tok, tmp_path / "src")
    assert torch.equal(method.prompt.key_values().data, src.key_values().data)


def test_the_source_virtual_token_count_is_adopted_or_must_match(tok_dir, tmp_path):
    model, _ = tiny("llama", tok_dir)
    soft_source(model, tmp_path / "src", P=7)
    assert adopt(PromptConfig(init_from=str(tmp_path / "src")), "prompt", "x").virtual_tokens == 7
    assert adopt(PromptConfig(init_from=str(tmp_path / "src"), virtual_tokens=7), "prompt", "x").virtual_tokens == 7
    with pytest.raises(SoftpromptError, match="--virtual-tokens 5 differs from --init-from .*'s 7 virtual tokens"):
        adopt(PromptConfig(init_from=str(tmp_path / "src"), virtual_tokens=5), "prompt", "x")


def test_refusals_are_one_line_naming_the_flag(tok_dir, tmp_path, llama_dir):
    model, tok = tiny("llama", tok_dir)
    soft_source(model, tmp_path / "soft")
    pre = init_prefix(model, tok, SimpleNamespace(virtual_tokens=P, init="text", init_text="Act."))
    save_prompt(pre, tmp_path / "deep", {"model": "tiny"})
    with pytest.raises(SoftpromptError, match="--init-from .*missing prompt file"):
        adopt(PromptConfig(init_from=str(tmp_path / "nowhere")), "prompt", "x")
    for method in ("prompt", "ptuning", "residual"):
        with pytest.raises(SoftpromptError, match="is a prefix .* cannot start --method " + method):
            adopt(PromptConfig(init_from=str(tmp_path / "deep")), method, "x")
    with pytest.raises(SoftpromptError, match="--method full trains no prompt"):
        adopt(PromptConfig(init_from=str(tmp_path / "soft")), "full", "x")
    with pytest.raises(SoftpromptError, match="give it without --init text"):
        PromptConfig(init_from=str(tmp_path / "soft"), init="text")
    # another base: the local --model's config.json says so before the model loads
    cfg = json.loads((llama_dir / "config.json").read_text())
    meta = json.loads((tmp_path / "soft" / "prompt_config.json").read_text())
    (tmp_path / "soft" / "prompt_config.json").write_text(json.dumps({**meta, "hidden_size": cfg["hidden_size"] + 8}))
    with pytest.raises(SoftpromptError, match="trained for another base .*hidden_size"):
        adopt(PromptConfig(init_from=str(tmp_path / "soft")), "prompt", str(llama_dir))
    # and a loaded base of another width, for a base no config.json is read of
    soft_source(model, tmp_path / "ok")
    wide, _ = tiny("llama", tok_dir, hidden_size=2 * model.config.hidden_size)
    with pytest.raises(SoftpromptError, match="--init-from .*has hidden size"):
        setup("prompt", wide, tok, tmp_path / "ok")


def cli(*argv, cwd):
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "src"), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "softprompt", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_journey_source_then_init_from_on_the_cli(llama_dir, countries_csv, tmp_path):
    """Two processes as a user runs them: a source prompt, then a prefix started from it with --init-from."""
    common = ["--model", str(llama_dir), "--device", "cpu", "--data", str(countries_csv), "--template",
              "Country: {country}\\nContinent:", "--labels", "Africa,Asia,Europe,Americas,Oceania",
              "--label-col", "europe", "--max-steps", "2", "--batch-size", "4", "--eval-every", "0",
              "--warmup-steps", "0", "--eval-limit", "8", "--no-eval-untuned", "--max-length", "32"]
    src = cli("train", *common, "--method", "prompt", "--virtual-tokens", "3", "--out", "src", cwd=tmp_path)
    assert src.returncode == 0, src.stderr[-2000:]
    dst = cli("train", *common, "--method", "prefix", "--init-from", "src", "--out", "dst", cwd=tmp_path)
    assert dst.returncode == 0, dst.stderr[-2000:]
    assert [json.loads(r.stdout.strip().splitlines()[-1])["method"] for r in (src, dst)] == ["prompt", "prefix"]
    rc = json.loads((tmp_path / "dst" / "run_config.json").read_text())
    # Recorded as a path from anywhere, so the record replays from any folder.
    assert rc["PromptConfig"]["init_from"] == str(tmp_path / "src") and rc["PromptConfig"]["virtual_tokens"] == 3
    assert load_prompt(tmp_path / "dst").kind == "prefix"
    bad = cli("train", *common, "--method", "prompt", "--init-from", "dst", "--out", "bad", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert f"--init-from '{tmp_path / 'dst'}' is a prefix" in bad.stderr
    assert not (tmp_path / "bad").exists()


def test_model_card_names_the_source():
    from softprompt.prompts.hub_push import model_card

    card = model_card({"model": "tiny", "init": "file", "init_from": "/home/me/runs/sst2", "task": "classify"},
                      None, "me/rte")
    assert "| started from | the prompt of local run `sst2` |" in card and "/home/me" not in card
    assert "| started from | `hf://me/sst2` |" in model_card({"model": "tiny", "init_from": "hf://me/sst2"}, None, "me/x")
    assert "started from" not in model_card({"model": "tiny", "init": "text"}, None, "me/x")
