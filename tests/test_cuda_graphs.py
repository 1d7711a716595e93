"""The CUDA-graph training step's computation, checked where it can be on a CPU: the bucketed dense
layout gives the packed path's loss and prompt gradient exactly, and it runs on the meta device, so
it has no data-dependent host operations (the things that break a graph capture). The capture
itself runs on a GPU only (bench/gpu_check.sh checks graph replay against the eager step)."""
import pytest
import torch

from softprompt.core.config import DataConfig
from softprompt.data.batching import collate
from softprompt.data.formatting import Formatter
from softprompt.forward.cuda_graphs import DenseLayout, bucket, dense_loss
from softprompt.forward.hidden import batch_loss
from softprompt.prompts.prompt import SoftPrompt


def test_buckets_are_four_per_octave_and_cover_n():
    sizes = sorted({bucket(n) for n in range(1, 2049)})
    assert sizes[:9] == [64, 80, 96, 112, 128, 160, 192, 224, 256]
    assert all(bucket(n) >= n for n in range(1, 5000))
    assert all(bucket(n) <= 1.25 * n for n in range(65, 5000))  # at most 25% filler


def _batches(tok):
    lm = Formatter(DataConfig(template="Country: {c}\\nFacts:", target=" capital={k}", max_length=64), tok)
    cls = Formatter(DataConfig(template="Review: {s}\\nSentiment:", labels="negative,positive", label_col="y"), tok)
    yield "lm", collate([lm.encode({"c": c, "k": k}) for c, k in
                         (("France", "Paris"), ("Peru", "Lima"), ("Chad", "N'Djamena"))], tok.pad_token_id), None
    rows = (("a dull film", "negative"), ("a great movie", "positive"), ("fine", "positive"))
    ids = torch.tensor([c[0] for c in cls.label_ids("Sentiment:")])
    yield "classes", collate([cls.encode({"s": s, "y": y}) for s, y in rows], tok.pad_token_id), ids


def test_dense_layout_loss_and_gradient_equal_the_packed_path(llama_dir):
    from softprompt.base.models import load_model

    model, tok = load_model(str(llama_dir))
    for name, b, class_ids in _batches(tok):
        torch.manual_seed(0)
        ref_p = SoftPrompt(torch.randn(5, model.config.hidden_size) * 0.05)
        s, n = batch_loss(model, ref_p(), b, "packed", class_ids)
        (s / n).backward()
        p = SoftPrompt(ref_p.embeds.detach())
        lay = DenseLayout.build(5, b.input_ids, b.attention_mask, b.targets, tok.pad_token_id)
        assert lay.shape[0] > 5 + int(b.attention_mask.sum()) - 3  # premise: fillers and trimmed tokens
        loss = dense_loss(model, p(), lay.ids, lay.pos, lay.doc, lay.sel, lay.tgt, lay.weight,
                          torch.tensor(1.0 / n), class_ids)
        loss.backward()
        assert abs(float(loss.detach()) - float(s / n)) < 1e-6 * float(s / n), name
        assert torch.allclose(p.embeds.grad, ref_p.embeds.grad, atol=1e-7, rtol=1e-4), name


@pytest.mark.parametrize("classes", [False, True])
def test_dense_step_runs_on_the_meta_device(llama_dir, classes):
    """No .item(), nonzero or boolean indexing on data: all of it would fail on meta tensors."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(llama_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg).requires_grad_(False)
    meta = torch.device("meta")
    N, M, P = 96, 8, 5
    prompt = torch.empty(P, cfg.hidden_size, device=meta, requires_grad=True)
    args = [torch.empty(N - P, dtype=torch.long, device=meta), torch.empty(N, dtype=torch.long, device=meta),
            torch.empty(N, dtype=torch.long, device=meta), torch.empty(M, dtype=torch.long, device=meta),
            torch.empty(M, dtype=torch.long, device=meta), torch.empty(M, device=meta), torch.empty((), device=meta)]
    class_ids = torch.empty(2, dtype=torch.long, device=meta) if classes else None
    loss = dense_loss(model, prompt, *args, class_ids=class_ids)
    (grad,) = torch.autograd.grad(loss, [prompt])
    assert grad.shape == prompt.shape and grad.device.type == "meta"


def test_the_training_path_and_why_are_chosen_and_recorded(tiny, countries_csv, tmp_path):
    """auto: graphed only on a CUDA device, else packed where the family packs, else kv; an
    impossible request is one clear error; the run records what it took and why."""
    import json

    from softprompt.core.config import ModelConfig, PromptConfig, TrainConfig
    from softprompt.forward.paths import choose_path as training_path
    from softprompt.training.train import train
    from softprompt.core.utils import SoftpromptError

    model, tok = tiny
    packs = model.config.model_type == "llama"
    path, why = training_path(model, "auto")
    assert path == ("packed" if packs else "kv")
    assert ("no CUDA device" in why) if packs else ("attention" in why)
    with pytest.raises(SoftpromptError, match="--forward-path graphed: no CUDA device"):
        training_path(model, "graphed")
    assert training_path(model, "concat") == ("concat", "as requested")
    data = DataConfig(data=str(countries_csv), template="Country: {country}\\nFacts:", target=" {capital}",
                      eval_fraction=0)
    s = train(ModelConfig(model=model.name_or_path, device="cpu"), data, PromptConfig(virtual_tokens=3),
              TrainConfig(out=str(tmp_path / "run"), method="prompt", max_steps=1, save_every=0), model=model,
              tok=tok, quiet=True)
    cfg = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert cfg["forward_path_taken"] == s["forward_path"] == path and cfg["forward_path_reason"] == why
