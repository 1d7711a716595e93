"""bench/quick_start.py: its recipe is the README's first command, flag for flag, and its dry run
(on the built-in model: the recipe's --loss classes needs label words of one token, which the tiny
test tokenizer splits) records the run's provenance, held-out evaluations and both dev evals."""
from __future__ import annotations

import json
import shlex
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))


def test_the_recipe_is_the_readme_s_first_command(tmp_path):
    from quick_start import recipe

    readme = (ROOT / "README.md").read_text()
    printed = readme[readme.index("softprompt train --data stanfordnlp/sst2"):].split("\n#")[0]
    flags = shlex.split(printed.replace("\\\n", " "))
    cmd = recipe("smollm2-135m-instruct", 500, 500, tmp_path / "sst2")
    # every flag the README prints, with its value, but the Hub data flags the local variant replaces
    pairs = {a: b for a, b in zip(flags, flags[1:]) if a.startswith("--") and a not in ("--data", "--eval-split",
                                                                                        "--out")}
    ours = dict(zip(cmd, cmd[1:]))
    assert {a: ours.get(a) for a in pairs} == pairs


@pytest.mark.slow
def test_dry_run_records_the_run_and_both_dev_evals(run_bench, tmp_path):
    out = tmp_path / "q.json"
    r = run_bench("quick_start.py", "--steps", "2", "--eval-limit", "4", "--dev-limit", "6", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert "bench/quick_start.py --steps 2" in doc["command"] and doc["commit"] and doc["machine"]
    assert doc["summary"]["steps"] == 2 and doc["summary"]["final_eval"]["n"] == 4
    assert [e["step"] for e in doc["held_out"] if e["split"] == "eval"] == [1, 2]
    assert doc["dev_tuned"]["n"] == doc["dev_untuned"]["n"] == 6 and doc["dev_untuned"]["prompt"] == "none"
    assert doc["machine_load"]["wall_seconds"] > 0
    assert "held-out accuracy" in r.stdout
