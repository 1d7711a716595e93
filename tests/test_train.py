"""The training loop: only the prompt learns, the base is bit-identical, resume equals uninterrupted,
the shared-prefix path follows the straightforward one, and bad input leaves nothing behind."""
import copy
import json
import math
import os
import shutil
from dataclasses import replace

import pytest
import torch

from softprompt.core.config import DataConfig, ModelConfig, PromptConfig, TrainConfig
from softprompt.core.utils import SoftpromptError, weights_hash
from softprompt.prompts.prompt import load_prompt
from softprompt.training.train import train


def _cfgs(model_dir, data, out, **tkw):
    # float32: the equivalences these runs check are float32's (auto may train in bf16 on a CPU with
    # native bf16; test_precision.py covers that)
    m = ModelConfig(model=str(model_dir), device="cpu", dtype="float32")
    d = DataConfig(data=str(data), template="Country: {country}\\nFacts:", target=" capital={capital}",
                   eval_fraction=0.1, max_length=32)
    p = PromptConfig(virtual_tokens=4, init="vocab")
    t = TrainConfig(out=str(out), lr=0.05, batch_size=8, max_steps=12, eval_every=6, save_every=4, log_every=1,
                    warmup_steps=2, seed=0)
    for k, v in tkw.items():
        setattr(t, k, v)
    return m, d, p, t


def test_training_learns_and_leaves_base_untouched(model_dir, countries_csv, tmp_path):
    from softprompt.base.models import load_model

    model, tok = load_model(str(model_dir))
    before = weights_hash(model)
    s = train(*_cfgs(model_dir, countries_csv, tmp_path / "run"), model=model, tok=tok, quiet=True)
    assert s["base_weights_unchanged"] and weights_hash(model) == before
    assert s["base_weights_sha256_before"] == s["base_weights_sha256_after"] == before
    assert s["trainable_params"] == 4 * model.config.hidden_size
    recs = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    tr = [r["loss"] for r in recs if r["split"] == "train"]
    ev = [r for r in recs if r["split"] == "eval"]
    assert len(tr) == 12 and len(ev) == 2
    if "llama" in str(model_dir):  # the tiny random BLOOM is near-uniform: too little signal to check
        assert sum(tr[-3:]) < sum(tr[:3])  # it learned something
    out = tmp_path / "run"
    for f in ("prompt.safetensors", "prompt_config.json", "run_config.json", "summary.json", "loss.png"):
        assert (out / f).is_file(), f
    meta = load_prompt(out, model).meta
    assert meta["model"] == str(model_dir) and meta["template"] == "Country: {country}\\nFacts:"
    assert meta["config"]["PromptConfig"]["virtual_tokens"] == 4


def test_resume_equals_uninterrupted(llama_dir, countries_csv, tmp_path):
    full = train(*_cfgs(llama_dir, countries_csv, tmp_path / "a", keep_best=False), quiet=True)
    part = train(*_cfgs(llama_dir, countries_csv, tmp_path / "b", keep_best=False), stop_after=5, quiet=True)
    assert part == {"interrupted_at": 5}  # checkpoint at step 4 is the latest; steps 5.. redone
    # Before the first evaluation (step 6) there is no best score: strict JSON's null, not -Infinity.
    text = (tmp_path / "b" / "checkpoint" / "state.json").read_text()
    state = json.loads(text, parse_constant=lambda c: pytest.fail(f"state.json is not strict JSON: {c}"))
    assert state["step"] == 4 and state["best"] is None
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:  # a kill or a full disk mid-write: a traceback on resume
        f.write('{"step": 5, "split": "tr')
    resumed = train(*_cfgs(llama_dir, countries_csv, tmp_path / "b", keep_best=False, resume=True), quiet=True)
    assert resumed["steps"] == full["steps"] == 12
    a, b = load_prompt(tmp_path / "a").embeds, load_prompt(tmp_path / "b").embeds
    assert torch.equal(a, b)
    la = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    lb = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    strip = lambda ls: [{k: v for k, v in json.loads(l).items() if k != "seconds"} for l in ls]
    assert strip(la) == strip(lb)
    # The records a user (and `push`'s model card) reads keep the untuned model's and the last scores,
    # also when a finished run is resumed again and evaluates nothing more.
    for _ in range(2):
        sb = json.loads((tmp_path / "b" / "summary.json").read_text())
        for key in ("final_eval", "untuned_eval"):
            assert sb[key] == full[key] and full[key] is not None, key
        # (the prompt's record as the metrics log rounds it: 6 significant digits)
        assert load_prompt(tmp_path / "b").meta["eval"] == pytest.approx(load_prompt(tmp_path / "a").meta["eval"],
                                                                         rel=1e-5)
        train(*_cfgs(llama_dir, countries_csv, tmp_path / "b", keep_best=False, resume=True), quiet=True)


