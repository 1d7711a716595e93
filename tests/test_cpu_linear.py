"""The frozen base's oneDNN linear kernel (base/cpu_linear.py): the same numbers as torch's own kernel
in float32, in every place that uses it (the layers, the frozen-head loss, a training step, the
Trainer-facing model), only where a graph is recorded, and chosen and recorded as documented."""
import json
import os

import pytest
import torch
from torch import nn

from softprompt.base.cpu_linear import (OneDNNLinear, head_linear, onednn_linear, resolve_kernel,
                                        use_linear_kernel)
from softprompt.core.utils import SoftpromptError

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")

AMD = "vendor_id\t: AuthenticAMD\nflags\t\t: fpu avx2 avx512f\n"
INTEL = "vendor_id\t: GenuineIntel\nflags\t\t: fpu avx2 avx512f amx_bf16\n"


def test_onednn_linear_and_its_input_gradient_equal_torchs():
    torch.manual_seed(0)
    lin = nn.Linear(96, 160).requires_grad_(False)
    x = torch.randn(3, 37, 96, requires_grad=True)
    ref = lin(x)
    (gref,) = torch.autograd.grad((ref * ref).sum(), x)
    use_linear_kernel(lin, "onednn")
    assert isinstance(lin, OneDNNLinear) and isinstance(lin, nn.Linear)
    out = lin(x)
    assert out.grad_fn is not None and "FrozenLinearFn" in type(out.grad_fn).__name__
    (g,) = torch.autograd.grad((out * out).sum(), x)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.allclose(g, gref, rtol=1e-5, atol=1e-4)


