"""A quantized frozen base (`--quantize 8bit|4bit`, bitsandbytes): every forward path runs on it with
the same loss and prompt gradient, the loss stays near the full-precision one, gradients reach only
the prompt, and a prompt moves between the quantized and the full-precision base (train, eval and
generate through the CLI)."""
import json

import pytest
import torch

from softprompt.base.models import load_model
from softprompt.base.quantize import available, quantized_bits, weight_bytes
from softprompt.core.config import DataConfig, ModelConfig
from softprompt.core.utils import SoftpromptError
from softprompt.data.batching import collate
from softprompt.data.formatting import Formatter
from softprompt.forward.hidden import batch_loss
from softprompt.prompts.prompt import SoftPrompt, load_prompt

needs_bnb = pytest.mark.skipif(not available(), reason="bitsandbytes is not installed (pip install 'softprompt[quant]')")
TEXTS = ["Country: France\nFacts: capital=Paris", "Review: a dull film", "Act as a teacher."]
# Against the float32 base, relative: the loss (measured 1.0e-5 for 8-bit, 2.9e-5 for 4-bit on the
# tiny Llama, whose random logits are nearly uniform) and the prompt gradient's norm (6.5e-3 for
# 8-bit; 0.11 for 4-bit on an AVX2 CPU, 0.27 on an AVX-512 one: NF4's rounding error on a tiny random
# model, not the computation, which the dequantized-weights reference below pins exactly).
LOSS_TOL = {"8bit": 1e-3, "4bit": 1e-3}
GRAD_TOL = {"8bit": 0.02, "4bit": 0.4}


def _batch(tok):
    fmt = Formatter(DataConfig(text_col="t", max_length=64), tok)
    return collate([fmt.encode({"t": t}) for t in TEXTS], tok.pad_token_id)


def _loss_and_grad(model, batch, path):
    torch.manual_seed(3)
    p = SoftPrompt(torch.randn(5, model.config.hidden_size) * 0.05)
    s, n = batch_loss(model, p(), batch, path=path)
    (s / n).backward()
    return float((s / n).detach()), p.embeds.grad


@needs_bnb
@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_every_path_runs_on_the_quantized_base(bits, llama_dir):
    import bitsandbytes as bnb

    full, tok = load_model(ModelConfig(model=str(llama_dir), device="cpu"))
    model, _ = load_model(ModelConfig(model=str(llama_dir), device="cpu", quantize=bits))
    layer = {"8bit": bnb.nn.Linear8bitLt, "4bit": bnb.nn.Linear4bit}[bits]
    assert isinstance(model.model.layers[0].mlp.up_proj, layer) and quantized_bits(model) == int(bits[0])
    assert quantized_bits(full) is None and weight_bytes(model) < weight_bytes(full)
    # The embeddings (the prompt's init and the head, tied) stay as they were.
    assert torch.equal(model.get_input_embeddings().weight, full.get_input_embeddings().weight)
    b = _batch(tok)
    ref_loss, ref_grad = _loss_and_grad(full, b, "concat")
    got = {path: _loss_and_grad(model, b, path) for path in ("concat", "kv", "packed")}
    for path in ("kv", "packed"):  # the same quantized weights: the paths agree as closely as in float32
        assert got[path][0] == pytest.approx(got["concat"][0], rel=1e-6), path
        assert torch.allclose(got[path][1], got["concat"][1], atol=1e-7, rtol=1e-4), path
    loss, grad = got["concat"]
    assert abs(loss - ref_loss) / ref_loss < LOSS_TOL[bits]
    assert grad.abs().sum() > 0 and not torch.equal(grad, ref_grad)  # quantized, and still a gradient
    assert float((grad - ref_grad).norm() / ref_grad.norm()) < GRAD_TOL[bits]
    assert all(q.grad is None and not q.requires_grad for q in model.parameters())
    if bits == "4bit":  # the float32 model holding the NF4 weights dequantized computes the same numbers
        deq_loss, deq_grad = _loss_and_grad(_dequantized_copy(full, model), b, "concat")
        assert loss == pytest.approx(deq_loss, rel=1e-6)
        assert torch.allclose(grad, deq_grad, atol=1e-7, rtol=1e-4)


def _dequantized_copy(full, quantized):
    import copy

    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    ref, layers = copy.deepcopy(full), dict(quantized.named_modules())
    for name, m in ref.named_modules():
        q = layers.get(name)
        if isinstance(q, bnb.nn.Linear4bit):
            with torch.no_grad():
                m.weight.copy_(dequantize_4bit(q.weight.data, q.weight.quant_state).to(m.weight.dtype))
    return ref