@pytest.mark.parametrize("kind", ["llama", "bloom"])
def test_shared_prefix_trajectory_matches_straightforward(kind, llama_dir, bloom_dir, countries_csv, tmp_path):
    d = llama_dir if kind == "llama" else bloom_dir
    runs = {}
    for shared in (True, False):
        train(*_cfgs(d, countries_csv, tmp_path / str(shared), max_steps=20, eval_every=0, save_every=0,
                     keep_best=False, forward_path="auto" if shared else "concat"), quiet=True)
        runs[shared] = [json.loads(l)["loss"] for l in (tmp_path / str(shared) / "metrics.jsonl").read_text()
                        .splitlines() if json.loads(l)["split"] == "train"]
    a, b = runs[True], runs[False]
    assert abs(a[0] - b[0]) / b[0] < 1e-5
    assert all(abs(x - y) / y < 1e-3 for x, y in zip(a, b))


def test_classes_loss_and_adafactor(llama_dir, countries_csv, tmp_path):
    m, d, p, t = _cfgs(llama_dir, countries_csv, tmp_path / "c", loss="classes", optimizer="adafactor",
                       max_steps=6)
    d.template, d.target, d.labels, d.label_col = "Country: {country}\\nEurope:", "", "capital,language", "europe"
    p.init = "labels"
    s = train(m, d, p, t, quiet=True)
    assert s["steps"] == 6 and 0 <= s["final_eval"]["accuracy"] <= 1


def test_early_stopping(llama_dir, countries_csv, tmp_path):
    s = train(*_cfgs(llama_dir, countries_csv, tmp_path / "e", lr=1e-9, eval_every=1, patience=2, max_steps=50),
              quiet=True)
    assert s["stopped_early"] and s["steps"] < 50


@pytest.mark.parametrize("change,msg", [
    (lambda d, p, t: setattr(d, "data", "/nonexistent/x.csv"), "missing data file"),
    (lambda d, p, t: setattr(d, "template", "{nope}"), "column 'nope' not found"),
    (lambda d, p, t: setattr(p, "init", "file") or setattr(p, "init_file", "/nonexistent"), "missing prompt file"),
    (lambda d, p, t: setattr(t, "resume", True), "no checkpoint"),
    (lambda d, p, t: setattr(t, "lr", -1e-3), "--lr >= 0"),
])
def test_bad_input_leaves_no_output(llama_dir, countries_csv, tmp_path, change, msg):
    m, d, p, t = _cfgs(llama_dir, countries_csv, tmp_path / "out")
    change(d, p, t)
    with pytest.raises(SoftpromptError, match=msg):
        train(m, d, p, t, quiet=True)
    assert not (tmp_path / "out").exists()


def test_auto_choices_resolve_for_the_task_and_are_saved(model_dir, tmp_path):
    """--init auto / --loss auto / --lr 0: label-word init, the label softmax and lr 1e-2 for
    classification with one-token words; text init, the LM loss and lr 3e-2 otherwise; 2e-5 for full
    fine-tuning; an explicit --lr stays. The run records the resolved values."""
    from softprompt.data.formatting import Formatter
    from softprompt.base.models import load_model

    model, tok = load_model(str(model_dir))
    rows = "".join(f"{t},{l}\n" for t, l in [("good fun", 1), ("bad film", 0), ("fine work", 1), ("dull plot", 0)] * 5)
    data = tmp_path / "cls.csv"
    data.write_text("text,label\n" + rows)
    d = DataConfig(data=str(data), template="Review: {text}\\nSentiment:", labels="America,language", eval_fraction=0.2)
    cand = Formatter(d, tok).label_ids("Sentiment:")
    assert all(len(c) == 1 for c in cand), "premise: the label words are one token each"
    run = tmp_path / "cls"
    s = train(ModelConfig(model=str(model_dir), device="cpu"), d, PromptConfig(virtual_tokens=3),
              TrainConfig(out=str(run), method="prompt", max_steps=2, save_every=0, batch_size=4), model=model,
              tok=tok, quiet=True)
    cfg = json.loads((run / "run_config.json").read_text())
    assert cfg["PromptConfig"]["init"] == "labels" and cfg["TrainConfig"]["loss"] == "classes"
    assert cfg["TrainConfig"]["lr"] == s["lr"] == 1e-2
    assert load_prompt(run).meta["init"] == "labels"
    lm = DataConfig(data=str(data), template="Review: {text}", eval_fraction=0.2)
    train(ModelConfig(model=str(model_dir), device="cpu"), lm, PromptConfig(virtual_tokens=3),
          TrainConfig(out=str(tmp_path / "lm"), method="prompt", max_steps=1, save_every=0, batch_size=4), model=model,
          tok=tok, quiet=True)
    cfg = json.loads((tmp_path / "lm" / "run_config.json").read_text())
    assert cfg["PromptConfig"]["init"] == "text" and cfg["TrainConfig"]["loss"] == "lm"
    assert cfg["TrainConfig"]["lr"] == 3e-2
    s = train(ModelConfig(model=str(model_dir), device="cpu"), d, PromptConfig(virtual_tokens=3),
              TrainConfig(out=str(tmp_path / "own"), max_steps=1, save_every=0, batch_size=4, lr=0.2),
              model=model, tok=tok, quiet=True)
    assert s["lr"] == 0.2
    s = train(ModelConfig(model=str(model_dir), device="cpu"), d, PromptConfig(virtual_tokens=3),
              TrainConfig(out=str(tmp_path / "full"), max_steps=1, save_every=0, batch_size=4, method="full"),
              model=copy.deepcopy(model), tok=tok, quiet=True)
    assert s["lr"] == 2e-5


