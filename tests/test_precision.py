"""Mixed precision (`--dtype bfloat16|float16`): the frozen base in half precision, the soft prompt,
its gradient and its optimiser state in float32. Losses and prompt gradients against the float32
base within stated tolerances, gradients reaching only the prompt, and float16 training through
loss scaling."""
import json
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

from softprompt.base.models import cpu_has_native_half, cpu_trains_bf16, load_model, resolve_dtype
from softprompt.core.config import DataConfig, ModelConfig
from softprompt.core.utils import SoftpromptWarning
from softprompt.data.batching import collate
from softprompt.data.formatting import Formatter
from softprompt.forward.hidden import batch_loss
from softprompt.prompts.prompt import SoftPrompt
from softprompt.training.train import loss_step, batches, setup
from test_train import _cfgs

TEXTS = ["Country: France\nFacts: capital=Paris", "Review: a dull film", "Act as a teacher.\nPrompt: explain"]
# Against the float32 base, relative: the loss and the prompt gradient's norm. Measured on the tiny
# Llama and BLOOM: loss 7e-6 and 9e-5 (bf16), 2e-6 and 5e-6 (fp16); gradient 6e-3 and 1.2e-2 (bf16),
# 7e-4 and 2e-3 (fp16); after three Adam steps the update 7.5e-3 (bf16) and 9e-4 (fp16) apart.
TOL = {"bfloat16": (1e-3, 5e-2), "float16": (1e-4, 1e-2)}


def _loss_grad(model, b):
    torch.manual_seed(3)
    p = SoftPrompt(torch.randn(5, model.config.hidden_size) * 0.05)
    s, n = batch_loss(model, p(), b)
    (s / n).backward()
    return float((s / n).detach()), p.embeds.grad


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_base_matches_float32(dtype, model_dir):
    full, tok = load_model(ModelConfig(model=str(model_dir), device="cpu"))
    half, _ = load_model(ModelConfig(model=str(model_dir), device="cpu", dtype=dtype))
    assert full.dtype == torch.float32 and half.dtype == getattr(torch, dtype)  # auto is float32 on a CPU
    fmt = Formatter(DataConfig(text_col="t", max_length=64), tok)
    b = collate([fmt.encode({"t": t}) for t in TEXTS], tok.pad_token_id)
    ref_loss, ref = _loss_grad(full, b)
    loss, grad = _loss_grad(half, b)
    assert grad.dtype == torch.float32 and ref.abs().sum() > 0
    assert abs(loss - ref_loss) / ref_loss < TOL[dtype][0]
    assert float((grad - ref).norm() / ref.norm()) < TOL[dtype][1]
    assert all(q.grad is None and not q.requires_grad for q in half.parameters())


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_training_keeps_the_prompt_float32(dtype, llama_dir, countries_csv, tmp_path):
    m, d, p, t = _cfgs(llama_dir, countries_csv, tmp_path / dtype, max_steps=3, eval_every=0, save_every=0,
                       keep_best=False, eval_untuned=False)
    m.dtype = dtype
    run = setup(m, d, p, t)
    assert run.scaler.is_enabled() == (dtype == "float16")  # loss scaling where float16 gradients can underflow
    init = run.method.prompt.embeds.detach().clone()
    stream = batches(run)
    for _ in range(3):
        loss, _ = loss_step(run, next(stream))
    assert run.model.dtype == getattr(torch, dtype) and run.method.prompt.embeds.dtype == torch.float32
    state = run.opt.state[run.method.prompt.embeds]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
    assert json.loads((tmp_path / dtype / "run_config.json").read_text())["dtype"] == dtype

    ref = setup(*_cfgs(llama_dir, countries_csv, tmp_path / "fp32", max_steps=3, eval_every=0, save_every=0,
                       keep_best=False, eval_untuned=False))
    stream = batches(ref)
    for _ in range(3):
        ref_loss, _ = loss_step(ref, next(stream))
    # Three Adam steps from the same start move the prompt alike.
    step, ref_step = run.method.prompt.embeds.detach() - init, ref.method.prompt.embeds.detach() - init
    assert loss == pytest.approx(ref_loss, rel=TOL[dtype][0])
    assert ref_step.abs().max() > 1e-2 and float((step - ref_step).norm() / ref_step.norm()) < 0.05


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_half_precision_support_is_read_from_the_cpu_flags(dtype):
    name = {torch.bfloat16: "avx512_bf16", torch.float16: "avx512_fp16"}[dtype]
    avx2 = "processor\t: 0\nflags\t\t: fpu sse sse2 avx avx2 fma f16c\n"
    assert not cpu_has_native_half(dtype, avx2)
    assert cpu_has_native_half(dtype, avx2.replace("f16c", f"f16c {name}"))
    assert cpu_has_native_half(dtype, "processor\t: 0\n")  # no flags to read: no warning


