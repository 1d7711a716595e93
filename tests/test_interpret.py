"""Inspect: a prompt initialised from known token embeddings has those tokens as nearest neighbours."""
import json

import torch

from softprompt.cli import main
from softprompt.core.config import PromptConfig
from softprompt.evaluation.interpret import inspect_prompt, nearest_tokens
from softprompt.prompts.prompt import init_prompt, save_prompt


def test_text_init_prompt_finds_its_own_tokens(tiny):
    model, tok = tiny
    text = "Classify the text as negative or positive."
    p = init_prompt(model, tok, PromptConfig(virtual_tokens=6, init="text", init_text=text))
    ids = tok(text, add_special_tokens=False).input_ids
    r = inspect_prompt(model, tok, p.embeds, k=3)
    assert [t["nearest"][0]["id"] for t in r["tokens"]] == (ids * 6)[:6]
    assert all(abs(t["nearest"][0]["cosine"] - 1) < 1e-5 for t in r["tokens"])
    assert all(t["nearest"][1]["cosine"] < t["nearest"][0]["cosine"] for t in r["tokens"])
    assert r["tokens"][0]["nearest"][0]["token"] == tok.decode([ids[0]])


def test_nearest_is_scale_invariant():
    emb = torch.randn(50, 8)
    sims, ids = nearest_tokens(emb[[3, 7]] * torch.tensor([[5.0], [0.1]]), emb, k=1)
    assert ids[:, 0].tolist() == [3, 7] and torch.allclose(sims[:, 0], torch.ones(2), atol=1e-5)


def test_inspect_cli(llama_dir, tmp_path, capsys):
    from softprompt.base.models import load_model

    model, tok = load_model(str(llama_dir))
    p = init_prompt(model, tok, PromptConfig(virtual_tokens=2, init="text", init_text="Country"))
    save_prompt(p, tmp_path / "p", {"model": str(llama_dir)})
    assert main(["inspect", str(tmp_path / "p"), "--model", str(llama_dir), "--top-k", "2", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["virtual_tokens"] == 2 and len(r["tokens"][0]["nearest"]) == 2
    assert main(["inspect", str(tmp_path / "p"), "--model", str(llama_dir)]) == 0
    assert "norm" in capsys.readouterr().out
