"""Gradient accumulation (`--grad-accum N`): N micro-batches of B/N rows train the same prompt as one
batch of B, on every forward path and both losses, and `--batch-size` stays the global batch."""
import json

import pytest
from softprompt.base.models import load_model
from softprompt.core.config import PromptConfig, TrainConfig
from softprompt.core.utils import SoftpromptError
from softprompt.prompts.prompt import init_prompt, load_prompt
from softprompt.training.train import train
from test_train import _cfgs

STEPS = 5


@pytest.mark.parametrize("kind,path,loss,n", [("llama", "packed", "lm", 4), ("bloom", "kv", "lm", 8),
                                              ("llama", "kv", "classes", 4)])
def test_micro_batches_train_the_same_prompt(kind, path, loss, n, llama_dir, bloom_dir, countries_csv, tmp_path):
    d = llama_dir if kind == "llama" else bloom_dir
    extra = dict(forward_path=path, loss=loss)
    runs = {}
    for k in (1, n):  # n = 8: one row per micro-batch
        m, dc, p, t = _cfgs(d, countries_csv, tmp_path / f"r{k}", max_steps=STEPS, eval_every=0, save_every=0,
                            keep_best=False, eval_untuned=False, grad_accum=k, **extra)
        if loss == "classes":
            dc.template, dc.target, dc.labels, dc.label_col = "Country: {country}\\nEurope:", "", "capital,language", "europe"
        s = train(m, dc, p, t, quiet=True)
        out = tmp_path / f"r{k}"
        recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
        runs[k] = (load_prompt(out).embeds.detach(), [r for r in recs if r["split"] == "train"], s)
    ref, ref_log, ref_s = runs[1]
    prompt, log, s = runs[n]
    cfg = json.loads((tmp_path / f"r{n}" / "run_config.json").read_text())
    assert cfg["TrainConfig"]["grad_accum"] == n and cfg["forward_path_taken"] == path
    assert s["tokens"] == ref_s["tokens"] and s["steps"] == STEPS  # the same global batches
    assert [r["loss"] for r in log] == pytest.approx([r["loss"] for r in ref_log], rel=1e-6)
    assert (prompt - ref).abs().max() <= 1e-6
    model, tok = load_model(str(d))
    init = init_prompt(model, tok, PromptConfig(virtual_tokens=4, init="vocab"), seed=0).embeds.detach()
    assert (ref - init).abs().max() > 1e-3  # the prompt moved: the check above is not vacuous


def test_grad_accum_needs_a_row_per_micro_batch():
    with pytest.raises(SoftpromptError, match="--grad-accum 16 needs --batch-size >= 16"):
        TrainConfig(batch_size=8, grad_accum=16)


def test_in_bf16_micro_batches_agree_to_bf16s_precision(llama_dir, countries_csv, tmp_path):
    # The README's "about a thousandth": a bf16 base (asked for here; auto's choice for a soft prompt or a
    # prefix on a CPU with native bf16) sums the micro-batches in other orders and rounds each sum to bf16.
    # Measured on this tiny Llama: 1.2e-3 largest difference, 0.3% of the prompt's norm (float32: 4e-8).
    prompts = {}
    for k in (1, 4):
        m, dc, p, t = _cfgs(llama_dir, countries_csv, tmp_path / f"r{k}", max_steps=STEPS, eval_every=0,
                            save_every=0, keep_best=False, eval_untuned=False, grad_accum=k)
        m.dtype = "bfloat16"
        summary = train(m, dc, p, t, quiet=True)
        assert json.loads((tmp_path / f"r{k}" / "run_config.json").read_text())["dtype"] == "bfloat16"
        assert summary["eval_dtype"] == "bfloat16"  # train's own figures: scored on the bf16 base
        prompts[k] = load_prompt(tmp_path / f"r{k}").embeds.detach()
    diff = prompts[4] - prompts[1]
    assert diff.abs().max() < 3e-3 and diff.norm() / prompts[1].norm() < 1e-2
