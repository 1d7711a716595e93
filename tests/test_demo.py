"""`softprompt demo`, the README's first command, as a user runs it: the installed command in a
subprocess on the built-in model, a few steps; it trains the default method (a prefix), reports the
held-out loss before and after, and sets the tuned model's generations beside the untuned ones."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
SP = str(Path(sys.executable).parent / "softprompt")


def test_demo_trains_the_default_method_and_compares_generations(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run([SP, "demo", "--max-steps", "3", "--out", str(tmp_path / "demo")], env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "--warmup-steps" not in r.stderr  # a flag demo does not have
    out = r.stdout
    assert "held-out loss of the untuned model" in out and "held-out loss with the tuned prompt" in out
    baseline = [l.split(":", 1)[1] for l in out.splitlines() if l.startswith("--- baseline:")]
    tuned = [l.split(":", 1)[1] for l in out.splitlines() if l.startswith("--- tuned:")]
    assert len(baseline) == len(tuned) == 6
    assert tuned != baseline  # the tuned rows are decoded with the prefix, not without a prompt
    cfg = json.loads((tmp_path / "demo" / "run_config.json").read_text())
    assert cfg["TrainConfig"]["method"] == "prefix" and cfg["method_reason"].startswith("auto:")
    # Run again (`make demo` twice), it replaces its own last run; another run's folder it refuses at once.
    # (in this process: the first run above is the installed command; this one checks the replacing)
    from softprompt.cli import main

    assert main(["demo", "--max-steps", "2", "--out", str(tmp_path / "demo")]) == 0
    assert json.loads((tmp_path / "demo" / "summary.json").read_text())["steps"] == 2
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "summary.json").write_text("{}")
    r = subprocess.run([SP, "demo", "--out", str(tmp_path / "other")], env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 2 and "already holds files that no demo wrote: pass --overwrite" in r.stderr
    assert "Loading" not in r.stderr  # refused before the model loads
