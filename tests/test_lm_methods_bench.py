"""bench/lm_methods.py's dry run on the tiny Llama: each method trained by the command with train's
default held-out split and keep-best, scored by `eval` on the task's fixed held-out fifth, and the
summary's prefix-minus-prompt figures computed from those rows."""
from __future__ import annotations

import json

import pytest

from conftest import run_bench


@pytest.mark.slow
def test_dry_run_scores_each_method_on_the_held_out_fifth(llama_dir, tmp_path):
    out = tmp_path / "l.json"
    r = run_bench("lm_methods.py", "--model", str(llama_dir), "--tasks", "acts", "quotes", "--seeds", "0",
                  "--steps", "2", "--eval-limit", "8", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert "bench/lm_methods.py --model" in doc["command"] and doc["commit"] and doc["machine"]
    assert [(x["task"], x["method"]) for x in doc["rows"]] == [("acts", "prefix"), ("acts", "prompt"),
                                                              ("quotes", "prefix"), ("quotes", "prompt")]
    for x in doc["rows"]:
        assert x["dev_loss"] > 0 and x["dev_tokens"] > 0 and x["steps"] == 2
        assert x["best_eval_loss"] > 0  # train held out a tenth and kept the best prompt
        assert x["eval_dtype"] == x["dtype"]
    prefix, prompt = doc["rows"][0], doc["rows"][1]
    assert prefix["trainable_params"] > prompt["trainable_params"]
    s = doc["summary"]["acts"]
    assert s["seeds"] == [0] and s["mean_dev_loss"]["prefix"] == prefix["dev_loss"]
    assert s["prefix_minus"]["prompt"]["per_seed"]["0"] == pytest.approx(prefix["dev_loss"] - prompt["dev_loss"])
    # the two corpora's held-out rows differ: the same prompt scores differently on them
    assert doc["rows"][2]["dev_tokens"] != prefix["dev_tokens"]
    # It resumes: the rows already in --out are kept as they are, and only the missing ones run.
    r = run_bench("lm_methods.py", "--model", str(llama_dir), "--tasks", "acts", "--methods", "prefix", "--seeds",
                  "0", "1", "--steps", "2", "--eval-limit", "8", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    again = json.loads(out.read_text())
    assert again["rows"][:4] == doc["rows"]
    assert [(x["task"], x["method"], x["seed"]) for x in again["rows"][4:]] == [("acts", "prefix", 1)]
    assert all(x["commit"] == again["commit"] and x["cpu_model"] for x in again["rows"][4:])
    # The summary is the file's: quotes and prompt too, over the seeds both methods have run.
    assert set(again["summary"]) == {"acts", "quotes"} and again["summary"]["acts"] == doc["summary"]["acts"]
    # Rows of another setting are not mixed in.
    r = run_bench("lm_methods.py", "--model", str(llama_dir), "--tasks", "acts", "--seeds", "0", "--steps", "3",
                  "--eval-limit", "8", "--out", str(out))
    assert r.returncode != 0 and "holds rows of another run (model" in r.stderr
    assert json.loads(out.read_text()) == again
