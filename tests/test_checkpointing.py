"""Activation checkpointing of the frozen decoder (`--gradient-checkpointing`): the prompt's gradient
equals the unchecked one on tiny models of several families and forward paths, the model stays in
eval mode (no dropout) and is handed back unchecked, and a training run records the path it took."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.modeling_layers import GradientCheckpointingLayer

from families import tiny_config
from softprompt.base.models import set_checkpointing
from softprompt.core.config import DataConfig
from softprompt.data.batching import collate
from softprompt.data.formatting import Formatter
from softprompt.forward.hidden import batch_loss
from softprompt.prompts.prompt import SoftPrompt, load_prompt
from softprompt.training.train import train

TEXTS = ["Country: France\nFacts: capital=Paris", "Review: a dull film", "Act as a teacher.\nPrompt: explain"]
# One of each kind: packed (Llama, GPT-2), prompt-KV (BLOOM, Mistral's short window), dropout in the config (GPT-2).
CASES = [("llama", "packed"), ("llama", "concat"), ("gpt2", "packed"), ("bloom", "concat"), ("mistral-window3", "concat")]


def _grad(model, b, path):
    torch.manual_seed(3)
    p = SoftPrompt(torch.randn(5, model.config.hidden_size) * 0.5)
    s, n = batch_loss(model, p(), b, path=path)
    (s / n).backward()
    return float(s.detach()), p.embeds.grad


@pytest.mark.parametrize("name,path", CASES)
def test_checkpointed_gradient_equals_unchecked(name, path, tok_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(name, len(tok), tok.pad_token_id, tok.eos_token_id))
    model.requires_grad_(False).eval()
    fmt = Formatter(DataConfig(text_col="t", max_length=64), tok)
    b = collate([fmt.encode({"t": t}) for t in TEXTS], tok.pad_token_id)
    ref_loss, ref = _grad(model, b, path)
    # A module inside the first decoder layer runs once per forward, and again when backward recomputes it.
    layer = next(m for m in model.modules() if isinstance(m, GradientCheckpointingLayer))
    calls = []
    handle = next(layer.children()).register_forward_hook(lambda *a: calls.append(1))
    set_checkpointing(model, True)
    loss, got = _grad(model, b, path)
    set_checkpointing(model, False)
    after = len(calls)
    _grad(model, b, path)
    handle.remove()
    assert after == 2 and len(calls) == 3  # recomputed once, then not again once switched off
    assert not any(m.training for m in model.modules() if not isinstance(m, GradientCheckpointingLayer))
    assert ref.abs().sum() > 0
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert (got - ref).abs().max() <= 1e-6


def test_training_run_with_checkpointing(llama_dir, bloom_dir, countries_csv, tmp_path):
    from test_train import _cfgs

    for d, want in ((llama_dir, "packed"), (bloom_dir, "concat")):
        prompts = []
        for on in (False, True):
            out = tmp_path / f"{d.name}{on}"
            train(*_cfgs(d, countries_csv, out, max_steps=4, eval_every=0, save_every=0, keep_best=False,
                         gradient_checkpointing=on), quiet=True)
            prompts.append(load_prompt(out).embeds.detach())
        cfg = json.loads((out / "run_config.json").read_text())
        assert cfg["TrainConfig"]["gradient_checkpointing"] and cfg["forward_path_taken"] == want
        assert (prompts[0] - prompts[1]).abs().max() <= 1e-6
