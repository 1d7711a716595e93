"""bench/lm_methods.py's dry run on the tiny Llama: each method trained by the command with train's
default held-out split and keep-best, scored by `eval` on the task's fixed held-out fifth, and the
summary's prefix-minus-prompt figures computed from those rows. Resuming a file (more tasks, more
seeds) runs in this process with the training runs faked: what it checks is which rows are kept,
added and summarised, not more minutes of training."""
from __future__ import annotations

import json
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))


def test_each_corpus_holds_out_its_own_fixed_fifth(tmp_path):
    from common import task_data

    for d in "ab":
        (tmp_path / d).mkdir()
    specs = {task: task_data(task, tmp_path / "a") for task in ("acts", "quotes")}
    again = task_data("quotes", tmp_path / "b")
    lines = {task: {part: open(spec[key]).read().splitlines() for part, key in (("train", "data"),
                                                                                ("dev", "eval_data"))}
             for task, spec in specs.items()}
    for task, parts in lines.items():
        assert len(parts["dev"]) == (len(parts["dev"]) + len(parts["train"])) // 5 > 0, task
        assert not set(parts["dev"]) & set(parts["train"]), task
    assert open(again["eval_data"]).read().splitlines() == lines["quotes"]["dev"]  # the same fifth every run
    assert '"author"' in lines["quotes"]["dev"][0] and '"act"' in lines["acts"]["dev"][0]
    assert specs["quotes"]["template"] == "Quote: {content}\nAuthor: {author}"


@pytest.mark.slow
def test_dry_run_scores_each_method_on_the_held_out_fifth(run_bench, llama_dir, tmp_path, monkeypatch):
    out = tmp_path / "l.json"
    r = run_bench("lm_methods.py", "--model", str(llama_dir), "--tasks", "acts", "--seeds", "0",
                  "--steps", "2", "--eval-limit", "8", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert "bench/lm_methods.py --model" in doc["command"] and doc["commit"] and doc["machine"]
    assert [(x["task"], x["method"]) for x in doc["rows"]] == [("acts", "prefix"), ("acts", "prompt")]
    for x in doc["rows"]:
        assert x["dev_loss"] > 0 and x["dev_tokens"] > 0 and x["steps"] == 2
        assert x["best_eval_loss"] > 0  # train held out a tenth and kept the best prompt
        assert x["eval_dtype"] == x["dtype"]
    prefix, prompt = doc["rows"]
    assert prefix["trainable_params"] > prompt["trainable_params"]
    s = doc["summary"]["acts"]
    assert s["seeds"] == [0] and s["mean_dev_loss"]["prefix"] == prefix["dev_loss"]
    assert s["prefix_minus"]["prompt"]["per_seed"]["0"] == pytest.approx(prefix["dev_loss"] - prompt["dev_loss"])

    # resumed with a second task: the file's rows are kept, the new task's added, both summarised
    more = resume(monkeypatch, llama_dir, out, "--tasks", "acts", "quotes", "--seeds", "0")
    assert more["rows"][:2] == doc["rows"]
    assert [(x["task"], x["method"], x["seed"]) for x in more["rows"][2:]] == [("quotes", "prefix", 0),
                                                                             ("quotes", "prompt", 0)]
    assert set(more["summary"]) == {"acts", "quotes"} and more["summary"]["acts"] == doc["summary"]["acts"]
    assert more["summary"]["quotes"]["prefix_minus"]["prompt"]["mean"] == pytest.approx(-0.5)
    # and with a second seed of one method: that row alone runs; the summary keeps the seeds both ran
    again = resume(monkeypatch, llama_dir, out, "--tasks", "acts", "--methods", "prefix", "--seeds", "0", "1")
    assert again["rows"][:4] == more["rows"]
    assert [(x["task"], x["method"], x["seed"]) for x in again["rows"][4:]] == [("acts", "prefix", 1)]
    assert all(x["commit"] == again["commit"] and x["cpu_model"] for x in again["rows"][4:])
    assert again["summary"] == more["summary"]
    # rows of another step count are not mixed into the file
    with pytest.raises(SystemExit, match=r"holds rows of another run \(model"):
        resume(monkeypatch, llama_dir, out, "--tasks", "acts", "--seeds", "0", "--steps", "3")
    assert json.loads(out.read_text()) == again


def resume(monkeypatch, llama_dir, out, *argv: str) -> dict:
    """bench/lm_methods.py's main in this process on `out`, each training run faked: the prefix's dev
    loss 1.0 and the prompt's 1.5, plus a tenth per seed."""
    import lm_methods

    def fake_run(args, task, method, seed, work):
        loss = (1.0 if method == "prefix" else 1.5) + seed / 10
        return {"task": task, "method": method, "seed": seed, "steps": args.steps, "dtype": "float32",
                "train_seconds": 1.0, "best_eval_loss": loss, "dev_loss": loss, "dev_tokens": 100}

    monkeypatch.setattr(lm_methods, "task_run", fake_run)
    monkeypatch.setattr(sys, "argv", ["bench/lm_methods.py", "--model", str(llama_dir), "--steps", "2",
                                      "--eval-limit", "8", "--out", str(out), *argv])
    lm_methods.main()
    return json.loads(out.read_text())
