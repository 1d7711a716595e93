"""The deep prompt (prefix.PrefixPrompt, kind "prefix") on tiny random models: PEFT's PrefixTuning
forward gives the same loss and greedy tokens as ours on Llama, BLOOM (ALiBi), Qwen2 (grouped-query
attention) and Gemma; its file, training, PEFT export/import and generation round trips."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from families import tiny_config
from softprompt.base.families import kv_geometry
from softprompt.core.utils import SoftpromptError
from softprompt.forward.hidden import batch_loss, text_hidden
from softprompt.forward.paths import choose_path
from softprompt.prompts.prefix import PrefixPrompt, from_flat, init_prefix, to_flat
from softprompt.prompts.prompt import load_prompt, save_prompt

peft = pytest.importorskip("peft")

TEXTS = ["Country: France\nFacts: capital=Paris", "Review: a dull film", "Act as a teacher."]
P = 5
TOL = 1e-5


def tiny(name: str, tok_dir, **overrides):
    tok = AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(name, len(tok), tok.pad_token_id, tok.eos_token_id,
                                                         **overrides))
    return model.eval().requires_grad_(False), tok


def peft_prefix(model, seed: int = 1):
    """A PEFT PrefixTuning model on `model` with random (non-zero) prefix weights, and its prefix as ours."""
    from peft import PrefixTuningConfig, get_peft_model

    cfg = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)
    pm = get_peft_model(model, cfg).eval()
    emb = pm.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        emb.copy_(torch.randn(emb.shape, generator=torch.Generator().manual_seed(seed)) * 0.5)
    L, heads, d = kv_geometry(model)
    return pm, PrefixPrompt(from_flat(emb.detach(), L, heads, d), {"hidden_size": model.config.hidden_size})


def batch_of(tok):
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    targets = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    return SimpleNamespace(input_ids=enc.input_ids, attention_mask=enc.attention_mask, targets=targets)


@pytest.mark.parametrize("family", ["llama", "bloom", "qwen2", "gemma"])
def test_loss_and_greedy_tokens_equal_peft(family, tok_dir):
    model, tok = tiny(family, tok_dir)
    pm, ours = peft_prefix(model)
    b = batch_of(tok)
    with torch.no_grad():
        ref = pm(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.targets)
        loss_sum, n = batch_loss(model, ours, b)
        h, last = text_hidden(model, ours, b.input_ids, b.attention_mask)
    assert last is None  # nothing predicts the first text token, as in PEFT's prefix tuning
    # PEFT's loss: the mean over the text's own next-token predictions (labels shifted inside the text)
    assert n == int((b.targets[:, 1:] != -100).sum())
    assert abs(float(loss_sum / n) - float(ref.loss)) < TOL
    logits = model.get_output_embeddings()(h)
    m = b.attention_mask.bool()
    assert (logits - ref.logits).abs()[m].max() < TOL * 10
    assert torch.equal(logits.argmax(-1)[m], ref.logits.argmax(-1)[m])
    # the prefix matters: without it the loss differs
    with torch.no_grad():
        bare, _ = batch_loss(model, None, b)
    assert abs(float(bare / n) - float(ref.loss)) > 1e-3


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_gradient_equals_peft(family, tok_dir):
    """The training step's gradient, not only its loss: PEFT's PrefixTuning and ours, from the same
    keys and values on the same batch, give the same gradient in PEFT's flat layout (what
    bench/train_speed.py --method prefix times side by side)."""
    model, tok = tiny(family, tok_dir)
    pm, ours = peft_prefix(model)
    emb = pm.prompt_encoder["default"].embedding.weight
    b = batch_of(tok)
    pm(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.targets).loss.backward()
    loss_sum, n = batch_loss(model, ours, b)
    (loss_sum / n).backward()
    mine = to_flat(ours.kv.grad)
    assert emb.grad.abs().max() > 1e-4  # a gradient worth comparing
    assert (mine - emb.grad).abs().max() <= TOL * emb.grad.abs().max()


def test_gqa_geometry_and_flat_layout(tok_dir):
    model, _ = tiny("qwen2", tok_dir)
    pm, ours = peft_prefix(model)
    cfg = pm.peft_config["default"]
    L, heads, d = kv_geometry(model)
    assert heads < model.config.num_attention_heads  # grouped-query attention
    assert (cfg.num_layers, cfg.num_attention_heads, cfg.token_dim) == (L, heads, heads * d)
    flat = pm.prompt_encoder["default"].embedding.weight.detach()
    assert torch.equal(to_flat(ours.key_values().detach()), flat)
    # PEFT's own per-layer cache equals ours
    cache = pm.get_prompt(1)
    for layer, (k, v) in enumerate(ours.past_key_values(model)):
        assert torch.equal(cache.layers[layer].keys, k) and torch.equal(cache.layers[layer].values, v)


def test_path_chooser_takes_kv_for_a_prefix(llama_dir):
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    mask = torch.ones(2, 3, dtype=torch.long)
    choice = choose_path(model, "auto", rows=mask, deep=True)
    assert choice.path == "kv" and "prefix" in choice.reason
    assert choose_path(model, "auto", deep=True).path == "kv"
    for bad in ("packed", "concat", "graphed"):
        with pytest.raises(SoftpromptError, match="no input embeddings"):
            choose_path(model, bad, rows=mask, deep=True)


def test_save_load_round_trip_and_fit_check(tmp_path, tok_dir):
    model, tok = tiny("qwen2", tok_dir)
    cfg = SimpleNamespace(virtual_tokens=P, init="text", init_text="Act as a teacher.")
    pre = init_prefix(model, tok, cfg)
    save_prompt(pre, tmp_path / "p", {"model": "tiny-qwen2"})
    back = load_prompt(tmp_path / "p", model)
    assert back.kind == "prefix" and back.input_embeds() is None and back.length == P
    assert torch.equal(back.key_values(), pre.key_values())
    for other in ({"num_key_value_heads": 4}, {"num_hidden_layers": 3}):
        with pytest.raises(SoftpromptError, match="kv heads"):
            load_prompt(tmp_path / "p", tiny("qwen2", tok_dir, **other)[0])


@pytest.mark.parametrize("family", ["llama", "bloom", "falcon-alibi", "mpt"])
def test_text_init_is_the_models_own_cache(family, tok_dir):
    """The text init's prefix followed by text gives the same next-token states as the text itself
    (also on the families PEFT's prefix tuning cannot build: Falcon's multi-query cache, MPT)."""
    model, tok = tiny(family, tok_dir)
    text = "Act as a teacher."
    ids = tok(text, add_special_tokens=False).input_ids
    cfg = SimpleNamespace(virtual_tokens=len(ids), init="text", init_text=text)
    pre = init_prefix(model, tok, cfg)
    follow = tok(" explain things", add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        h, _ = text_hidden(model, pre, follow, torch.ones_like(follow))
        full = model.base_model(input_ids=torch.cat([torch.tensor([ids]), follow], 1)).last_hidden_state
    assert (h - full[:, len(ids):]).abs().max() < 1e-5


def test_random_init_is_scaled_like_the_models_keys(tok_dir):
    model, tok = tiny("llama", tok_dir)
    text = SimpleNamespace(virtual_tokens=8, init="text", init_text="Act as a teacher.")
    rand = SimpleNamespace(virtual_tokens=8, init="random", init_text="Act as a teacher.")
    a, b = init_prefix(model, tok, text).key_values(), init_prefix(model, tok, rand, seed=3).key_values()
    ratio = b.flatten(2).std(-1) / a.flatten(2).std(-1)  # [L, 2]
    assert ((ratio > 0.5) & (ratio < 2)).all()
    assert not torch.allclose(a, b)


def test_projection_starts_at_its_init_and_folds(tok_dir):
    model, tok = tiny("llama", tok_dir)
    cfg = SimpleNamespace(virtual_tokens=P, init="text", init_text="Act as a teacher.")
    plain = init_prefix(model, tok, cfg)
    proj = init_prefix(model, tok, cfg, projection=True)
    assert torch.equal(proj.key_values(), plain.key_values())
    names = {n for n, _ in proj.named_parameters()}
    assert "kv" not in names and "embedding" in names
    with torch.no_grad():
        proj.transform[2].bias.add_(0.1)
    folded = proj.folded()
    assert not folded.projection and torch.allclose(folded.key_values(), plain.key_values() + 0.1)


def test_scaled_steps_move_every_slice_by_lr_of_its_own_size():
    """A prefix trains kv / scale, scale each (layer, key/value) slice's RMS rounded to a power of two: it
    starts at its init bit for bit, and Adam's first step (lr * sign(gradient)) moves each element by lr
    times its slice's scale, where plain steps move every element by lr."""
    gen = torch.Generator().manual_seed(0)
    sizes = torch.tensor([[0.03, 0.7], [2.0, 5.0], [1.0, 0.2]])[:, :, None, None, None]  # [L=3, 2, 1, 1, 1]
    kv = torch.randn(3, 2, 2, P, 8, generator=gen) * sizes  # as a real model's keys and values differ by layer
    plain, scaled = PrefixPrompt(kv), PrefixPrompt(kv, scaled_steps=True)
    assert plain.scale is None and torch.equal(scaled.key_values(), kv)
    s = scaled.scale  # [L, 2, 1, 1, 1]
    rms = kv.pow(2).flatten(2).mean(-1).sqrt()[:, :, None, None, None]
    assert torch.equal(torch.exp2(torch.log2(s).round()), s)
    assert ((s / rms > 2 ** -0.5 - 1e-6) & (s / rms < 2 ** 0.5 + 1e-6)).all()
    assert s.flatten().unique().numel() > 1  # the slices differ in size here, so the check can fail
    grad = torch.randn(kv.shape, generator=gen)
    lr = 1e-2
    for prefix, unit in ((plain, torch.ones_like(s)), (scaled, s)):
        opt = torch.optim.AdamW(prefix.parameters(), lr=lr, weight_decay=0.0)
        (prefix.key_values() * grad).sum().backward()
        opt.step()
        moved = (prefix.key_values().detach() - kv).abs()
        assert torch.allclose(moved, (lr * unit).expand_as(moved), rtol=1e-3), prefix.scale


