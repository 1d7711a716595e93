"""base/swiglu.py: a gated-SiLU MLP that keeps gate and up for backward and recomputes silu(gate):
the same output and gradient bit for bit, one wide activation fewer kept, and only where the
module reproduced its own output."""
import torch

from memory_helpers import saved_bytes
from softprompt.base.families import decoder_layers
from softprompt.base.models import load_model
from softprompt.base.swiglu import fuse_swiglu, swiglu_forward
from softprompt.core.config import ModelConfig


def mlps(model):
    return [layer.mlp for layer in decoder_layers(model)]


def test_same_output_same_gradient_and_one_activation_fewer(llama_dir):
    model, _ = load_model(ModelConfig(model=str(llama_dir), dtype="float32", device="cpu"))
    torch.manual_seed(0)
    emb = torch.randn(3, 11, model.config.hidden_size, requires_grad=True)
    mlp = mlps(model)[0]
    x = torch.randn(5, 7, model.config.hidden_size, requires_grad=True)
    before, _ = saved_bytes(lambda: mlp(x))
    with torch.no_grad():
        ref_logits = model(inputs_embeds=emb).logits
    ref = model(inputs_embeds=emb).logits.float().logsumexp(-1).mean()
    (ref_grad,) = torch.autograd.grad(ref, emb)

    assert fuse_swiglu(model) == model.config.num_hidden_layers
    assert fuse_swiglu(model) == 0  # once is enough
    assert fuse_swiglu(model, on=False) == model.config.num_hidden_layers and "forward" not in vars(mlp)
    assert fuse_swiglu(model) == model.config.num_hidden_layers  # the benches switch it per path
    with torch.no_grad():
        assert torch.equal(model(inputs_embeds=emb).logits, ref_logits)
    loss = model(inputs_embeds=emb).logits.float().logsumexp(-1).mean()
    (grad,) = torch.autograd.grad(loss, emb)
    assert torch.equal(loss, ref) and torch.equal(grad, ref_grad)  # torch's own SiLU gradient kernel
    # silu(gate) [5, 7, I] is no longer kept
    assert before - saved_bytes(lambda: mlp(x))[0] == 5 * 7 * model.config.intermediate_size * 4


def test_half_precision_gradient_is_torchs_too(llama_dir):
    model, _ = load_model(ModelConfig(model=str(llama_dir), dtype="bfloat16", device="cpu"))
    mlp = mlps(model)[0]
    torch.manual_seed(0)
    x = torch.randn(4, model.config.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    (ref,) = torch.autograd.grad(mlp(x).float().square().sum(), x)
    fuse_swiglu(model)
    (got,) = torch.autograd.grad(mlp(x).float().square().sum(), x)
    assert torch.equal(got, ref)


def test_other_mlps_keep_their_own_forward(bloom_dir, llama_dir):
    bloom, _ = load_model(ModelConfig(model=str(bloom_dir), dtype="float32", device="cpu"))
    assert fuse_swiglu(bloom) == 0  # GELU, no gate

    model, _ = load_model(ModelConfig(model=str(llama_dir), dtype="float32", device="cpu"))
    mlp = mlps(model)[0]

    class Doubled(type(mlp)):  # a family whose gated MLP computes something else
        def forward(self, x):
            return 2 * super().forward(x)
    mlp.__class__ = Doubled
    assert fuse_swiglu(model) == model.config.num_hidden_layers - 1
    assert "forward" not in vars(mlp)
    x = torch.randn(2, model.config.hidden_size)
    assert torch.equal(mlp(x), 2 * swiglu_forward(mlp, x))


def test_train_records_the_fused_mlps_and_grouped_query_modules(tmp_path, llama_dir):
    import json

    from softprompt.core.config import DataConfig, PromptConfig, TrainConfig
    from softprompt.training.train import train

    csv = tmp_path / "d.csv"
    csv.write_text("text\n" + "\n".join(f"row {i} of the text" for i in range(12)))
    out = tmp_path / "run"
    train(ModelConfig(model=str(llama_dir), dtype="float32", device="cpu"),
          DataConfig(data=str(csv), text_col="text"), PromptConfig(virtual_tokens=2),
          TrainConfig(out=str(out), max_steps=1, batch_size=4, eval_every=0, eval_untuned=False, method="prompt"))
    model, _ = load_model(ModelConfig(model=str(llama_dir)))
    cfg = json.loads((out / "run_config.json").read_text())
    assert cfg["swiglu_fused_mlps"] == model.config.num_hidden_layers
    assert cfg["gqa_attention_modules"] == model.config.num_hidden_layers  # base/gqa_attention.py
    assert not any("forward" in vars(m) for m in mlps(model))  # a fresh load is transformers' own
