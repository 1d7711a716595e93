"""Inspect: a prompt initialised from known token embeddings has those tokens as nearest neighbours; a
prefix shows its per-layer key and value norms beside the model's own."""
import json

import pytest
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
    # A run's config file names the model, as it does for eval and generate (not the built-in default).
    record = tmp_path / "run_config.json"
    record.write_text(json.dumps({"ModelConfig": {"model": str(llama_dir), "dtype": "auto", "device": "cpu",
                                                  "quantize": "none"}, "forward_path_taken": "kv"}))
    assert main(["inspect", "--config", str(record), str(tmp_path / "p"), "--top-k", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == str(llama_dir)


def test_inspect_prefix_reports_per_layer_norms(model_dir, tmp_path, capsys):
    """A prefix has no nearest tokens: inspect reports each layer's key and value norms per virtual
    token, equal to norms computed by hand from the saved tensor, beside the model's own for a text."""
    from safetensors.torch import load_file

    from softprompt.base.models import load_model
    from softprompt.evaluation.prefix_norms import REFERENCE_TEXT
    from softprompt.prompts.prefix import init_prefix

    model, tok = load_model(str(model_dir))
    prefix = init_prefix(model, tok, PromptConfig(virtual_tokens=3, init="random"), seed=1)
    with torch.no_grad():  # make one layer's keys stand out, so a layer mix-up cannot pass
        prefix.kv[1, 0] *= 7
    save_prompt(prefix, tmp_path / "pre", {"model": str(model_dir)})
    assert main(["inspect", str(tmp_path / "pre"), "--model", str(model_dir), "--json"]) == 0
    r, err = json.loads((seen := capsys.readouterr()).out), seen.err
    assert "--top-k" not in err
    # --top-k given for a prefix was ignored without a word (hunt 13): said, and the norms shown as before.
    assert main(["inspect", str(tmp_path / "pre"), "--model", str(model_dir), "--json", "--top-k", "3"]) == 0
    again = capsys.readouterr()
    assert json.loads(again.out) == r and "warning: --top-k is for a soft prompt's nearest tokens" in again.err
    kv = load_file(str(tmp_path / "pre" / "prompt.safetensors"))["prefix_key_values"]  # [L, 2, heads, P, d]
    L, _, heads, P, d = kv.shape
    assert (r["kind"], r["virtual_tokens"], r["layers"], r["kv_heads"], r["head_dim"]) == ("prefix", 3, L, heads, d)
    # The model's own keys and values of the reference text, through its ordinary forward pass with a cache.
    ids = tok(REFERENCE_TEXT, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    assert r["reference"]["tokens"] == ids.shape[1] - 1 and "tokens after the first" in r["reference"]["what"]
    for layer in range(L):
        row = r["per_layer"][layer]
        for j, name in enumerate(("key", "value")):
            by_hand = torch.stack([kv[layer, j, :, p].reshape(-1).norm() for p in range(P)])
            assert row[name]["mean"] == pytest.approx(by_hand.mean().item(), rel=1e-5)
            assert row[name]["max"] == pytest.approx(by_hand.max().item(), rel=1e-5)
            text = getattr(cache.layers[layer], name + "s")[0]  # [heads, T, d]
            text = text.transpose(0, 1).reshape(text.shape[1], -1)[1:].norm(dim=-1)
            assert row["text_" + name]["mean"] == pytest.approx(text.mean().item(), rel=1e-4)
            assert row["text_" + name]["max"] == pytest.approx(text.max().item(), rel=1e-4)
    assert r["per_layer"][1]["key"]["mean"] > 3 * r["per_layer"][0]["key"]["mean"]
    assert main(["inspect", str(tmp_path / "pre"), "--model", str(model_dir)]) == 0
    text = capsys.readouterr().out
    assert "a prefix of 3 virtual tokens" in text and "Reference" in text and REFERENCE_TEXT[:20] in text
    assert len(text.splitlines()) == 4 + L
    first = text.splitlines()[4].split()
    assert int(first[0]) == 0 and float(first[1]) == pytest.approx(r["per_layer"][0]["key"]["mean"], abs=1e-3)