def test_a_scaled_checkpoint_resumes_exactly(tok_dir):
    """A checkpoint holds the keys and values; the resumed prefix divides them back to its parameter
    bit for bit (the scale, rebuilt from the same start, is a power of two)."""
    model, tok = tiny("llama", tok_dir)
    cfg = SimpleNamespace(virtual_tokens=P, init="random", init_text="Act as a teacher.")
    a, b = (init_prefix(model, tok, cfg, seed=2, scaled_steps=True) for _ in range(2))
    with torch.no_grad():
        a.kv.add_(torch.randn(a.kv.shape, generator=torch.Generator().manual_seed(1)) / 3)
    b.load_state_tensors(a.state_tensors(), "here")
    assert torch.equal(b.kv, a.kv) and torch.equal(b.key_values(), a.key_values())
    assert set(a.state_tensors()) == {"prefix_key_values"}  # the scale is not saved: the result is plain


# ---------------------------------------------------------------- train --method prefix

def train_cfgs(model_dir, data, out, **tkw):
    from softprompt.core.config import DataConfig, ModelConfig, PromptConfig, TrainConfig

    m = ModelConfig(model=str(model_dir), device="cpu", dtype="float32")  # float32's equivalences (test_train._cfgs)
    d = DataConfig(data=str(data), template="Country: {country}\\nFacts:", target=" capital={capital}",
                   eval_fraction=0.1, max_length=32)
    p = PromptConfig(virtual_tokens=4, init="text", init_text="Facts about countries.")
    kw = dict(out=str(out), lr=0.05, batch_size=8, max_steps=12, eval_every=6, save_every=4, log_every=1,
              warmup_steps=2, seed=0, method="prefix", keep_best=False)
    t = TrainConfig(**{**kw, **tkw})
    return m, d, p, t


