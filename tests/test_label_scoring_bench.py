"""bench/label_scoring.py on the tiny Llama, in this process: a few RTE rows scored both ways (each
(row, label word) pair alone, and label_scores' one pass per row) after a soft prompt and after a
prefix; the two agree, and the record carries its provenance. Timings mean nothing at this size."""
from __future__ import annotations

import json
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))


def test_both_ways_score_rte_alike_after_both_prompt_kinds(llama_dir, tmp_path, monkeypatch):
    import label_scoring

    out = tmp_path / "ls.json"
    monkeypatch.setattr(sys, "argv", ["bench/label_scoring.py", "--model", str(llama_dir), "--rows", "6",
                                      "--batch-size", "4", "--repeats", "1", "--out", str(out)])
    label_scoring.main()
    doc = json.loads(out.read_text())
    assert doc["command"].startswith("python bench/label_scoring.py --model") and doc["commit"]
    assert doc["machine"]["cpu_model"] and doc["warmup"]
    assert max(doc["label_tokens"]) > 1  # the premise: label words of several tokens
    assert [r["prompt_kind"] for r in doc["rows"]] == ["prompt", "prefix"]
    for r in doc["rows"]:
        assert r["rows"] == 6 and r["text_tokens"] > 6
        assert r["same_argmax"] and r["max_abs_diff"] < 1e-4, r
        assert r["per_pair_s"] > 0 and r["label_scores_s"] > 0
        assert r["speedup"] == r["per_pair_s"] / r["label_scores_s"]