@needs_bnb
def test_4bit_layers_the_avx512_kernel_cannot_pack_take_the_generic_path(llama_dir):
    """bitsandbytes' AVX-512 bf16 CPU kernel packs NF4 weights in 32-row x 64-column blocks and fails
    (shape '[32, 0]' is invalid) on smaller layers in inference mode; load_model routes those layers to
    the generic CPU path, so an untuned forward without gradients runs on every CPU."""
    import bitsandbytes as bnb

    model, tok = load_model(ModelConfig(model=str(llama_dir), device="cpu", quantize="4bit"))
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    misfits = [m for m in layers if m.out_features % 32 or m.in_features % 64]
    assert misfits and not any(m.support_avx512bf16_for_cpu for m in misfits)
    with torch.no_grad():  # the inference-mode forward that repacks weights on AVX-512 CPUs
        out = model(**tok(["Review: a dull film"], return_tensors="pt")).logits
    assert torch.isfinite(out).all()


@needs_bnb
def test_prompt_moves_between_quantized_and_full_precision(llama_dir, countries_csv, tmp_path, capsys):
    from softprompt.cli import main

    data = ["--data", str(countries_csv), "--template", "Country: {country}\\nFacts:", "--target", " capital={capital}"]
    run = tmp_path / "q4"
    assert main(["train", "--model", str(llama_dir), *data, "--device", "cpu", "--quantize", "4bit", "--out", str(run),
                 "--virtual-tokens", "4", "--init", "vocab", "--max-steps", "3", "--batch-size", "4",
                 "--eval-every", "0", "--save-every", "0", "--no-eval-untuned"]) == 0
    cfg = json.loads((run / "run_config.json").read_text())
    assert cfg["ModelConfig"]["quantize"] == "4bit" and cfg["forward_path_taken"] == "packed"
    assert load_prompt(run).meta["config"]["ModelConfig"]["quantize"] == "4bit"
    capsys.readouterr()
    scores = {}
    for bits in ("none", "8bit", "4bit"):  # the 4-bit prompt on the full-precision base and back
        assert main(["eval", "--model", str(llama_dir), *data, "--device", "cpu", "--quantize", bits,
                     "--prompt", str(run), "--json"]) == 0
        scores[bits] = json.loads(capsys.readouterr().out)["loss"]
    assert scores["4bit"] == pytest.approx(scores["none"], rel=LOSS_TOL["4bit"])
    assert scores["8bit"] == pytest.approx(scores["none"], rel=LOSS_TOL["8bit"])
    assert main(["generate", "--model", str(llama_dir), "--device", "cpu", "--quantize", "8bit", "--prompt", str(run),
                 "--compare", "--max-new-tokens", "4", "--json", "Country: France"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out[0]) == {"input", "baseline", "tuned"}


def test_missing_backend_is_one_clear_error(llama_dir, monkeypatch):
    import softprompt.base.quantize as q

    monkeypatch.setattr(q, "available", lambda: False)
    with pytest.raises(SoftpromptError, match=r"--quantize 8bit needs the bitsandbytes package: pip install"):
        load_model(ModelConfig(model=str(llama_dir), device="cpu", quantize="8bit"))
    with pytest.raises(SoftpromptError, match="unknown --quantize"):
        ModelConfig(quantize="3bit")


@needs_bnb
def test_a_loaded_base_quantised_otherwise_than_the_flag_warns_that_its_record_cannot_replay(llama_dir, countries_csv,
                                                                                             tmp_path):
    """softprompt.train on a base the caller loaded in 4 bits records quantize 4bit; `train --config` then
    loads NF4 with double quantization. A base loaded so trains without a word; one loaded as FP4
    (BitsAndBytesConfig's default) is said to replay on another base."""
    import warnings

    import softprompt
    from softprompt.base.quantize import quantization_config
    from softprompt.core.utils import SoftpromptWarning
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    tok = AutoTokenizer.from_pretrained(llama_dir)
    args = dict(tokenizer=tok, data=str(countries_csv), template="Country: {country}\nEurope:", labels="no,yes",
                label_col="europe", method="prompt", loss="lm", virtual_tokens=3, max_steps=1, warmup_steps=0,
                batch_size=4, eval_every=0, eval_untuned=False, eval_fraction=0.0, save_every=0)
    loads = {"flag": quantization_config("4bit", torch.float32), "fp4": BitsAndBytesConfig(load_in_4bit=True)}
    for name, cfg in loads.items():
        base = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=cfg)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            softprompt.train(model=base, out=str(tmp_path / name), **args)
        said = [str(w.message) for w in seen if issubclass(w.category, SoftpromptWarning)]
        assert json.loads((tmp_path / name / "run_config.json").read_text())["ModelConfig"]["quantize"] == "4bit"
        if name == "flag":
            assert said == []
        else:
            assert len(said) == 1 and said[0].startswith("model= is quantised otherwise than quantize='4bit' loads a "
                                                         "model (bnb_4bit_quant_type fp4, not nf4; "
                                                         "bnb_4bit_use_double_quant False, not True)"), said