def losses(run_dir):
    import json

    return [json.loads(l)["loss"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()
            if json.loads(l)["split"] == "train"]


@pytest.mark.parametrize("projection,scaled", [(False, True), (False, False), (True, True)])
def test_train_prefix_learns_leaves_base_untouched_and_resumes(projection, scaled, llama_dir, countries_csv,
                                                               tmp_path):
    import json

    from softprompt.base.models import load_model
    from softprompt.training.train import train
    from softprompt.core.utils import weights_hash

    model, tok = load_model(str(llama_dir))
    before = weights_hash(model)
    how = {"prefix_projection": projection, "prefix_scaled_steps": scaled}
    full = train(*train_cfgs(llama_dir, countries_csv, tmp_path / "a", **how), model=model, tok=tok, quiet=True)
    assert full["base_weights_unchanged"] and weights_hash(model) == before
    assert full["forward_path"] == "kv" and full["method"] == "prefix"
    L, heads, d = kv_geometry(model)
    if not projection:
        assert full["trainable_params"] == L * 2 * heads * 4 * d
    tr = losses(tmp_path / "a")
    assert sum(tr[-3:]) < sum(tr[:3])  # it learned something
    saved = load_prompt(tmp_path / "a", model)
    assert saved.kind == "prefix" and not saved.projection  # the MLP folded away
    run_cfg = json.loads((tmp_path / "a" / "run_config.json").read_text())
    assert run_cfg["TrainConfig"]["method"] == "prefix" and run_cfg["forward_path_taken"] == "kv"
    # The MLP takes plain steps, whatever was asked, and the record says so.
    assert (run_cfg["TrainConfig"]["prefix_projection"], run_cfg["TrainConfig"]["prefix_scaled_steps"]) == (
        projection, scaled and not projection)
    part = train(*train_cfgs(llama_dir, countries_csv, tmp_path / "b", **how), stop_after=5, quiet=True)
    assert part == {"interrupted_at": 5}
    train(*train_cfgs(llama_dir, countries_csv, tmp_path / "b", **how, resume=True), quiet=True)
    assert torch.equal(load_prompt(tmp_path / "b").key_values(), saved.key_values())
    assert losses(tmp_path / "b") == tr


def test_config_replay_keeps_the_method(llama_dir, countries_csv, tmp_path):
    import json

    from softprompt.cli import main

    argv = ["train", "--model", str(llama_dir), "--data", str(countries_csv), "--template", "Country: {country}",
            "--target", " {capital}", "--max-steps", "2", "--virtual-tokens", "3", "--eval-every", "0",
            "--method", "prefix", "--prefix-projection", "--out", str(tmp_path / "a")]
    assert main(argv) == 0
    assert main(["train", "--config", str(tmp_path / "a" / "run_config.json"), "--out", str(tmp_path / "b")]) == 0
    a, b = (json.loads((tmp_path / x / "run_config.json").read_text()) for x in "ab")
    assert b["TrainConfig"]["method"] == "prefix" and b["TrainConfig"]["prefix_projection"]
    assert torch.equal(load_prompt(tmp_path / "a").key_values(), load_prompt(tmp_path / "b").key_values())


def test_a_record_from_before_scaled_steps_replays_and_resumes_with_plain_steps(llama_dir, countries_csv, tmp_path,
                                                                               capsys):
    """A prefix run recorded before --prefix-scaled-steps (its run_config.json lacks the field) took
    plain steps: `--config` replays it so, and `--resume` continues it so, where today's default
    would load its keys and values as kv / scale under Adam moments of kv; asking for scaled steps
    there is refused in one line."""
    import json

    from softprompt.cli import main
    from softprompt.training.train import train

    train(*train_cfgs(llama_dir, countries_csv, tmp_path / "full", prefix_scaled_steps=False), quiet=True)
    train(*train_cfgs(llama_dir, countries_csv, tmp_path / "old", prefix_scaled_steps=False), stop_after=5,
          quiet=True)
    record = tmp_path / "old" / "run_config.json"
    cfg = json.loads(record.read_text())
    del cfg["TrainConfig"]["prefix_scaled_steps"]  # as train wrote it before 8a499ea
    record.write_text(json.dumps(cfg))
    capsys.readouterr()
    assert main(["train", "--config", str(record), "--resume", "--out", str(tmp_path / "old"),
                 "--prefix-scaled-steps"]) == 2
    err = capsys.readouterr().err
    assert "--prefix-scaled-steps True (was False)" in err.splitlines()[-1] and "Traceback" not in err
    assert main(["train", "--config", str(record), "--out", str(tmp_path / "replay")]) == 0
    assert main(["train", "--config", str(record), "--resume", "--out", str(tmp_path / "old")]) == 0
    want = load_prompt(tmp_path / "full").key_values()
    for run in ("replay", "old"):
        recorded = json.loads((tmp_path / run / "run_config.json").read_text())["TrainConfig"]
        assert recorded["prefix_scaled_steps"] is False
        assert torch.equal(load_prompt(tmp_path / run).key_values(), want)
    assert losses(tmp_path / "old") == losses(tmp_path / "full")


def test_only_a_prefix_run_s_record_is_read_as_plain_steps():
    from softprompt.core.config import as_it_ran

    old = {"forward_path_taken": "kv", "TrainConfig": {"method": "prefix", "lr": 0.01}}
    assert as_it_ran(old)["TrainConfig"] == {"method": "prefix", "lr": 0.01, "prefix_scaled_steps": False}
    assert "prefix_scaled_steps" not in old["TrainConfig"]  # the caller's mapping is left as it was
    # A projection run recorded before the record said false took plain steps too.
    mlp = {"forward_path_taken": "kv", "TrainConfig": {"method": "prefix", "prefix_projection": True,
                                                       "prefix_scaled_steps": True}}
    assert as_it_ran(mlp)["TrainConfig"]["prefix_scaled_steps"] is False
    for same in ({"forward_path_taken": "kv", "TrainConfig": {"method": "prefix", "prefix_scaled_steps": True}},
                 {"forward_path_taken": "packed", "TrainConfig": {"method": "prompt"}},
                 {"TrainConfig": {"method": "prefix"}}):  # a hand-written file: today's default
        assert as_it_ran(same) == same


def test_train_with_gradient_checkpointing_equals_without(llama_dir, countries_csv, tmp_path):
    from softprompt.training.train import train

    for on in (False, True):
        s = train(*train_cfgs(llama_dir, countries_csv, tmp_path / str(on), gradient_checkpointing=on,
                              max_steps=3, eval_every=0, save_every=0), quiet=True)
        assert s["forward_path"] == "kv"
    a, b = (load_prompt(tmp_path / str(on)).key_values() for on in (False, True))
    assert not torch.equal(a, init_prefix_of(llama_dir))  # it trained
    assert torch.allclose(a, b, atol=1e-5)


def init_prefix_of(model_dir) -> torch.Tensor:
    from softprompt.core.config import PromptConfig
    from softprompt.base.models import load_model

    model, tok = load_model(str(model_dir))
    return init_prefix(model, tok, PromptConfig(virtual_tokens=4, init="text", init_text="Facts about countries.")
                       ).key_values()


def test_projection_with_method_prompt_is_one_error_line():
    from softprompt.core.config import TrainConfig

    with pytest.raises(SoftpromptError, match="--prefix-projection is for --method prefix"):
        TrainConfig(method="prompt", prefix_projection=True)
    with pytest.raises(SoftpromptError, match="--no-prefix-scaled-steps is for --method prefix"):
        TrainConfig(method="ptuning", prefix_scaled_steps=False)
    assert TrainConfig(prefix_projection=True).method == "auto"  # the default: auto trains a prefix then


def test_gradient_checkpointing_gives_the_same_gradient(tok_dir):
    """The checkpointed layers keep the prefix's cache (PEFT refuses this: peft#869)."""
    from softprompt.base.models import set_checkpointing

    model, tok = tiny("qwen2", tok_dir)
    cfg = SimpleNamespace(virtual_tokens=P, init="text", init_text="Act as a teacher.")
    pre = init_prefix(model, tok, cfg)
    b = batch_of(tok)
    grads = []
    for on in (False, True):
        if on:
            set_checkpointing(model, True)
        pre.zero_grad()
        loss, _ = batch_loss(model, pre, b)
        loss.backward()
        grads.append((float(loss), pre.kv.grad.clone()))
    set_checkpointing(model, False)
    assert grads[0][0] == pytest.approx(grads[1][0], abs=1e-6)
    assert grads[0][1].abs().sum() > 0
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-6)