def test_method_auto_trains_a_prefix_unless_a_flag_needs_a_soft_prompt(model_dir, tmp_path):
    """The default --method auto: a prefix (init text), recorded with its reason; a soft prompt where
    --init or --forward-path asks for input embeddings; on --resume, the method the run started with."""
    from softprompt.training.auto_method import resolve_method

    def resolved(tcfg=None, **prompt):
        t, why = resolve_method(PromptConfig(**prompt), tcfg or TrainConfig())
        return t.method, why

    assert resolved()[0] == "prefix" and "measured best" in resolved()[1]
    assert resolved(init="labels") == ("prompt", "auto: --init labels starts a soft prompt only")
    assert resolved(init="vocab")[0] == "prompt" and resolved(init="text")[0] == "prefix"
    assert resolved(TrainConfig(forward_path="packed"))[0] == "prompt"
    assert resolved(TrainConfig(forward_path="kv"))[0] == "prefix"
    assert resolved(TrainConfig(method="residual"), init="labels") == ("residual", "as requested")
    assert resolved(TrainConfig(prefix_projection=True), init="random")[0] == "prefix"
    assert resolved(TrainConfig(prefix_scaled_steps=False)) == ("prefix",
                                                               "auto: --no-prefix-scaled-steps trains a prefix")
    old = tmp_path / "old"
    old.mkdir()
    (old / "run_config.json").write_text(json.dumps({"TrainConfig": {"method": "prompt"}}))
    assert resolved(TrainConfig(out=str(old), resume=True)) == ("prompt", "auto: the method of the run being resumed")

    from softprompt.base.models import load_model

    model, tok = load_model(str(model_dir))
    data = tmp_path / "lm.csv"
    data.write_text("text\n" + "".join(f"row {i} of plain text\n" for i in range(12)))
    s = train(ModelConfig(model=str(model_dir), device="cpu"), DataConfig(data=str(data), text_col="text"),
              PromptConfig(virtual_tokens=3), TrainConfig(out=str(tmp_path / "run"), max_steps=1, save_every=0,
                                                          batch_size=4), model=model, tok=tok, quiet=True)
    cfg = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert cfg["TrainConfig"]["method"] == "prefix" == s["method"] and cfg["PromptConfig"]["init"] == "text"
    assert cfg["method_reason"].startswith("auto: a prefix")
    assert load_prompt(tmp_path / "run").kind == "prefix"


