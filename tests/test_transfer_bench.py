"""bench/transfer.py's dry run on the tiny random Llama: every (method, rows, init, seed) row is
written, and a rerun skips the rows its result file holds (the lead runs the real sizes); the
summary's means, spreads and gains over seeds."""
from __future__ import annotations

import json
import statistics
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
from transfer import summarise  # noqa: E402


def dry_run(run_bench, llama_dir, tmp_path, *extra: str):
    return run_bench("transfer.py", "--model", f"random:{llama_dir}", "--device", "cpu", "--methods", "prompt",
                     "--steps", "1", "--source-steps", "1", "--source-limit", "16", "--sizes", "8", "--eval-limit", "4",
                     "--seeds", "0", "--max-length", "48", "--virtual-tokens", "2", "--batch-size", "4",
                     "--out", str(tmp_path / "t.json"), "--workdir", str(tmp_path / "w"), *extra)


def test_dry_run_writes_every_row_and_resumes(run_bench, llama_dir, tmp_path):
    first = dry_run(run_bench, llama_dir, tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    rows = json.loads((tmp_path / "t.json").read_text())["rows"]
    assert [(r["method"], r["rows"], r["init"], r["seed"]) for r in rows] == \
        [("prompt", 8, init, 0) for init in ("fresh", "sst2", "mixture")]
    assert all(r["train_examples"] == 8 and 0 <= r["accuracy"] <= 1 for r in rows)
    mix = json.loads((tmp_path / "w" / "source_mixture_prompt" / "run_config.json").read_text())
    assert len(mix["DataConfig"]["mix"]) == 1 and mix["train_examples"] == 32  # each task capped at 16 rows
    again = dry_run(run_bench, llama_dir, tmp_path)
    assert again.returncode == 0 and '"init": "fresh"' not in again.stdout  # nothing measured twice
    doc = json.loads((tmp_path / "t.json").read_text())
    assert doc["rows"] == rows
    cells = doc["summary"]["prompt"]["8"]
    assert cells["sst2"]["gain_points"] == pytest.approx(100 * (rows[1]["accuracy"] - rows[0]["accuracy"]))
    assert "gain_points" not in cells["fresh"] and cells["fresh"]["n"] == 1
    assert "prompt         8   mixture" in again.stdout


def test_inits_split_the_grid_and_train_only_the_sources_they_need(run_bench, llama_dir, tmp_path):
    proc = dry_run(run_bench, llama_dir, tmp_path, "--inits", "fresh", "mixture")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((tmp_path / "t.json").read_text())["rows"]
    assert [r["init"] for r in rows] == ["fresh", "mixture"]
    assert sorted(p.name for p in (tmp_path / "w").glob("source_*")) == ["source_mixture_prompt"]


def test_summary_averages_seeds_and_measures_gains_against_the_fresh_mean():
    def row(size, init, seed, acc):
        return {"method": "prefix", "rows": size, "init": init, "seed": seed, "accuracy": acc}
    rows = [row(500, "fresh", 0, 0.60), row(500, "fresh", 1, 0.56), row(500, "sst2", 0, 0.63),
            row(500, "sst2", 1, 0.65), row(500, "sst2", 2, 0.58), row("all", "sst2", 0, 0.62),
            row("all", "mixture", 0, None)]  # a row whose evaluation failed counts nowhere
    s = summarise(rows)["prefix"]
    assert s["500"]["fresh"] == {"mean": pytest.approx(0.58), "std": pytest.approx(statistics.stdev([0.60, 0.56])),
                                 "n": 2}
    assert s["500"]["sst2"]["n"] == 3 and s["500"]["sst2"]["mean"] == pytest.approx(0.62)
    assert s["500"]["sst2"]["gain_points"] == pytest.approx(4.0)
    assert s["all"] == {"sst2": {"mean": 0.62, "std": 0.0, "n": 1}}  # no fresh cell: no gain to state
