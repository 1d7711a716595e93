"""`train --method ptuning` (PEFT's PromptEncoder, MLP or LSTM) and `--method residual` (residual
prompt tuning) on tiny random models: each learns and saves an ordinary soft prompt equal to its
encoder's output; --keep-encoder keeps the encoder (loadable into PEFT's PromptEncoder) and
--resume carries on as an uninterrupted run; bad flag combinations are one error line; PEFT
P_TUNING adapters import as the prompt PEFT's own forward uses (same loss within 1e-5); one CLI
journey on the built-in model (slow)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from families import tiny_config
from softprompt.core.config import DataConfig, ModelConfig, PromptConfig, TrainConfig
from softprompt.training.encoder_method import ENCODER_FILE, GRAPH_OBSTACLE
from softprompt.forward.hidden import batch_loss
from softprompt.prompts.prompt import SoftPrompt, init_prompt, load_prompt
from softprompt.prompts.ptuning_encoder import PromptEncoder
from softprompt.training.ptuning_method import PTuning
from softprompt.training.residual_method import ResidualTuning
from softprompt.training.train import train
from softprompt.core.utils import SoftpromptError, weights_hash

TEXTS = ["Country: France\nFacts: capital=Paris", "Review: a dull film", "Act as a teacher."]
TOL = 1e-5
# (method, --encoder, lr): a rate each learns at in 12 steps on the tiny Llama
VARIANTS = [("ptuning", "mlp", 1e-2), ("ptuning", "lstm", 1e-2), ("residual", "auto", 0.05)]


def tiny(name: str, tok_dir, **overrides):
    tok = AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(name, len(tok), tok.pad_token_id, tok.eos_token_id,
                                                         **overrides))
    return model.eval().requires_grad_(False), tok


def batch_of(tok):
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    targets = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    return SimpleNamespace(input_ids=enc.input_ids, attention_mask=enc.attention_mask, targets=targets)


def cfgs(model_dir, data, out, method="ptuning", **tkw):
    m = ModelConfig(model=str(model_dir), device="cpu", dtype="float32")  # float32's equivalences (test_train._cfgs)
    d = DataConfig(data=str(data), template="Country: {country}\\nFacts:", target=" capital={capital}",
                   eval_fraction=0.1, max_length=32)
    p = PromptConfig(virtual_tokens=4, init="text", init_text="Facts about countries.")
    kw = dict(out=str(out), lr=3e-3, batch_size=8, max_steps=12, eval_every=6, save_every=4, log_every=1,
              warmup_steps=2, seed=0, method=method, keep_best=False)
    return m, d, p, TrainConfig(**{**kw, **tkw})


def losses(run_dir: Path) -> list[float]:
    return [json.loads(l)["loss"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()
            if json.loads(l)["split"] == "train"]


def setup_method(cls, model, tok, P=4, **tkw):
    return cls.setup(model, tok, PromptConfig(virtual_tokens=P, init="text", init_text="Act as a teacher."),
                     TrainConfig(method=cls.name, **tkw), [], "Act.", ":")


# ---------------------------------------------------------------- the encoders

@pytest.mark.parametrize("kind", ["mlp", "lstm"])
def test_encoder_is_pefts_prompt_encoder(kind, tok_dir):
    """Our PromptEncoder's state_dict loads into PEFT's (same names and shapes) and gives its output."""
    from peft import PromptEncoderConfig
    from peft.tuners.p_tuning.model import PromptEncoder as PeftEncoder

    torch.manual_seed(3)
    ours = PromptEncoder(5, 32, 24, kind)
    cfg = PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, token_dim=32, num_transformer_submodules=1,
                              encoder_reparameterization_type=kind.upper(), encoder_hidden_size=24)
    theirs = PeftEncoder(cfg)
    theirs.load_state_dict(ours.state_dict())  # strict: every name and shape
    with torch.no_grad():
        assert torch.allclose(theirs(torch.arange(5)[None])[0], ours(), atol=1e-6)


def test_residual_starts_at_its_init_and_its_branch_then_moves(tok_dir):
    model, tok = tiny("llama", tok_dir)
    method = setup_method(ResidualTuning, model, tok)
    init = init_prompt(model, tok, PromptConfig(virtual_tokens=4, init="text", init_text="Act as a teacher."))
    assert torch.equal(method.prompt.input_embeds(), init.embeds)  # the LayerNorm's affine starts at zero
    assert method.prompt.meta["init"] == "text" and method.prompt.meta["encoder_hidden_size"] == 16  # H / 2
    opt = torch.optim.AdamW(method.parameters(), lr=1e-2)
    for _ in range(2):
        loss, n = batch_loss(model, method.embeds(), batch_of(tok))
        (loss / n).backward()
        opt.step(), opt.zero_grad()
    mlp = method.prompt.encoder.mlp
    assert mlp[3].weight.abs().sum() > 0 and mlp[0].weight.grad is None  # the branch trains (grads were cleared)
    assert not torch.equal(method.prompt.input_embeds(), init.embeds)


def test_ptuning_setup_seeds_encoder_and_records_it(tok_dir):
    model, tok = tiny("llama", tok_dir)
    a = setup_method(PTuning, model, tok, seed=1, encoder="lstm", encoder_hidden_size=8)
    torch.randn(3)  # the global generator's state does not matter
    b = setup_method(PTuning, model, tok, seed=1, encoder="lstm", encoder_hidden_size=8)
    assert torch.equal(a.prompt.input_embeds(), b.prompt.input_embeds())
    assert a.prompt.encoder.lstm_head.hidden_size == 8
    meta = a.prompt.meta
    assert (meta["method"], meta["encoder"], meta["encoder_hidden_size"], meta["init"], meta["encoder_init"]) == \
        ("ptuning", "lstm", 8, "encoder", "text")
    assert setup_method(PTuning, model, tok).prompt.meta["encoder_hidden_size"] == 32  # PEFT's: the model's H
    # the encoder's input embedding is the init's
    init = init_prompt(model, tok, PromptConfig(virtual_tokens=4, init="text", init_text="Act as a teacher."))
    assert torch.equal(a.prompt.encoder.embedding.weight, init.embeds)


# ---------------------------------------------------------------- training

@pytest.mark.parametrize("method,encoder,lr", VARIANTS)
def test_training_lowers_the_loss_and_saves_the_encoders_output(method, encoder, lr, llama_dir, countries_csv,
                                                                 tmp_path):
    from softprompt.base.models import load_model

    model, tok = load_model(str(llama_dir))
    before = weights_hash(model)
    kw = {"encoder": encoder} if encoder != "auto" else {}
    m, d, p, t = cfgs(llama_dir, countries_csv, tmp_path / "a", method, lr=lr, keep_encoder=True, **kw)
    # Eight training rows, one batch of them: every step sees the same rows, so the losses compare.
    s = train(m, replace(d, limit=8), p, t, model=model, tok=tok, quiet=True)
    assert s["base_weights_unchanged"] and weights_hash(model) == before
    assert s["method"] == method and s["forward_path"] != "graphed"
    tr = losses(tmp_path / "a")
    assert len(tr) == 12 and tr[-1] < tr[0] - 0.02 and tr[-1] <= min(tr[:6]), tr  # it learned
    saved = load_prompt(tmp_path / "a", model)
    assert isinstance(saved, SoftPrompt) and saved.kind == "prompt" and saved.length == 4
    assert saved.meta["method"] == method and saved.meta["config"]["TrainConfig"]["method"] == method
    # The kept encoder, rebuilt from its file, produces exactly the saved prompt.
    cls = PTuning if method == "ptuning" else ResidualTuning
    fresh = setup_method(cls, model, tok, **kw)
    from safetensors.torch import load_file

    fresh.prompt.encoder.load_state_dict(load_file(str(tmp_path / "a" / ENCODER_FILE)))
    with torch.no_grad():
        assert torch.equal(fresh.prompt.input_embeds(), saved.embeds)
    assert s["trainable_params"] == sum(p.numel() for p in fresh.parameters())


def test_without_keep_encoder_only_the_prompt_is_written(llama_dir, countries_csv, tmp_path):
    s = train(*cfgs(llama_dir, countries_csv, tmp_path / "a", max_steps=4, keep_best=True), quiet=True)
    out = tmp_path / "a"
    assert not (out / ENCODER_FILE).exists() and not (out / "checkpoint").exists()  # nothing of the encoder
    assert load_prompt(out).meta["step"] == 4 and s["best_eval_metric"] == "loss"
    # The run folder is a run's: --overwrite replaces it (encoder.safetensors is a run file too).
    train(*cfgs(llama_dir, countries_csv, out, max_steps=2, keep_encoder=True, overwrite=True), quiet=True)
    assert (out / ENCODER_FILE).is_file()
    train(*cfgs(llama_dir, countries_csv, out, max_steps=2, overwrite=True), quiet=True)
    assert not (out / ENCODER_FILE).exists()


@pytest.mark.parametrize("method,encoder", [("ptuning", "lstm"), ("residual", "auto")])
def test_keep_encoder_resume_equals_uninterrupted(method, encoder, llama_dir, countries_csv, tmp_path):
    kw = dict(keep_encoder=True, lr=3e-3 if method == "ptuning" else 0.05,
              **({"encoder": encoder} if encoder != "auto" else {}))
    train(*cfgs(llama_dir, countries_csv, tmp_path / "a", method, **kw), quiet=True)
    part = train(*cfgs(llama_dir, countries_csv, tmp_path / "b", method, **kw), stop_after=5, quiet=True)
    assert part == {"interrupted_at": 5}  # the checkpoint at step 4 holds the encoder
    ckpt = tmp_path / "b" / "checkpoint"
    assert (ckpt / ENCODER_FILE).is_file() and load_prompt(ckpt).kind == "prompt"
    resumed = train(*cfgs(llama_dir, countries_csv, tmp_path / "b", method, resume=True, **kw), quiet=True)
    assert resumed["steps"] == 12
    a, b = load_prompt(tmp_path / "a").embeds, load_prompt(tmp_path / "b").embeds
    assert torch.allclose(a, b, atol=1e-6)
    assert losses(tmp_path / "b") == pytest.approx(losses(tmp_path / "a"), abs=1e-6)


def test_resume_refuses_another_encoder(llama_dir, countries_csv, tmp_path):
    train(*cfgs(llama_dir, countries_csv, tmp_path / "a", keep_encoder=True), stop_after=4, quiet=True)
    with pytest.raises(SoftpromptError, match="--encoder 'lstm' \\(was 'auto'\\)"):  # check_same_run's line
        train(*cfgs(llama_dir, countries_csv, tmp_path / "a", keep_encoder=True, encoder="lstm", resume=True),
              quiet=True)
    (tmp_path / "a" / "checkpoint" / ENCODER_FILE).unlink()
    with pytest.raises(SoftpromptError, match="holds no encoder.safetensors"):
        train(*cfgs(llama_dir, countries_csv, tmp_path / "a", keep_encoder=True, resume=True), quiet=True)


# ---------------------------------------------------------------- refusals

@pytest.mark.parametrize("method", ["prompt", "prefix", "full"])
@pytest.mark.parametrize("flags,named", [({"encoder": "lstm"}, "--encoder"),
                                         ({"encoder_hidden_size": 8}, "--encoder-hidden-size"),
                                         ({"keep_encoder": True}, "--keep-encoder")])
def test_encoder_flags_with_other_methods_are_refused(method, flags, named):
    with pytest.raises(SoftpromptError, match=f"^{named} is for --method ptuning"):
        TrainConfig(method=method, **flags)


def test_other_refusals_are_one_line(llama_dir, tok_dir, countries_csv, tmp_path, capsys):
    from softprompt.cli import main
    from softprompt.forward.paths import graph_obstacle

    with pytest.raises(SoftpromptError, match="--encoder is for --method ptuning"):
        TrainConfig(method="residual", encoder="mlp")  # residual's MLP is its own
    with pytest.raises(SoftpromptError, match="--resume: --method ptuning .* --keep-encoder"):
        TrainConfig(method="ptuning", resume=True)
    with pytest.raises(SoftpromptError, match="--encoder-hidden-size must be at least 0"):
        TrainConfig(method="ptuning", encoder_hidden_size=-1)
    assert TrainConfig(method="residual", shard="fsdp").shard == "fsdp"  # test_fsdp trains it sharded
    model, tok = tiny("llama", tok_dir)
    # A saved prompt starts the encoder's input (prompt transfer, tests/test_transfer.py); a missing one is one line.
    with pytest.raises(SoftpromptError, match="--init-file 'x': missing prompt file"):
        PTuning.setup(model, tok, PromptConfig(virtual_tokens=4, init="file", init_file="x"),
                      TrainConfig(method="ptuning"), [], "Act.", ":")
    # A CUDA graph replays a leaf prompt's step: on a GPU the encoder's run is not graphed.
    gpu = SimpleNamespace(device=torch.device("cuda"))
    assert graph_obstacle(gpu, 1, True, GRAPH_OBSTACLE) == GRAPH_OBSTACLE
    argv = ["train", "--model", str(llama_dir), "--data", str(countries_csv), "--template", "Country: {country}",
            "--target", " {capital}", "--out", str(tmp_path / "x")]
    for bad in (["--method", "prompt", "--encoder", "lstm"], ["--method", "full", "--keep-encoder"],
                ["--method", "prefix", "--encoder-hidden-size", "8"], ["--method", "ptuning", "--resume"]):
        assert main(argv + bad) == 2
        err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
        assert len(err) == 1 and "error" in err[0], (bad, err)
    assert not (tmp_path / "x").exists()


def test_residual_starts_from_a_saved_prompt(tok_dir, tmp_path):
    from softprompt.prompts.prompt import save_prompt

    model, tok = tiny("llama", tok_dir)
    start = SoftPrompt(torch.randn(4, 32) * 0.1)
    save_prompt(start, tmp_path / "p", {})
    method = ResidualTuning.setup(model, tok, PromptConfig(virtual_tokens=4, init="file", init_file=str(tmp_path / "p")),
                                  TrainConfig(method="residual"), [], "Act.", ":")
    assert torch.equal(method.prompt.input_embeds(), start.embeds)


# ---------------------------------------------------------------- PEFT interop

def peft_ptuning(model, kind: str, seed: int = 2, P: int = 4, **kw):
    """A PEFT P-tuning model on `model` with a random encoder and input embedding (training mode:
    its forward runs the encoder)."""
    from peft import PromptEncoderConfig, get_peft_model

    cfg = PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, encoder_reparameterization_type=kind,
                              **kw)
    pm = get_peft_model(model, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p_ in pm.prompt_encoder.parameters():
            p_.add_(torch.randn(p_.shape, generator=gen) * 0.1)
    return pm


@pytest.mark.parametrize("kind", ["MLP", "LSTM"])
def test_import_of_a_peft_ptuning_adapter_gives_pefts_loss(kind, tok_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from softprompt.prompts.peft_io import ADAPTER_WEIGHTS, export_peft, import_peft

    model, tok = tiny("llama", tok_dir)
    model.save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")  # PEFT records where it came from
    pm = peft_ptuning(model, kind, encoder_hidden_size=16)
    assert not pm.peft_config["default"].inference_mode  # PEFT's forward runs its encoder
    b = batch_of(tok)
    with torch.no_grad():
        ref = float(pm(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.targets).loss)
    pm.save_pretrained(tmp_path / "peft")
    assert list(load_file(str(tmp_path / "peft" / ADAPTER_WEIGHTS))) == ["prompt_embeddings"]  # PEFT's fold
    import_peft(tmp_path / "peft", tmp_path / "ours")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    ours = load_prompt(tmp_path / "ours", base)
    assert ours.kind == "prompt" and ours.meta["method"] == "ptuning" and ours.meta["model"] == str(tmp_path / "base")
    with torch.no_grad():
        s, n = batch_loss(base, ours, b)
        bare, _ = batch_loss(base, None, b)
    assert abs(float(s / n) - ref) < TOL
    assert abs(float(bare / n) - ref) > 1e-3  # the prompt matters

    # An adapter file of the encoder's own tensors (PEFT's PromptEncoder state_dict) is run here once.
    enc_dir = tmp_path / "peft-encoder"
    enc_dir.mkdir()
    (enc_dir / "adapter_config.json").write_text((tmp_path / "peft" / "adapter_config.json").read_text())
    save_file({k: v.contiguous() for k, v in pm.prompt_encoder["default"].state_dict().items()},
              str(enc_dir / ADAPTER_WEIGHTS))
    folded = load_prompt(import_peft(enc_dir, tmp_path / "ours2"))
    assert torch.allclose(folded.embeds, ours.embeds, atol=1e-6)

    # Its export is PEFT prompt tuning, whose forward (no encoder) gives the same loss.
    from peft import PeftModel

    export_peft(tmp_path / "ours", tmp_path / "back")
    cfg = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "PROMPT_TUNING"
    back = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "back")
    with torch.no_grad():
        again = float(back.eval()(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.targets).loss)
    assert abs(again - ref) < TOL


def test_import_refuses_an_encoder_that_does_not_fit(tok_dir, tmp_path):
    from safetensors.torch import save_file

    from softprompt.prompts.peft_io import ADAPTER_WEIGHTS, import_peft

    model, _ = tiny("llama", tok_dir)
    pm = peft_ptuning(model, "MLP", encoder_hidden_size=16)
    pm.save_pretrained(tmp_path / "peft")
    cfg_file = tmp_path / "peft" / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**cfg, "encoder_hidden_size": 8}))
    save_file({k: v.contiguous() for k, v in pm.prompt_encoder["default"].state_dict().items()},
              str(tmp_path / "peft" / ADAPTER_WEIGHTS))
    with pytest.raises(SoftpromptError, match="prompt encoder does not fit its adapter_config.json"):
        import_peft(tmp_path / "peft", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_trained_ptuning_prompt_exports_as_peft_prompt_tuning(llama_dir, countries_csv, tmp_path):
    """export-peft of a ptuning run: PEFT prompt tuning, no text init recorded (the encoder's input had it)."""
    from peft import PeftModel

    from softprompt.prompts.peft_io import export_peft

    train(*cfgs(llama_dir, countries_csv, tmp_path / "run", max_steps=3, eval_every=0), quiet=True)
    export_peft(tmp_path / "run", tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "PROMPT_TUNING" and cfg["prompt_tuning_init"] == "RANDOM"
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    pm = PeftModel.from_pretrained(model, tmp_path / "peft")
    ours = load_prompt(tmp_path / "run")
    assert torch.equal(pm.prompt_encoder["default"].embedding.weight.detach(), ours.embeds.detach())


# ---------------------------------------------------------------- the command, as a user runs it

@pytest.mark.slow
def test_cli_train_ptuning_then_eval(tmp_path, monkeypatch, capsys):
    from conftest import SHARED

    sp = str(Path(sys.executable).parent / "softprompt")
    src = str(Path(__file__).resolve().parents[1] / "src")  # this checkout's code, whichever one is installed
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p)}
    sst2 = SHARED / "sst2"
    data = ["--data", str(sst2 / "train.tsv"), "--template", r"Review: {sentence}\nSentiment:",
            "--labels", "negative,positive"]

    def run(*args):
        r = subprocess.run([sp, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, f"softprompt {' '.join(args)} exited {r.returncode}:\n{r.stderr[-3000:]}"
        return r

    run("train", "--method", "ptuning", "--encoder", "lstm", "--keep-encoder", *data, "--eval-data",
        str(sst2 / "dev.tsv"), "--max-steps", "2", "--batch-size", "2", "--max-length", "64", "--eval-limit", "8",
        "--out", "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["method"] == "ptuning" and summary["steps"] == 2
    assert (tmp_path / "run" / ENCODER_FILE).is_file()
    meta = json.loads((tmp_path / "run" / "prompt_config.json").read_text())
    assert (meta["kind"], meta["method"], meta["encoder"]) == ("prompt", "ptuning", "lstm")
    from softprompt.cli import main  # eval in this process: the installed command trained the folder above

    monkeypatch.chdir(tmp_path)
    assert main(["eval", "--prompt", "run", "--data", str(sst2 / "dev.tsv"), "--limit", "8", "--json"]) == 0
    scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scores["prompt"] == "run" and 0 <= scores["accuracy"] <= 1


@pytest.mark.slow
def test_two_processes_train_the_same_encoder_as_one(fork_python, llama_dir, countries_csv, tmp_path):
    """The encoder's gradient is all-reduced as a soft prompt's is: `torchrun --nproc_per_node 2`
    (gloo on CPU) gives the prompt one process gives with the same global batch."""
    from test_ddp import one_process, torchrun

    args = ["train", "--model", str(llama_dir), "--data", str(countries_csv), "--template", "Country: {country}\nFacts:",
            "--target", " capital={capital}", "--device", "cpu", "--dtype", "float32", "--batch-size", "4",
            "--max-steps", "4",
            "--eval-every", "0", "--save-every", "0", "--virtual-tokens", "3", "--init", "vocab",
            "--eval-fraction", "0", "--method", "ptuning", "--encoder", "lstm", "--lr", "1e-2"]
    one, two = tmp_path / "OUT1", tmp_path / "OUT2"
    one_process(args, one)
    torchrun(fork_python, "-m", "softprompt", *args, "--out", str(two), cwd=tmp_path)
    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    assert (s1["world_size"], s2["world_size"]) == (1, 2)
    p1, p2 = load_prompt(one).embeds.detach(), load_prompt(two).embeds.detach()
    assert (p1 - p2).abs().max() <= 1e-5
    from softprompt.base.models import load_model

    model, tok = load_model(str(llama_dir))
    start = PTuning.setup(model, tok, PromptConfig(virtual_tokens=3, init="vocab"),
                          TrainConfig(method="ptuning", encoder="lstm"), [], "", ":").prompt.folded().embeds
    assert (p1 - start).abs().max() > 1e-3  # it trained