def test_auto_loss_falls_back_to_lm_when_label_tokens_differ_by_row(model_dir, tmp_path):
    """Inputs that end differently (a trailing space on some) tokenise the label words differently,
    so one shared label softmax does not exist: auto picks the LM loss instead of failing."""
    from softprompt.data.formatting import Formatter, load_splits
    from softprompt.forward.classify import row_candidates
    from softprompt.base.models import load_model

    model, tok = load_model(str(model_dir))
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": l}) + "\n"
                            for t, l in [("good fun", 1), ("bad film ", 0), ("fine work", 1), ("dull plot ", 0)] * 5))
    d = DataConfig(data=str(data), template="{text}", labels="America,language", eval_fraction=0.2)
    _, train_ex, _ = load_splits(d, tok)
    assert len({tuple(map(tuple, c)) for c in row_candidates(Formatter(d, tok), train_ex)}) == 2, "premise"
    run = tmp_path / "mixed"
    train(ModelConfig(model=str(model_dir), device="cpu"), d, PromptConfig(virtual_tokens=3),
          TrainConfig(out=str(run), max_steps=1, save_every=0, batch_size=4), model=model, tok=tok, quiet=True)
    assert json.loads((run / "run_config.json").read_text())["TrainConfig"]["loss"] == "lm"
    with pytest.raises(SoftpromptError, match="tokenise differently"):
        train(ModelConfig(model=str(model_dir), device="cpu"), d, PromptConfig(virtual_tokens=3),
              TrainConfig(out=str(tmp_path / "cls"), max_steps=1, save_every=0, batch_size=4, loss="classes"),
              model=model, tok=tok, quiet=True)


def test_resume_after_a_save_killed_between_its_renames(llama_dir, countries_csv, tmp_path):
    """A kill inside atomic_dir's replace left the new checkpoint in .checkpoint.tmp-*, the one before
    in .checkpoint.old-* and no checkpoint/: --resume said "no checkpoint" beside two whole copies.
    It resumes from the new one, and no killed save's folder stays behind (a partial one neither)."""
    full = train(*_cfgs(llama_dir, countries_csv, tmp_path / "a", keep_best=False), quiet=True)
    train(*_cfgs(llama_dir, countries_csv, tmp_path / "b", keep_best=False), stop_after=5, quiet=True)
    b = tmp_path / "b"
    shutil.copytree(b / "checkpoint", b / ".checkpoint.tmp-new")
    os.replace(b / "checkpoint", b / ".checkpoint.old-was")
    (b / ".checkpoint.tmp-part").mkdir()
    (b / ".checkpoint.tmp-part" / "optimizer.pt").write_bytes(b"cut short")
    resumed = train(*_cfgs(llama_dir, countries_csv, b, keep_best=False, resume=True), quiet=True)
    assert resumed["steps"] == full["steps"] == 12
    assert torch.equal(load_prompt(tmp_path / "a").embeds, load_prompt(b).embeds)
    assert (b / "checkpoint" / "state.json").is_file() and not list(b.glob(".checkpoint.*"))


def test_used_out_is_refused_unless_resume_or_overwrite(llama_dir, countries_csv, tmp_path, capsys):
    """Issue 17 row 10: a folder holding a finished run is not overwritten silently; --overwrite
    replaces all of it (no old checkpoint left beside the new prompt); --resume continues it."""
    from softprompt.cli import main

    out = tmp_path / "run"
    m, d, p, t = _cfgs(llama_dir, countries_csv, out, max_steps=4, eval_every=0, save_every=2)
    train(m, d, p, t, quiet=True)
    before = {f.relative_to(out): f.read_bytes() for f in out.rglob("*") if f.is_file()}
    assert (out / "checkpoint" / "state.json").is_file() and len(before) > 6
    with pytest.raises(SoftpromptError, match="already holds files .*--resume .*--overwrite"):
        train(m, d, p, t, quiet=True)
    argv = ["train", "--model", str(llama_dir), "--data", str(countries_csv), "--template", "Country: {country}",
            "--max-steps", "1", "--out", str(out), "--device", "cpu"]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("softprompt: error: --out ") and "already holds files" in err[0]
    assert {f.relative_to(out): f.read_bytes() for f in out.rglob("*") if f.is_file()} == before  # untouched
    # A run stopped before its first checkpoint: --resume, which it cannot take, is not advised.
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    shutil.copy(out / "run_config.json", stopped / "run_config.json")
    (stopped / "metrics.jsonl").write_text("")
    with pytest.raises(SoftpromptError, match=r"with no checkpoint to resume\?\): pass --overwrite") as e:
        train(m, d, p, replace(t, out=str(stopped)), quiet=True)
    assert "--resume" not in str(e.value)

    # --overwrite: a new run with another prompt length and no checkpoint replaces every old file.
    p6 = PromptConfig(virtual_tokens=6, init="vocab")
    train(m, d, p6, TrainConfig(**{**t.__dict__, "overwrite": True, "save_every": 0, "max_steps": 2}), quiet=True)
    assert not (out / "checkpoint").exists()
    assert load_prompt(out).num_tokens == 6
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["split"] == "train"] == [1, 2] and max(r["step"] for r in recs) == 2
    with pytest.raises(SoftpromptError, match="no checkpoint"):  # was: a shape mismatch on the stale one
        train(m, d, p6, TrainConfig(**{**t.__dict__, "resume": True}), quiet=True)

    # A file no run writes is never deleted.
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SoftpromptError, match="holds notes.txt, which no run writes"):
        train(m, d, p6, TrainConfig(**{**t.__dict__, "overwrite": True}), quiet=True)
    assert (out / "notes.txt").read_text() == "mine" and load_prompt(out).num_tokens == 6
    with pytest.raises(SoftpromptError, match="give one of them"):
        TrainConfig(out=str(out), resume=True, overwrite=True)


