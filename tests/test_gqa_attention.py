"""base/gqa_attention.py: a CPU training step through masked grouped-query attention keeps each
key/value head once for backward, with the model's own loss and gradient; passes without a
backward, switched-off modules and models without grouped-query attention keep the model's own."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from families import FAMILIES, tiny_config
from memory_helpers import saved_bytes
from softprompt.base import gqa_attention
from softprompt.base.families import kv_geometry
from softprompt.base.gqa_attention import use_gqa_attention
from softprompt.base.half_attention import use_fp32_attention
from softprompt.forward.hidden import text_hidden
from softprompt.prompts.prefix import PrefixPrompt

TEXTS = ["Country: France\nFacts: capital=Paris", "Review: a dull film", "Act as a teacher."]
P = 5


def setup(family: str, tok_dir, dtype=torch.float32):
    """A tiny model, a trainable prefix in fp32 (as train keeps it) and a right-padded batch."""
    tok = AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family, len(tok), tok.pad_token_id, tok.eos_token_id))
    model = model.to(dtype).eval().requires_grad_(False)
    use_fp32_attention(model)  # a half-precision base's attention in fp32, as train routes it first
    L, heads, d = kv_geometry(model)
    kv = torch.randn(L, 2, heads, P, d, generator=torch.Generator().manual_seed(1))
    prefix = PrefixPrompt(kv, {"hidden_size": model.config.hidden_size})
    prefix.kv.requires_grad_(True)
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    return model, prefix, enc


def step(model, prefix, enc):
    """(loss, the prefix's gradient, bytes kept for backward) of one forward and backward."""
    def forward():
        h, _ = text_hidden(model, prefix, enc.input_ids, enc.attention_mask)
        return h.float().square().mean()
    kept, loss = saved_bytes(forward)
    (grad,) = torch.autograd.grad(loss, prefix.kv)
    return loss.detach(), grad, kept


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_same_loss_and_gradient_with_each_key_value_head_kept_once(family, tok_dir):
    model, prefix, enc = setup(family, tok_dir)
    assert use_gqa_attention(model, on=False) == 0
    ref_loss, ref_grad, ref_kept = step(model, prefix, enc)
    assert use_gqa_attention(model) == model.config.num_hidden_layers
    loss, grad, kept = step(model, prefix, enc)
    assert torch.allclose(loss, ref_loss, rtol=1e-6, atol=0)
    assert (grad - ref_grad).abs().max() <= 1e-5 * ref_grad.abs().max()
    # Each layer's keys and values [B, heads, P + T, d] were kept groups times over; now once.
    cfg, (B, T) = model.config, enc.input_ids.shape
    d = cfg.hidden_size // cfg.num_attention_heads
    repeated = 2 * (cfg.num_attention_heads - cfg.num_key_value_heads) * B * (P + T) * d * 4
    assert ref_kept - kept == cfg.num_hidden_layers * repeated


def direct_calls(monkeypatch) -> list[dict]:
    """The keyword arguments of every call that gqa_attention sends to SDPA itself."""
    calls = []
    real = gqa_attention.sdpa
    monkeypatch.setattr(gqa_attention, "sdpa", lambda *a, **k: calls.append(k) or real(*a, **k))
    return calls


def test_half_precision_base_keeps_its_fp32_attention(tok_dir, monkeypatch):
    model, prefix, enc = setup("llama", tok_dir, torch.bfloat16)
    use_gqa_attention(model, on=False)
    ref_loss, ref_grad, _ = step(model, prefix, enc)
    calls = direct_calls(monkeypatch)
    use_gqa_attention(model)
    loss, grad, _ = step(model, prefix, enc)
    assert len(calls) == model.config.num_hidden_layers  # through half_attention.sdpa's fp32 cast
    assert "softprompt_fp32" in model.config._attn_implementation
    # The same fp32 attention from the same bf16 projections: bf16 outputs within one rounding
    assert torch.allclose(loss, ref_loss, rtol=1e-2) and (grad - ref_grad).abs().max() <= 2e-2 * ref_grad.abs().max()


def test_only_grad_recording_calls_of_switched_on_modules_take_it(tok_dir, monkeypatch):
    model, prefix, enc = setup("llama", tok_dir)
    calls = direct_calls(monkeypatch)
    use_gqa_attention(model)
    with torch.no_grad():  # eval, serving, generation: the model's own attention
        text_hidden(model, prefix, enc.input_ids, enc.attention_mask)
    assert calls == []
    step(model, prefix, enc)
    assert len(calls) == model.config.num_hidden_layers and all(k["enable_gqa"] for k in calls)
    calls.clear()
    use_gqa_attention(model, on=False)  # a bench's PEFT path on the shared base
    step(model, prefix, enc)
    assert calls == []


def test_models_without_grouped_queries_are_left_alone(tok_dir):
    tok = AutoTokenizer.from_pretrained(tok_dir)
    for family, overrides in (("llama", {"num_key_value_heads": 4}), ("bloom", {})):
        model = AutoModelForCausalLM.from_config(tiny_config(family, len(tok), tok.pad_token_id, tok.eos_token_id,
                                                             **overrides))
        assert use_gqa_attention(model) == 0


def test_softprompt_train_records_the_modules_that_keep_heads_once(tmp_path, llama_dir):
    """The journey: the installed `softprompt train --method prefix` on a grouped-query model; its
    run_config.json says how many attention modules kept each key/value head once, and it trained."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    csv = tmp_path / "d.csv"
    csv.write_text("text\n" + "\n".join(f"row {i} says {'yes' if i % 2 else 'no'}" for i in range(16)))
    out = tmp_path / "run"
    r = subprocess.run([str(Path(sys.executable).parent / "softprompt"), "train", "--model", str(llama_dir),
                        "--data", str(csv), "--text-col", "text", "--dtype", "float32", "--device", "cpu",
                        "--method", "prefix", "--virtual-tokens", "4", "--max-steps", "2", "--batch-size", "4",
                        "--eval-every", "0", "--no-eval-untuned", "--out", str(out)],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = json.loads((out / "run_config.json").read_text())
    layers = AutoModelForCausalLM.from_pretrained(llama_dir).config.num_hidden_layers
    assert cfg["gqa_attention_modules"] == layers and cfg["forward_path_taken"] == "kv"
    assert (out / "prompt.safetensors").is_file() or any(out.glob("*.safetensors"))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_trains_the_same_with_heads_kept_once(family, tok_dir):
    """Each family a prefix trains on: where its attention takes the route (SDPA with grouped-query
    heads), the loss and gradient equal its own attention's; the others are left alone."""
    model, prefix, enc = setup(family, tok_dir)
    use_gqa_attention(model, on=False)
    ref_loss, ref_grad, ref_kept = step(model, prefix, enc)
    n = use_gqa_attention(model)
    loss, grad, kept = step(model, prefix, enc)
    assert torch.allclose(loss, ref_loss, rtol=1e-6, atol=0)
    assert (grad - ref_grad).abs().max() <= 1e-5 * ref_grad.abs().max()
    grouped = model.config.num_key_value_heads < model.config.num_attention_heads if hasattr(
        model.config, "num_key_value_heads") else False
    if n:
        assert grouped and kept < ref_kept  # the copies are gone
    elif model.config._attn_implementation == "sdpa":
        assert not grouped, f"{family}: grouped-query SDPA attention left with its copies"