def test_inference_and_trainable_weights_keep_torchs_kernel():
    """No graph, no oneDNN: evaluation and serving compute exactly what they computed before; a
    trainable weight (full fine-tuning) needs its gradient, which FrozenLinearFn does not give."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 64).requires_grad_(False)
    x = torch.randn(5, 64)
    with torch.no_grad():
        ref = lin(x)
    use_linear_kernel(lin, "onednn")
    with torch.no_grad():
        assert torch.equal(lin(x), ref)
    lin.requires_grad_(True)
    out = lin(x.requires_grad_(True))
    out.sum().backward()
    assert lin.weight.grad is not None and "FrozenLinearFn" not in type(out.grad_fn).__name__
    use_linear_kernel(lin, "default")
    assert type(lin) is nn.Linear


def test_only_plain_linear_layers_change_and_the_weights_stay(tiny):
    model, _ = tiny

    class Quantized(nn.Linear):  # stands for bitsandbytes' layers: not nn.Linear itself
        pass
    model.extra = Quantized(4, 4)
    keys = list(model.state_dict())
    n_linear = sum(type(m) is nn.Linear for m in model.modules())
    assert use_linear_kernel(model, "onednn") == n_linear > 0
    assert type(model.extra) is Quantized and list(model.state_dict()) == keys
    assert use_linear_kernel(model, "onednn") == 0  # already
    assert use_linear_kernel(model, "default") == n_linear


def test_auto_is_onednn_on_amd_with_avx512_and_default_elsewhere(llama_dir):
    from softprompt.base.models import load_model
    from softprompt.core.config import ModelConfig

    model, _ = load_model(ModelConfig(model=str(llama_dir), dtype="float32", device="cpu"))
    assert resolve_kernel("auto", model, cpuinfo=AMD)[0] == "onednn"
    kernel, why = resolve_kernel("auto", model, cpuinfo=INTEL)
    assert kernel == "default" and "other than an AMD one with AVX-512" in why
    assert resolve_kernel("auto", model, cpuinfo=AMD.replace(" avx512f", ""))[0] == "default"  # not measured
    assert resolve_kernel("default", model, cpuinfo=AMD)[0] == "default"
    assert resolve_kernel("onednn", model, cpuinfo=INTEL)[0] == "onednn"
    kernel, why = resolve_kernel("auto", model, "the base is sharded (--shard fsdp)", cpuinfo=AMD)
    assert kernel == "default" and "sharded" in why
    with pytest.raises(SoftpromptError, match="--linear-kernel onednn: the base is sharded"):
        resolve_kernel("onednn", model, "the base is sharded (--shard fsdp)")
    model.to(torch.bfloat16)
    kernel, why = resolve_kernel("auto", model, cpuinfo=AMD)
    assert kernel == "default" and "bfloat16, not float32" in why
    with pytest.raises(SoftpromptError, match="--linear-kernel onednn: the base is bfloat16"):
        resolve_kernel("onednn", model)


def test_frozen_head_loss_through_onednn_equals_torchs(llama_dir):
    """The head's logits and their gradient are computed inside the frozen-head loss, not by the
    module's forward: head_linear hands it the head's kernel."""
    from softprompt.base.models import load_model
    from softprompt.core.config import ModelConfig
    from softprompt.forward.hidden import token_losses

    model, _ = load_model(ModelConfig(model=str(llama_dir), dtype="float32", device="cpu"))
    torch.manual_seed(0)
    H = model.config.hidden_size
    h = torch.randn(50, H, requires_grad=True)
    y = torch.randint(0, model.config.vocab_size, (50,))
    results = []
    for kernel in ("default", "onednn"):
        use_linear_kernel(model, kernel)
        head = model.get_output_embeddings()
        assert (head_linear(head) is onednn_linear) == (kernel == "onednn")
        loss = token_losses(model, h, y, chunk_elements=7 * model.config.vocab_size).sum()  # several chunks
        results.append((loss.detach(), torch.autograd.grad(loss, h)[0]))
    assert torch.allclose(results[0][0], results[1][0], rtol=1e-6)
    assert torch.allclose(results[0][1], results[1][1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method,checkpointed", [("prompt", False), ("prefix", False), ("prompt", True)])
def test_a_training_step_gives_the_same_loss_and_gradient(llama_dir, method, checkpointed):
    """Packed (prompt), kv (prefix), and checkpointed layers recomputing their forward in backward."""
    from softprompt.base.families import kv_geometry
    from softprompt.base.models import load_model, set_checkpointing
    from softprompt.core.config import ModelConfig
    from softprompt.data.batching import Example, collate, pad_id
    from softprompt.forward.hidden import batch_loss
    from softprompt.forward.paths import choose_path
    from softprompt.prompts.prefix import PrefixPrompt
    from softprompt.training.prefix_method import PrefixTuning

    model, tok = load_model(ModelConfig(model=str(llama_dir), dtype="float32", device="cpu"))
    torch.manual_seed(0)
    rows = [list(range(5, 5 + n)) for n in (9, 4, 13)]
    batch = collate([Example(ids=r, loss_start=2) for r in rows], pad_id(tok))
    if method == "prompt":
        prompt = nn.Parameter(torch.randn(4, model.config.hidden_size) * 0.02)
        params, fwd = [prompt], prompt
    else:
        layers, heads, dim = kv_geometry(model)
        prefix = PrefixTuning(model, None, PrefixPrompt(torch.randn(layers, 2, heads, 4, dim) * 0.1))
        params, fwd = list(prefix.parameters()), prefix.embeds()
    path = "auto"
    if checkpointed:
        set_checkpointing(model, True)
        path = choose_path(model, checkpointing=True).path
    out = []
    for kernel in ("default", "onednn"):
        use_linear_kernel(model, kernel)
        total, n = batch_loss(model, fwd, batch, path)
        out.append((total.detach() / n, torch.autograd.grad(total / n, params)))
    assert torch.allclose(out[0][0], out[1][0], rtol=1e-6)
    for a, b in zip(out[0][1], out[1][1]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_train_records_the_kernel_and_both_kernels_train_alike(tmp_path, llama_dir):
    """The journey: `softprompt train --linear-kernel onednn|default` on the same data, the kernel and
    its reason in run_config.json, and the logged losses equal to float32's rounding."""
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    csv = tmp_path / "d.csv"
    csv.write_text("text\n" + "\n".join(f"row {i} says {'yes' if i % 2 else 'no'} to the question" for i in range(24)))
    losses = {}
    for kernel in ("onednn", "default"):
        out = tmp_path / kernel
        args = ["train", "--model", str(llama_dir), "--data", str(csv), "--text-col", "text", "--dtype", "float32",
                "--device", "cpu", "--max-steps", "4", "--batch-size", "4", "--log-every", "1", "--eval-every", "0",
                "--no-eval-untuned", "--linear-kernel", kernel, "--out", str(out), "--method", "prompt",
                "--virtual-tokens", "4"]
        r = subprocess.run([str(Path(sys.executable).parent / "softprompt"), *args], env=env, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        cfg = json.loads((out / "run_config.json").read_text())
        assert cfg["TrainConfig"]["linear_kernel"] == kernel and cfg["linear_kernel_taken"] == kernel
        assert cfg["linear_kernel_reason"].startswith(f"{kernel}: asked for")
        recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
        losses[kernel] = [r["loss"] for r in recs if r["split"] == "train"]
    assert len(losses["onednn"]) == 4
    assert losses["onednn"] == pytest.approx(losses["default"], rel=1e-5)


def test_the_trainer_facing_model_takes_the_kernel(llama_dir):
    from transformers import AutoModelForCausalLM

    from softprompt import get_softprompt_model
    from softprompt.api import ConfigError

    base = AutoModelForCausalLM.from_pretrained(llama_dir)
    sp = get_softprompt_model(base, virtual_tokens=4)
    assert sp.linear_kernel in ("onednn", "default") and sp.linear_kernel_reason.startswith("auto")
    assert isinstance(base.get_output_embeddings(), OneDNNLinear) == (sp.linear_kernel == "onednn")
    with pytest.raises(ConfigError, match="unknown linear_kernel 'fast'"):
        type(sp)(base, None, linear_kernel="fast")


def test_onednn_bounds_its_primitive_caches_unless_the_user_did(monkeypatch):
    """A packed step's row count differs at every step, and oneDNN compiles and keeps a primitive per
    shape: unbounded, the classic script's process grew 180 MB (bench/classic_scripts.py)."""
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "5")
    use_linear_kernel(nn.Linear(2, 2), "default")
    assert "ONEDNN_PRIMITIVE_CACHE_CAPACITY" not in os.environ
    use_linear_kernel(nn.Linear(2, 2), "onednn")
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "32" and os.environ["LRU_CACHE_CAPACITY"] == "5"