def test_resume_refuses_a_checkpoint_that_does_not_fit(llama_dir, countries_csv, tmp_path):
    """--resume with another prompt length, or over a damaged checkpoint: one clear error, not a
    shape mismatch or a JSON traceback."""
    out = tmp_path / "run"
    m, d, p, t = _cfgs(llama_dir, countries_csv, out, max_steps=4, eval_every=0, save_every=2)
    train(m, d, p, t, stop_after=2, quiet=True)
    resume = TrainConfig(**{**t.__dict__, "resume": True})
    with pytest.raises(SoftpromptError, match=r"defined otherwise: --virtual-tokens 6 \(was 4\)"):  # issue 27 N8
        train(m, d, PromptConfig(virtual_tokens=6, init="vocab"), resume, quiet=True)
    # A value that auto (here lr 0: the method's own rate) chose is said to be auto's choice, not the user's.
    with pytest.raises(SoftpromptError, match=r"defined otherwise: --lr [0-9.e-]+ \(was 0\.05; --lr 0\.0 chose it "
                                              r"for this run\); resume it"):
        train(m, d, p, TrainConfig(**{**resume.__dict__, "lr": 0.0}), quiet=True)
    (out / "run_config.json").unlink()  # a run without its record: the checkpoint's own shape check
    with pytest.raises(SoftpromptError, match=r"holds a prompt of shape \[4, 32\], this run's is \[6, 32\]"):
        train(m, d, PromptConfig(virtual_tokens=6, init="vocab"), resume, quiet=True)
    (out / "checkpoint" / "state.json").write_text("{not json")
    with pytest.raises(SoftpromptError, match="corrupt JSON in .*state.json"):
        train(m, d, p, resume, quiet=True)


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
@pytest.mark.parametrize("warmup", [0, 3])
def test_schedule_is_transformers_entered_one_step_in(schedule, warmup):
    """train.make_scheduler (transformers.get_scheduler) gives the schedule softprompt has always
    used: warm-up (s+1)/(W+1) of the peak, never a step at lr 0, then linear/cosine decay to 0 at
    the last step; a scheduler restored from its state_dict goes on with the same values."""
    import math

    from softprompt.training.train import make_scheduler

    total, peak = 12, 0.1

    def want(s):
        if s < warmup:
            return (s + 1) / (warmup + 1)
        frac = (s - warmup) / max(1, total - warmup)
        return {"linear": 1 - frac, "cosine": 0.5 * (1 + math.cos(math.pi * frac)), "constant": 1.0}[schedule]

    cfg = TrainConfig(schedule=schedule, warmup_steps=warmup, save_every=0)
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p], lr=peak)
    sched = make_scheduler(cfg, opt, total)
    got = []
    for s in range(total):
        got.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
        if s == 4:  # a resumed run builds a fresh scheduler and loads the saved state
            opt2 = torch.optim.AdamW([p], lr=peak)
            sched2 = make_scheduler(cfg, opt2, total)
            opt2.load_state_dict(opt.state_dict())  # in rundir.load_checkpoint's order
            sched2.load_state_dict(sched.state_dict())
            opt, sched = opt2, sched2
    assert got == pytest.approx([peak * want(s) for s in range(total)], rel=1e-12, abs=1e-15)
    assert min(got) > 0