def test_half_precision_on_a_cpu_without_it_warns_and_float32_does_not():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        resolve_dtype("float32", torch.device("cpu"))
        assert seen == []
        resolve_dtype("bfloat16", torch.device("cpu"))
    said = [str(w.message) for w in seen if issubclass(w.category, SoftpromptWarning)]
    assert (len(said) == 1 and "tens of times slower" in said[0]) != cpu_has_native_half(torch.bfloat16), said


def test_run_config_records_the_dtype_and_why(llama_dir, countries_csv, tmp_path):
    def run_config(name: str, method: str, init: str = "auto") -> dict:
        m, d, p, t = _cfgs(llama_dir, countries_csv, tmp_path / name, max_steps=2, eval_every=0, save_every=0,
                           keep_best=False, eval_untuned=False)
        m.dtype, t.method, p.init = "auto", method, init
        setup(m, d, p, t)
        return json.loads((tmp_path / name / "run_config.json").read_text())

    for method, init in (("prompt", "auto"), ("prefix", "text")):
        rc = run_config(method, method, init)
        if cpu_trains_bf16():  # this CPU has native bf16 matmuls: auto trains a soft prompt and a prefix in bf16
            assert rc["dtype"] == "bfloat16"
            assert rc["dtype_reason"].startswith("auto: bfloat16 on a CPU with native bf16")
            assert "cpu_bf16_prefix_kv_amd_epyc.json" in rc["dtype_reason"]
        else:
            assert rc["dtype"] == "float32"
            assert rc["dtype_reason"].startswith("auto: float32 on a CPU without native bf16")
    rc = run_config("ptuning", "ptuning")
    assert rc["dtype"] == "float32"  # not measured in bf16
    if cpu_trains_bf16():
        assert rc["dtype_reason"] == ("auto: float32 on a CPU for --method ptuning: bf16 is not measured for it "
                                      "(bench/results/cpu_bf16_labels_amd_epyc.json); --dtype bfloat16 asks for it")
    m, d, p, t = _cfgs(llama_dir, countries_csv, tmp_path / "asked", max_steps=2, eval_every=0, save_every=0,
                       keep_best=False, eval_untuned=False)
    m.dtype = "float32"
    setup(m, d, p, t)
    rc = json.loads((tmp_path / "asked" / "run_config.json").read_text())
    assert rc["dtype"] == "float32" and rc["dtype_reason"] == "float32: asked for with --dtype"


def test_auto_trains_in_bf16_only_on_a_cpu_with_native_bf16():
    avx2 = "processor\t: 0\nflags\t\t: fpu sse sse2 avx avx2 fma f16c\n"
    assert not cpu_trains_bf16(avx2) and not cpu_trains_bf16("processor\t: 0\n")  # unreadable: float32
    assert cpu_trains_bf16(avx2.replace("f16c", "f16c avx512_bf16"))
    assert cpu_trains_bf16(avx2.replace("f16c", "f16c amx_bf16"))
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32  # eval, generation, serving: float32 everywhere
    assert resolve_dtype("auto", cpu, cpu_bf16=True) == (torch.bfloat16 if cpu_trains_bf16() else torch.float32)


def test_dtype_reason_names_a_handed_in_models_own_dtype(llama_dir):
    from softprompt.base.models import dtype_reason

    model, _ = load_model(ModelConfig(model=str(llama_dir), device="cpu", dtype="float16"))
    assert dtype_reason("auto", model) == "float16: the model's own"
    assert dtype_reason("float16", model) == "float16: asked for with --dtype"


