"""bench/cpu_bf16.py's dry run on the tiny Llama: the matmul and attention rows, one SST-2 and one
awesome-chatgpt-prompts (held-out loss) row per dtype through the command line (one method, to keep
it short), and the summary computed from them; then, in this process with the training runs faked,
bf16 alone paired with that file's float32 run (--pair-with), and a second seed added to that
(--pair-with copies the seeds it does not redo).
AG News, a classifier as SST-2 is, runs through the same rows; its own part is the split of its
training-side file into a fixed dev part, checked without a run."""
from __future__ import annotations

import json
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))


SMALL = ["--steps", "2", "--eval-limit", "8", "--train-limit", "64"]  # a dry run's sizes


def test_ag_news_holds_out_the_same_thousand_rows_for_every_run(tmp_path):
    from common import AG_LABELS, task_data

    for d in "ab":
        (tmp_path / d).mkdir()
    spec = task_data("ag_news", tmp_path / "a")
    assert task_data("ag_news", tmp_path / "b")["template"] == spec["template"]
    read = {part: [json.loads(line) for line in open(spec[key])] for part, key in (("train", "data"),
                                                                                   ("dev", "eval_data"))}
    again = [json.loads(line) for line in open(tmp_path / "b" / "ag_dev.jsonl")]
    # every row of the 10,001 once: a fixed thousand held out, the rest to train on
    assert len(read["dev"]) == 1000 and read["dev"] == again and len(read["train"]) == 9001
    assert spec["labels"] == "world,sports,business,science" and len(AG_LABELS) == 4
    assert {r["label"] for r in read["dev"]} == set(range(4))