def test_resume_of_a_checkpoint_saved_before_the_shifted_schedule(llama_dir, countries_csv, tmp_path):
    """Checkpoints written before train.make_scheduler counted the scheduler one step fewer (same
    learning rate in the optimiser), and before state.json was strict JSON: resuming one still gives
    the uninterrupted run's prompt."""
    full = train(*_cfgs(llama_dir, countries_csv, tmp_path / "a", keep_best=False), quiet=True)
    train(*_cfgs(llama_dir, countries_csv, tmp_path / "b", keep_best=False), stop_after=5, quiet=True)
    f = tmp_path / "b" / "checkpoint" / "scheduler.pt"
    sd = torch.load(f, weights_only=True)
    sd["last_epoch"] -= 1  # the old layout: last_epoch == step
    torch.save(sd, f)
    state = f.parent / "state.json"  # and no best score yet written as Python's -Infinity
    state.write_text(state.read_text().replace('"best": null', '"best": -Infinity'))
    assert "-Infinity" in state.read_text()
    resumed = train(*_cfgs(llama_dir, countries_csv, tmp_path / "b", keep_best=False, resume=True), quiet=True)
    assert resumed["steps"] == full["steps"]
    assert torch.equal(load_prompt(tmp_path / "a").embeds, load_prompt(tmp_path / "b").embeds)


def test_auto_method_s_torch_free_lists_match_what_a_prefix_takes():
    """auto_method keeps its own copies (train checks flags before torch loads); they must not drift."""
    from softprompt.forward.paths import DEEP_PATHS
    from softprompt.training import auto_method
    from softprompt.training.prefix_method import PrefixTuning

    assert auto_method.PREFIX_INITS == ("auto", *PrefixTuning.inits) and auto_method.DEEP_PATHS == DEEP_PATHS


def test_relative_model_and_data_paths_are_recorded_as_paths_from_anywhere(llama_dir, countries_csv, tmp_path,
                                                                           monkeypatch, capsys):
    """`--model FOLDER` and `--data FILE` (a --mix task's too) typed relative record their absolute paths:
    the run replays from another folder, export-peft's base_model_name_or_path finds the base, and a
    command given the folder by another path does not warn that the prompt was trained for another base.
    A run recorded before (the paths as typed) still resumes."""
    from softprompt.cli import main

    monkeypatch.chdir(llama_dir.parent)
    data = os.path.relpath(countries_csv)
    task = {"data": data, "template": "Capital: {capital}\\nCountry:", "target": " {country}"}
    args = ["train", "--model", llama_dir.name, "--data", data, "--mix", json.dumps(task),
            "--template", "Country: {country}\\nFacts:", "--target", " capital={capital}", "--method", "prompt",
            "--max-steps", "2", "--warmup-steps", "0",
            "--batch-size", "4", "--virtual-tokens", "3", "--eval-fraction", "0", "--no-eval-untuned",
            "--save-every", "2", "--device", "cpu", "--dtype", "float32"]
    run = tmp_path / "run"
    assert main([*args, "--out", str(run)]) == 0
    record = json.loads((run / "run_config.json").read_text())
    meta = json.loads((run / "prompt_config.json").read_text())
    assert record["ModelConfig"]["model"] == meta["model"] == str(llama_dir)
    assert record["DataConfig"]["data"] == record["DataConfig"]["mix"][0]["data"] == str(countries_csv)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", str(run / "run_config.json"), "--out", str(tmp_path / "again")]) == 0
    assert torch.equal(load_prompt(run).embeds, load_prompt(tmp_path / "again").embeds)
    assert main(["export-peft", str(run), str(tmp_path / "peft")]) == 0
    adapter = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(llama_dir)
    capsys.readouterr()
    assert main(["eval", "--model", str(llama_dir), "--prompt", str(run), "--data", str(countries_csv), "--limit", "4",
                 "--device", "cpu"]) == 0
    assert "trained for" not in capsys.readouterr().err
    record["ModelConfig"]["model"] = llama_dir.name  # as runs recorded them before
    record["DataConfig"]["data"] = record["DataConfig"]["mix"][0]["data"] = data
    (run / "run_config.json").write_text(json.dumps(record))
    monkeypatch.chdir(llama_dir.parent)
    assert main([*args, "--out", str(run), "--resume"]) == 0


def test_the_run_says_its_plan_and_scores_a_large_held_out_set_less_often(llama_dir, countries_csv, tmp_path,
                                                                           capsys):
    """Before its first step a run says what it will do (a long run on a large file was silent for
    minutes, hunt 9); --eval-every auto is every 50 steps, or as seldom as keeps scoring the held-out
    rows to about a fifth of the run, and the record holds the number it chose."""
    from softprompt.cli import main
    from softprompt.training.train import eval_stride

    assert (eval_stride(8, 87), eval_stride(8, 1000), eval_stride(16, 1000), eval_stride(8, 240)) == (50, 209, 105, 50)
    out = tmp_path / "run"
    assert main(["train", "--model", str(llama_dir), "--device", "cpu", "--data", str(countries_csv), "--template",
                 "Country: {country}\\nEurope:", "--labels", "no,yes", "--label-col", "europe", "--max-steps", "2",
                 "--batch-size", "4", "--warmup-steps", "0", "--out", str(out)]) == 0
    record = json.loads((out / "run_config.json").read_text())
    n_train, n_eval = record["train_examples"], record["eval_examples"]
    assert record["TrainConfig"]["eval_every"] == 50
    loss, lr = record["TrainConfig"]["loss"], record["TrainConfig"]["lr"]
    assert (f"training prefix (classification, {loss} loss, lr {lr:g}) on {n_train} rows, {n_eval} held out, "
            "scored at the end: "  # the stride of 50 passes the run's end
            f"2 steps at batch 4 ({2 / math.ceil(n_train / 4):.2g} epochs)") in capsys.readouterr().err