# ---------------------------------------------------------------- PEFT interop

@pytest.mark.parametrize("family", ["bloom", "qwen2"])
def test_export_to_peft_loads_in_peft_with_the_same_logits(family, tok_dir, tmp_path):
    import json

    from peft import PeftModel

    from softprompt.prompts.peft_io import export_peft

    model, tok = tiny(family, tok_dir)
    model.save_pretrained(tmp_path / "base")
    pre = init_prefix(model, tok, SimpleNamespace(virtual_tokens=P, init="random", init_text="Act."), seed=2)
    save_prompt(pre, tmp_path / "p", {"model": str(tmp_path / "base")})
    export_peft(tmp_path / "p", tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    L, heads, d = kv_geometry(model)
    assert (cfg["peft_type"], cfg["num_layers"], cfg["num_attention_heads"], cfg["token_dim"]) == \
        ("PREFIX_TUNING", L, heads, heads * d)
    assert cfg["prefix_projection"] is False
    pm = PeftModel.from_pretrained(model, tmp_path / "peft").eval()
    b = batch_of(tok)
    with torch.no_grad():
        ref = pm(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        h, _ = text_hidden(model, pre, b.input_ids, b.attention_mask)
    m = b.attention_mask.bool()
    assert (model.get_output_embeddings()(h) - ref).abs()[m].max() < 1e-4


def test_import_peft_prefix_with_projection(tok_dir, tmp_path):
    from peft import PrefixTuningConfig, get_peft_model

    from softprompt.prompts.peft_io import import_peft

    model, tok = tiny("qwen2", tok_dir)
    model.save_pretrained(tmp_path / "base")
    pm = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=True,
                                                  base_model_name_or_path=str(tmp_path / "base")))
    with torch.no_grad():
        for p_ in pm.prompt_encoder.parameters():
            p_.add_(torch.randn(p_.shape, generator=torch.Generator().manual_seed(4)) * 0.3)
    pm.eval()
    b = batch_of(tok)
    with torch.no_grad():
        ref = pm(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.targets).loss
    pm.save_pretrained(tmp_path / "peft")
    import_peft(tmp_path / "peft", tmp_path / "ours", str(tmp_path / "base"))
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    ours = load_prompt(tmp_path / "ours", base)
    assert ours.kind == "prefix"
    with torch.no_grad():
        s, n = batch_loss(base, ours, b)
    assert abs(float(s / n) - float(ref)) < TOL
    # An adapter made on a Hub model (its base a Hub id, unreadable offline): the import cannot learn the
    # hidden size, which a prefix does not hold, and every command refused the folder as "hidden size 0".
    # Its cache's geometry is checked against the model it is loaded with, and then it is that model's.
    cfg_file = tmp_path / "peft" / "adapter_config.json"
    cfg_file.write_text(cfg_file.read_text().replace(str(tmp_path / "base"), "someone/not-on-this-machine"))
    import_peft(tmp_path / "peft", tmp_path / "hub")
    ours = load_prompt(tmp_path / "hub", base)
    assert ours.hidden_size == base.config.hidden_size
    with torch.no_grad():
        s, n = batch_loss(base, ours, b)
    assert abs(float(s / n) - float(ref)) < TOL