@pytest.mark.slow
def test_dry_run_writes_every_row_and_the_summary(run_bench, llama_dir, tmp_path, monkeypatch):
    out = tmp_path / "b.json"
    r = run_bench("cpu_bf16.py", "--model", str(llama_dir), "--tasks", "sst2", "acts",
                  "--methods", "prefix", "--seeds", "0", *SMALL, "--hidden", "64",
                  "--tokens", "16", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert "bench/cpu_bf16.py --model" in doc["command"] and doc["commit"] and doc["machine"]
    kinds = [row["kind"] for row in doc["rows"]]
    assert kinds == ["matmul", "attention", "sst2", "sst2", "acts", "acts"]
    attention = doc["rows"][1]
    assert all(attention[f"{m}_ms"] > 0 for m in ("float32", "bfloat16", "bfloat16_in_float32"))
    runs, lm = doc["rows"][2:4], doc["rows"][4:]
    assert [(x["method"], x["dtype"]) for x in runs] == [("prefix", "float32"), ("prefix", "bfloat16")]
    assert all(x["dev_rows"] == 8 and x["steps"] == 2 and x["train_seconds"] > 0 for x in runs)
    assert set(doc["summary"]) == {"sst2", "acts"}
    fp32, bf16 = runs
    s = doc["summary"]["sst2"]["prefix"]
    assert s["bf16_train_speedup"] == pytest.approx(fp32["train_seconds"] / bf16["train_seconds"])
    points = 100 * (bf16["dev_accuracy"] - fp32["dev_accuracy"])
    assert s["bf16_minus_fp32_points"] == pytest.approx(points)
    assert s["per_seed_points"] == {"0": pytest.approx(points)}
    # the bf16 prompt scored again in float32, as `softprompt eval` scores it by default on a CPU
    assert fp32["dev_accuracy_float32"] == fp32["dev_accuracy"] and 0 <= bf16["dev_accuracy_float32"] <= 1
    in_fp32 = 100 * (bf16["dev_accuracy_float32"] - fp32["dev_accuracy"])
    assert s["bf16_minus_fp32_points_scored_in_float32"] == pytest.approx(in_fp32)
    assert s["per_seed_points_scored_in_float32"] == {"0": pytest.approx(in_fp32)}
    # language modelling: a held-out loss, both prompts scored in float32
    assert all(x["dev_scored_in"] == "float32" and x["dev_loss"] > 0 and x["dev_tokens"] > 0 for x in lm)
    assert lm[0]["dev_tokens"] == lm[1]["dev_tokens"]
    s = doc["summary"]["acts"]["prefix"]
    assert s["bf16_minus_fp32_loss"] == pytest.approx(lm[1]["dev_loss"] - lm[0]["dev_loss"])
    # --pair-with, in this process: the training runs are faked (the real ones ran above), so that what
    # is checked is how rows are paired and copied, not another few minutes of training.
    again = pair_again(tmp_path, monkeypatch, "--dtypes", "bfloat16", "--pair-with", str(out), "--out",
                       str(tmp_path / "again.json"))
    old, new = again["rows"]
    assert old["dtype"] == "float32" and old["from"].startswith("b.json at ")
    assert old["dev_accuracy"] == runs[0]["dev_accuracy"] == old["dev_accuracy_float32"]
    assert old["train_seconds"] == runs[0]["train_seconds"]
    assert "bf16_minus_fp32_points_scored_in_float32" in again["summary"]["sst2"]["prefix"]
    assert new["dtype"] == "bfloat16" and "from" not in new
    s = again["summary"]["sst2"]["prefix"]
    assert s["bf16_train_speedup"] == pytest.approx(old["train_seconds"] / new["train_seconds"])
    assert s["per_seed_points"]["0"] == pytest.approx(100 * (new["dev_accuracy"] - old["dev_accuracy"]))
    # a second seed, both dtypes, added to the first one's pair: the summary spans seeds 0 and 1
    more = pair_again(tmp_path, monkeypatch, "--seeds", "1", "--pair-with", str(tmp_path / "again.json"),
                      "--out", str(tmp_path / "more.json"))
    assert [(x["seed"], x["dtype"]) for x in more["rows"]] == [(0, "float32"), (0, "bfloat16"), (1, "float32"),
                                                               (1, "bfloat16")]
    assert more["rows"][0]["from"] == old["from"] and more["rows"][1]["from"].startswith("again.json at ")
    s = more["summary"]["sst2"]["prefix"]
    assert set(s["per_seed_points"]) == {"0", "1"}
    assert s["per_seed_points"]["0"] == again["summary"]["sst2"]["prefix"]["per_seed_points"]["0"]
    # another step count pairs with nothing: the old runs are not copied in
    other = pair_again(tmp_path, monkeypatch, "--dtypes", "bfloat16", "--steps", "3", "--pair-with",
                       str(out), "--out", str(tmp_path / "other.json"))
    assert [x["dtype"] for x in other["rows"]] == ["bfloat16"] and other["summary"] == {}


def pair_again(tmp_path, monkeypatch, *argv: str) -> dict:
    """bench/cpu_bf16.py's main in this process on SST-2's prefix rows, each training run faked as one
    that trained in 1 s (bf16) or 2 s (float32) and scored 0.5 plus a hundredth per seed."""
    import cpu_bf16

    def fake_run(args, task, method, dtype, seed, work):
        acc = 0.5 + seed / 100 + (dtype == "bfloat16") / 1000
        return {"kind": task, "method": method, "dtype": dtype, "seed": seed, "steps": args.steps,
                "train_limit": args.train_limit, "train_seconds": 1.0 if dtype == "bfloat16" else 2.0,
                "dev_accuracy": acc, "dev_rows": 8, "dev_accuracy_float32": acc}

    monkeypatch.setattr(cpu_bf16, "task_run", fake_run)
    base = ["--tasks", "sst2", "--methods", "prefix", "--seeds", "0", *SMALL, "--hidden", "--tokens"]
    monkeypatch.setattr(sys, "argv", ["bench/cpu_bf16.py", *base, *argv])
    cpu_bf16.main()
    return json.loads(open(argv[argv.index("--out") + 1]).read())