def test_resume_refuses_data_that_now_gives_other_rows_and_replays_an_old_large_hold_out(llama_dir, countries_csv,
                                                                                          tmp_path):
    """A run whose data file changed since gave other batches on --resume without a word: the rows it
    gives are compared with the record's. A record from before at most 1000 rows were held out replays
    (and resumes) holding out as many as it did."""
    from softprompt.core.config import as_it_ran

    data = tmp_path / "data.csv"
    shutil.copy(countries_csv, data)
    m, d, p, t = _cfgs(llama_dir, data, tmp_path / "run", max_steps=4, eval_every=0, save_every=2)
    assert train(m, d, p, t, stop_after=2, quiet=True) == {"interrupted_at": 2}
    with open(data, "a") as f:
        f.write("Atlantis,Poseidonia,Europe,1\n")
    with pytest.raises(SoftpromptError, match=r"the data now gives \d+ training and \d+ held-out rows, and the run"):
        train(m, d, p, replace(t, resume=True), quiet=True)
    record = {"forward_path_taken": "kv", "TrainConfig": {"method": "prompt"}, "eval_examples": 6735,
              "DataConfig": {"data": "big.csv", "eval_data": "", "eval_split": "", "eval_limit": 0, "mix": []}}
    assert as_it_ran(record)["DataConfig"]["eval_limit"] == 6735
    for later in ({"eval_examples": 1000}, {"DataConfig": {**record["DataConfig"], "eval_data": "dev.csv"}}):
        assert as_it_ran({**record, **later}).get("DataConfig", {}).get("eval_limit") == 0


def test_label_words_of_several_tokens_say_why_the_loss_is_the_vocabulary_s(llama_dir, countries_csv, tmp_path):
    """RTE's not_entailment or AG News's Sci/Tech switched --loss auto to the vocabulary loss (and its
    lr) without a word (hunt 9)."""
    from softprompt.core.utils import SoftpromptWarning

    m, d, p, t = _cfgs(llama_dir, countries_csv, tmp_path / "run", max_steps=1, eval_every=0, warmup_steps=0)
    d = DataConfig(data=str(countries_csv), template="Country: {country}\\nEurope:", labels="no way,yes indeed",
                   label_col="europe")
    # ... and name them (hunt 12: which of AG News's four words was it?)
    with pytest.warns(SoftpromptWarning, match=r"label words of several tokens \('no way' \(\d tokens\), 'yes indeed' "
                                               r"\(\d tokens\)\), so the loss is the whole vocabulary's"):
        s = train(m, d, p, t, quiet=True)
    with pytest.raises(SoftpromptError, match=r"--loss classes needs label words that are one token each: 'no way' "):
        train(m, d, p, replace(t, loss="classes", out=str(tmp_path / "classes")), quiet=True)
    assert json.loads((tmp_path / "run" / "run_config.json").read_text())["TrainConfig"]["loss"] == "lm"
    assert s["steps"] == 1


def test_a_label_word_no_training_row_has_is_warned_of(llama_dir, countries_csv, tmp_path):
    """--labels a,b,c on 0/1 data trained and scored a 3-way classifier without a word (hunt 9)."""
    from softprompt.core.utils import SoftpromptWarning

    m, d, p, t = _cfgs(llama_dir, countries_csv, tmp_path / "run", max_steps=1, eval_every=0, warmup_steps=0)
    d = DataConfig(data=str(countries_csv), template="Country: {country}\\nEurope:", labels="no,yes,maybe",
                   label_col="europe")
    with pytest.warns(SoftpromptWarning, match="no training row has the label word.s. 'maybe', yet each is a class"):
        train(m, d, p, replace(t, loss="lm"), quiet=True)