def test_import_refuses_other_adapters_and_misfits(tok_dir, tmp_path):
    import json

    from softprompt.prompts.peft_io import export_peft, import_peft

    model, tok = tiny("qwen2", tok_dir)
    pre = init_prefix(model, tok, SimpleNamespace(virtual_tokens=P, init="text", init_text="Act."))
    save_prompt(pre, tmp_path / "p", {"model": "x"})
    export_peft(tmp_path / "p", tmp_path / "peft")
    other, _ = tiny("qwen2", tok_dir, num_key_value_heads=4)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(SoftpromptError, match="key/value heads"):
        import_peft(tmp_path / "peft", tmp_path / "o1", str(tmp_path / "other"))
    assert not (tmp_path / "o1").exists()
    # Exported for another base it does not fit: refused, where it wrote an adapter that PEFT failed on.
    with pytest.raises(SoftpromptError, match=r"--base-model .*other' does not fit this prefix: num_key_value_heads "
                                              r"\d+ \(the model's: 4\)"):
        export_peft(tmp_path / "p", tmp_path / "e1", base_model=str(tmp_path / "other"))
    assert not (tmp_path / "e1").exists()
    cfg_file = tmp_path / "peft" / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**cfg, "peft_type": "LORA"}))
    with pytest.raises(SoftpromptError, match="peft_type is 'LORA'"):
        import_peft(tmp_path / "peft", tmp_path / "o2")
    cfg_file.write_text(json.dumps({**cfg, "num_layers": 3}))
    with pytest.raises(SoftpromptError, match="expected"):
        import_peft(tmp_path / "peft", tmp_path / "o3")