def test_half_attention_runs_in_float32_only_where_a_backward_follows():
    from softprompt.base.half_attention import sdpa

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 9, 16, dtype=torch.bfloat16) for _ in range(3))
    plain = torch.nn.functional.scaled_dot_product_attention
    # no backward to come: the half-precision kernel itself, bit for bit
    assert torch.equal(sdpa(q, k, v, is_causal=True), plain(q, k, v, is_causal=True))
    qg = q.clone().requires_grad_()
    out = sdpa(qg, k, v, is_causal=True)
    ref = plain(q.float(), k.float(), v.float(), is_causal=True)
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref.to(torch.bfloat16))
    assert not torch.equal(out, plain(q, k, v, is_causal=True))  # the two kernels differ: the check can fail
    out.float().sum().backward()
    qr = q.float().requires_grad_()
    plain(qr, k.float(), v.float(), is_causal=True).to(torch.bfloat16).float().sum().backward()
    assert qg.grad.dtype == torch.bfloat16 and torch.equal(qg.grad, qr.grad.to(torch.bfloat16))
    # rows of frozen embeddings attending a prompt's keys and values: the backward reaches k and v only
    kg = k.clone().requires_grad_()
    assert torch.equal(sdpa(q, kg, v, is_causal=True), ref.to(torch.bfloat16))
    # a prefix being trained comes in fp32: attended in fp32 past MAX_KEYS too, where bf16 keys keep bf16's kernel
    from softprompt.base.half_attention import MAX_KEYS, upcasts

    long_k, long_v = (torch.randn(2, 4, MAX_KEYS + 8, 16, requires_grad=True) for _ in range(2))
    assert upcasts(q, long_k, long_v) and not upcasts(q, long_k.bfloat16(), long_v.bfloat16())
    out = sdpa(q, long_k, long_v)
    assert out.dtype == torch.bfloat16 and torch.equal(out, plain(q.float(), long_k, long_v).to(torch.bfloat16))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_half_precision_cpu_base_trains_with_float32_attention(dtype, llama_dir, countries_csv, tmp_path,
                                                                  monkeypatch):
    import torch.nn.functional as F

    loaded, tok = load_model(ModelConfig(model=str(llama_dir), device="cpu", dtype=dtype))
    assert loaded.config._attn_implementation == "sdpa"  # for eval or serving: the model's own attention
    base = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=getattr(torch, dtype))  # a user's own model
    m, d, p, t = _cfgs(llama_dir, countries_csv, tmp_path / "run", max_steps=2, eval_every=0, save_every=0,
                       keep_best=False, eval_untuned=False)
    m.dtype, t.method, p.init = dtype, "prefix", "text"
    run = setup(m, d, p, t, model=base, tok=tok)  # as softprompt.train(model=...) hands it in
    assert "softprompt_fp32_sdpa" in base.config._attn_implementation
    seen, keys = [], []
    kernel = F.scaled_dot_product_attention

    def spy(q, k, *a, **kw):
        seen.append(q.dtype)
        keys.append(k)
        return kernel(q, k, *a, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    kv = run.params[0]  # the prefix's parameter [L, 2, kv_heads, P, d] (kv / scale), fp32; moved off the half
    with torch.no_grad():  # grid the text init left it on
        kv.add_(1e-3 * torch.randn_like(kv))
    first = run.method.prompt.key_values()[0, 0, 0].detach().clone()  # layer 0's keys, key/value head 0: [P, d]
    assert not torch.equal(first.to(getattr(torch, dtype)).float(), first)  # rounding would change them
    # Every attention call of a training step in float32 (the case where only keys and values carry
    # a gradient is checked on the kernel itself, in the test above), the prefix's keys unrounded.
    loss_step(run, next(batches(run)))
    layers = base.config.num_hidden_layers
    assert len(seen) >= layers and set(seen) == {torch.float32}, seen
    assert torch.equal(keys[0][0, 0, :kv.shape[3]], first)
    seen.clear()
    fmt = Formatter(DataConfig(text_col="t", max_length=64), tok)
    b = collate([fmt.encode({"t": t}) for t in TEXTS], tok.pad_token_id)
    with torch.no_grad():  # evaluation: the model's own half-precision attention
        base(input_ids=b.input_ids, attention_mask=b.attention_mask)
    assert len(seen) == layers and set(seen) == {getattr(torch, dtype)}, seen

    from softprompt import get_softprompt_model

    base = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=getattr(torch, dtype))  # a user's own model
    assert base.config._attn_implementation == "sdpa"
    get_softprompt_model(base)
    # fp32 attention (half_attention), inside the route that keeps grouped key/value heads once (gqa_attention)
    assert base.config._attn_implementation == "softprompt_gqa_softprompt_fp32_sdpa"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_label_word_logits_of_a_half_precision_base_are_computed_in_float32(dtype, llama_dir):
    from softprompt.forward.hidden import logits

    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=getattr(torch, dtype))
    w = model.get_output_embeddings().weight  # [V, H]
    torch.manual_seed(0)
    h = (torch.randn(64, w.shape[1]) * 8).to(w.dtype).requires_grad_()  # states of the size a trained base gives
    rows = torch.tensor([5, 17, 40])
    z = logits(model, h, rows)
    ref = h.detach().float() @ w[rows].float().T
    assert z.dtype == torch.float32 and torch.equal(z, ref)
    # the half-precision product rounds them: the check can fail
    assert not torch.equal(ref, (h.detach() @ w[rows].T).float())
    z.sum().backward()  # the gradient reaches the states in their own dtype
    assert h.grad.dtype == w.dtype and torch.allclose(h.grad.float(), w[rows].float().sum(0).expand_as(h), rtol=1e-2)
    # the whole vocabulary stays in the base's dtype (a [V, H] float32 copy per call is what it avoids)
    assert torch.equal(logits(model, h.detach()), (h.detach() @ w.T).float())


def test_a_handed_in_model_s_run_does_not_say_its_dtype_was_asked_for(llama_dir, countries_csv, tmp_path):
    """Hunt 10: softprompt.train(model=<loaded>) records the model's dtype (so that --config replays it),
    and run_config.json said "float32: asked for with --dtype", which nobody passed."""
    model, tok = load_model(ModelConfig(model=str(llama_dir), device="cpu", dtype="float32"))
    m, d, p, t = _cfgs(llama_dir, countries_csv, tmp_path / "run", max_steps=2, eval_every=0, save_every=0,
                       keep_best=False, eval_untuned=False)
    m.dtype = "float32"  # what the API records for a loaded float32 model
    setup(m, d, p, t, model=model, tok=tok)
    rc = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert rc["dtype_reason"] == "float32: the model's own, as it was handed in", rc["dtype_reason"]