def test_the_built_in_model_s_cache_folder_is_recorded_as_the_built_in(llama_dir, countries_csv, tmp_path,
                                                                       monkeypatch, capsys):
    """Hunt 10: a prompt trained from Python on the built-in model loaded from its own cache folder recorded
    that path (one machine's cache: nothing on another, where a pushed prompt goes), and serving or
    evaluating it on the built-in by name warned that it was trained for another model. The folder is now
    recorded as the built-in's name, and a prompt that recorded the path does not warn either."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import softprompt
    from softprompt.cli import main

    monkeypatch.setenv("SOFTPROMPT_CACHE", str(tmp_path / "cache"))
    cached = tmp_path / "cache" / "models" / "smollm2-135m-instruct"
    shutil.copytree(llama_dir, cached)  # a tiny stand-in: the same files the conversion writes
    base = AutoModelForCausalLM.from_pretrained(cached)
    softprompt.train(model=base, tokenizer=AutoTokenizer.from_pretrained(cached), data=str(countries_csv),
                     template="Country: {country}\\nFacts:", target=" capital={capital}", max_steps=1,
                     warmup_steps=0, batch_size=4, virtual_tokens=3, eval_fraction=0, out=str(tmp_path / "run"))
    meta = json.loads((tmp_path / "run" / "prompt_config.json").read_text())
    assert meta["model"] == "smollm2-135m-instruct"
    meta["model"] = str(cached)  # as such runs recorded it before
    (tmp_path / "old").mkdir()
    shutil.copy(tmp_path / "run" / "prompt.safetensors", tmp_path / "old")
    (tmp_path / "old" / "prompt_config.json").write_text(json.dumps(meta))
    # hunt 11: and one trained on another machine, whose cache path is not on this one
    shutil.copytree(tmp_path / "old", tmp_path / "alice")
    (tmp_path / "alice" / "prompt_config.json").write_text(json.dumps(
        {**meta, "model": "/home/alice/.cache/softprompt/models/smollm2-135m-instruct"}))
    capsys.readouterr()
    for prompt in ("run", "old", "alice"):
        assert main(["eval", "--model", "smollm2-135m-instruct", "--prompt", str(tmp_path / prompt), "--data",
                     str(countries_csv), "--limit", "4", "--device", "cpu"]) == 0
        assert "trained for" not in capsys.readouterr().err, prompt
        # without --model: the base it records, the built-in
        assert main(["eval", "--prompt", str(tmp_path / prompt), "--data", str(countries_csv), "--limit", "4",
                     "--device", "cpu"]) == 0, capsys.readouterr().err
        # export-peft names the built-in by its Hub id, as PEFT users elsewhere resolve it (hunt 11)
        assert main(["export-peft", str(tmp_path / prompt), str(tmp_path / f"{prompt}-peft")]) == 0
        adapter = json.loads((tmp_path / f"{prompt}-peft" / "adapter_config.json").read_text())
        assert adapter["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct", prompt


def test_the_loss_plot_compares_one_measure_and_names_the_method(llama_dir, countries_csv, tmp_path):
    """Hunt 12: loss.png drew the vocabulary loss a run trained on beside the held-out label-word loss as
    one "cross-entropy", titled "soft prompt training" for a prefix, without the untuned accuracy; and
    the plan line said "scored every 50 steps" of a 30-step run."""
    from softprompt.training.rundir import plotted
    from softprompt.training.train import plan, setup

    m, d, p, t = _cfgs(llama_dir, countries_csv, tmp_path / "run", max_steps=3, eval_every=50, warmup_steps=0)
    d = DataConfig(data=str(countries_csv), template="Country: {country}\\nEurope:", labels="no way,yes indeed",
                   label_col="europe", eval_limit=4)
    t, p = replace(t, method="prefix", loss="lm", eval_untuned=True), replace(p, init="text")
    run = setup(m, d, p, t)
    run.lock.release()  # only its plan is wanted
    assert "scored at the end: 3 steps" in plan(run) and "no checkpoints" not in plan(run)
    run.method.resumable = False  # as ptuning and residual without --keep-encoder: --save-every did nothing, unsaid
    assert plan(run).endswith("; no checkpoints: an interrupted run starts over")
    train(m, d, p, replace(t, overwrite=True), quiet=True)
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    drawn = plotted(tmp_path / "run")
    assert drawn["title"] == "prefix training (lm loss)"
    assert drawn["held_out"] == [(r["step"], r["lm_loss"]) for r in evals if r["split"] == "eval"]
    assert drawn["untuned_accuracy"] == 100 * next(r["accuracy"] for r in evals if r["split"] == "eval_untuned")