# ---------------------------------------------------------------- generation and serving

def saved_pair(model, tok, root):
    """A random soft prompt and a random prefix for `model`, saved under root/soft and root/deep."""
    from softprompt.prompts.prompt import SoftPrompt

    gen = torch.Generator().manual_seed(7)
    soft = save_prompt(SoftPrompt(torch.randn(4, model.config.hidden_size, generator=gen) * 0.5), root / "soft",
                       {"model": "tiny", "labels": ["negative", "positive"]})
    pre = init_prefix(model, tok, SimpleNamespace(virtual_tokens=6, init="random", init_text="Act."), seed=5)
    # 30x the model's own spread: on the near-uniform tiny Llama a prefix of its own scale barely moves greedy tokens
    pre = PrefixPrompt(pre.key_values().detach() * 30, pre.meta)
    deep = save_prompt(pre, root / "deep", {"model": "tiny", "labels": ["negative", "positive"]})
    return soft, deep


@pytest.mark.parametrize("family", ["qwen2", "bloom"])
def test_generate_with_a_prefix_equals_peft_greedy(family, tok_dir, tmp_path):
    """A prefix's decoder cache is its keys and values: greedy tokens equal greedy decoding by PEFT's
    forward pass, re-run on the whole sequence each step. (PEFT 0.21.2's own generate() parts from its
    forward after the first token on transformers 5.24, so it is not the reference.)"""
    from softprompt.core.config import GenerateConfig
    from softprompt.forward.prefill import PromptKV
    from softprompt.generation.generate import generate_batch

    model, tok = tiny(family, tok_dir)
    pm, ours = peft_prefix(model)
    ids = tok(TEXTS[0]).input_ids
    seq = list(ids)
    with torch.no_grad():
        for _ in range(6):
            x = torch.tensor([seq])
            seq.append(int(pm(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, -1].argmax()))
    out = generate_batch(model, tok, [(ours, ids)], GenerateConfig(max_new_tokens=6), PromptKV(model))
    assert out[0] == [t for t in seq[len(ids):] if t != tok.eos_token_id][:len(out[0])] and out[0]


def test_serve_soft_and_prefix_prompts_in_one_batch(llama_dir, tmp_path, monkeypatch):
    import httpx

    from serve_helpers import gated, in_threads, running
    from softprompt.core.config import GenerateConfig, ServeConfig
    from softprompt.generation.generate import generate_batch
    from softprompt.base.models import load_model

    model, tok = load_model(str(llama_dir))
    soft, deep = saved_pair(model, tok, tmp_path)
    cfg = ServeConfig(max_batch=16, max_queue=32, batch_wait_ms=2, max_input_tokens=64, default_max_tokens=8)
    with running(model, tok, {"soft": str(soft), "deep": str(deep)}, cfg) as (app, run):
        models = {m["id"]: m for m in httpx.get(run.url + "/v1/models").json()["data"]}
        assert models["deep"]["virtual_tokens"] == 6
        gate, entered, sizes = gated(app.state.scheduler, monkeypatch)
        reqs = [{"model": name, "prompt": text, "max_tokens": 3 + i}
                for i, (name, text) in enumerate([(n, t) for n in ("soft", "deep", "tiny-base") for t in TEXTS[:2]])]
        post = lambda b: httpx.post(run.url + "/v1/completions", json=b, timeout=30)  # noqa: E731
        t0, _ = in_threads(post, [{"model": "deep", "prompt": "x", "max_tokens": 1}])
        assert entered.wait(10)
        ts, out = in_threads(post, reqs)
        from serve_helpers import wait_depth
        wait_depth(app.state.scheduler, len(reqs))
        gate.set()
        for t in t0 + ts:
            t.join(30)
        assert sizes == [1, len(reqs)]  # one shared batch
        alone = {"soft": load_prompt(soft, model).input_embeds().detach(), "deep": load_prompt(deep, model),
                 "tiny-base": None}
        for body, r in zip(reqs, out):
            assert r.status_code == 200, r.text
            want = generate_batch(model, tok, [(alone[body["model"]], tok(body["prompt"]).input_ids)],
                                  GenerateConfig(max_new_tokens=body["max_tokens"]))
            assert r.json()["choices"][0]["text"] == tok.decode(want[0], skip_special_tokens=True), body
        texts = {(b["model"], b["prompt"]): r.json()["choices"][0]["text"] for b, r in zip(reqs, out)}
        assert any(texts[("deep", t)][:3] != texts[("tiny-base", t)][:3] for t in TEXTS[:2])  # the prefix acts
        # classification and logprobs with a prefix take its kv path
        c = httpx.post(run.url + "/v1/classify", json={"task": "deep", "text": "Review: a dull film\nSentiment:"})
        assert c.status_code == 200, c.text
        lp = httpx.post(run.url + "/v1/completions", json={"model": "deep", "prompt": TEXTS[0], "max_tokens": 2,
                                                           "logprobs": 1})
        assert lp.status_code == 200, lp.text
        assert len(lp.json()["choices"][0]["logprobs"]["token_logprobs"]) >= 2


def test_ensemble_takes_a_prefix_beside_a_soft_prompt(llama_dir, tmp_path, capsys, countries_csv):
    """The command that once needed input embeddings scores a prefix too (each prompt its own batches)."""
    import json

    from softprompt.cli import main
    from softprompt.base.models import load_model

    model, tok = load_model(str(llama_dir))
    soft, deep = saved_pair(model, tok, tmp_path)
    assert main(["ensemble", "--model", str(llama_dir), "--data", str(countries_csv), "--template",
                 "Country: {country}\\nEurope:", "--label-col", "europe", "--labels", "no,yes",
                 str(soft), str(deep), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert [p["prompt"] for p in r["prompts"]] == [str(soft), str(deep)] and r["n"] == 194


def test_eval_command_scores_a_prefix(llama_dir, tmp_path, countries_csv):
    """`eval` runs a prefix through the kv path: its loss differs from the untuned model's."""
    from softprompt.core.config import DataConfig, ModelConfig
    from softprompt.evaluation.evaluate import eval_prompt
    from softprompt.base.models import load_model

    model, tok = load_model(str(llama_dir))
    _, deep = saved_pair(model, tok, tmp_path)
    m = ModelConfig(model=str(llama_dir), device="cpu")
    d = DataConfig(data=str(countries_csv), template="Country: {country}\\nFacts:", target=" capital={capital}")
    with_prefix, bare = eval_prompt(m, d, str(deep)), eval_prompt(m, d, "none")
    assert with_prefix["loss"] != pytest.approx(bare["loss"], abs=1e-4)
    assert with_prefix["tokens"] == bare["tokens"]  # the same targets: a prefix predicts no text token itself


def test_prefix_inits_file_and_refused_soft_prompt_inits(tok_dir, tmp_path):
    from softprompt.core.config import PromptConfig, TrainConfig
    from softprompt.training.prefix_method import PrefixTuning

    model, tok = tiny("llama", tok_dir)
    t = TrainConfig(method="prefix")
    first = PrefixTuning.setup(model, tok, PromptConfig(virtual_tokens=P, init="random"), t, [], "Act.", ":")
    save_prompt(first.prompt, tmp_path / "p", {})
    again = PrefixTuning.setup(model, tok, PromptConfig(virtual_tokens=P, init="file", init_file=str(tmp_path / "p")),
                               t, [], "Act.", ":")
    assert torch.equal(again.prompt.key_values(), first.prompt.key_values())
    with pytest.raises(SoftpromptError, match="--init labels"):
        PrefixTuning.setup(model, tok, PromptConfig(virtual_tokens=P, init="labels"), t, ["a", "b"], "Act.", ":")
    with pytest.raises(SoftpromptError, match="need a prefix of 3"):
        PrefixTuning.setup(model, tok, PromptConfig(virtual_tokens=3, init="file", init_file=str(tmp_path / "p")),
                           t, [], "Act.", ":")


def test_generate_command_with_a_prefix(llama_dir, tmp_path):
    """`generate --prompt DIR --compare` on a prefix: the tuned answer is the prefix's greedy decode."""
    from softprompt.core.config import GenerateConfig, ModelConfig
    from softprompt.generation.generate import generate_batch, generate_cmd
    from softprompt.base.models import load_model

    model, tok = load_model(str(llama_dir))
    _, deep = saved_pair(model, tok, tmp_path)
    gcfg = GenerateConfig(max_new_tokens=5)
    res = generate_cmd(ModelConfig(model=str(llama_dir)), gcfg, [TEXTS[1]], str(deep), compare=True,
                       model=model, tok=tok)
    want = generate_batch(model, tok, [(load_prompt(deep, model), tok(TEXTS[1]).input_ids)], gcfg)
    assert res[0]["tuned"] == tok.decode(want[0], skip_special_tokens=True)
    assert res[0]["tuned"] != res[0]["baseline"]


def error_lines(capsys) -> list[str]:
    """The error lines of the last command (not the weights' progress bars or warnings)."""
    return [l for l in capsys.readouterr().err.splitlines() if "error" in l]


def test_what_train_wrote_given_to_the_wrong_place_is_one_error_line(llama_dir, bloom_dir, tok_dir, countries_csv,
                                                                    tmp_path, capsys):
    """Issue 23's bad inputs, on the prompts our own `train` writes: a prefix where input embeddings are
    needed, a prefix or a prompt on a model of another geometry, a LoRA adapter given as a prompt,
    --prefix-projection without --method prefix. Each is exit status 2 and one error line, no traceback
    (main() would raise one into the test)."""
    import json

    from safetensors.torch import save_file

    from softprompt.cli import main

    data = ["--data", str(countries_csv), "--template", "Country: {country}\\nFacts:", "--target", " capital={capital}"]
    run = [*data, "--max-steps", "1", "--warmup-steps", "0", "--batch-size", "4", "--virtual-tokens", "3",
           "--eval-fraction", "0", "--no-eval-untuned", "--model", str(llama_dir)]
    pre, soft = tmp_path / "pre", tmp_path / "soft"
    assert main(["train", *run, "--method", "prefix", "--out", str(pre)]) == 0
    assert main(["train", *run, "--method", "prompt", "--out", str(soft)]) == 0
    capsys.readouterr()
    # Models of other geometries: one more layer, a wider hidden size (BLOOM: other kv heads).
    for name, extra in (("deeper", {"num_hidden_layers": 3}), ("wider", {"hidden_size": 48})):
        model, tok = tiny("llama", tok_dir, **extra)
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8}))
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(8, 32)},
              str(lora / "adapter_model.safetensors"))
    cases = [
        (["train", *run, "--method", "prompt", "--init", "file", "--init-file", str(pre),
          "--out", str(tmp_path / "a")],
         "--init file: the prompt in --init-file is a prefix (per-layer keys and values), which has no input "
         "embeddings"),
        (["train", *run, "--method", "residual", "--init", "file", "--init-file", str(pre),
          "--out", str(tmp_path / "b")], "has no input embeddings"),
        (["eval", *data, "--model", str(tmp_path / "deeper"), "--prompt", str(pre)],
         "has (layers, kv heads, head dim) (2, 2, 8) but the model's cache has (3, 2, 8)"),
        (["generate", "--model", str(bloom_dir), "--prompt", str(pre), "Country: France"],
         "has (layers, kv heads, head dim) (2, 2, 8) but the model's cache has (2, 4, 8)"),
        (["eval", *data, "--model", str(tmp_path / "wider"), "--prompt", str(soft)],
         "has hidden size 32 but the model's is 48"),
        (["eval", *data, "--model", str(llama_dir), "--prompt", str(lora)],
         f"{lora} is a PEFT 'LORA' adapter, not a prompt"),
        (["generate", "--model", str(llama_dir), "--prompt", str(lora), "Country: France"], "'LORA' adapter"),
        (["import-peft", str(lora), str(tmp_path / "d")], "peft_type is 'LORA', only PROMPT_TUNING"),
        (["train", *run, "--method", "prompt", "--prefix-projection", "--out", str(tmp_path / "e")],
         "--prefix-projection is for --method prefix (got --method prompt)"),
    ]
    for argv, says in cases:
        assert main(argv) == 2, argv
        err = error_lines(capsys)
        assert len(err) == 1 and says in err[0], (argv, err)
