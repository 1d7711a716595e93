"""bench/gpu_check.sh is what runs on a lent GPU: its steps fit two calls of at most 8 minutes, it
says which commit it measured, and every step of `speed` and `quality` runs here on CPU through
the same command lines (`dry-run`: tiny sizes, tiny random models, nothing installed)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
CALL_LIMIT_S = 8 * 60
# Every bench the script runs records its provenance (bench/common.py's Results)
PREFIX = "train_speed_prefix_smollm2-135m-geometry_dry_cpu.json"  # issue 23: --method prefix beside prompt
WITH_PROVENANCE = ["profile_step_smollm2-135m-geometry_dry_cpu.json", "time_to_quality_dry_cpu.json", PREFIX,
                   "train_speed_smollm2-135m-geometry_dry_cpu.json", "train_speed_llama-3.2-1b-geometry_b64_dry_cpu.json",
                   "train_speed_llama-3.2-1b-geometry_2048_dry_cpu.json", "train_speed_llama-3.1-8b-geometry_dry_cpu.json",
                   "generate_speed_smollm2-135m-instruct_dry_cpu.json", "generate_speed_smollm2-135m-instruct_fp32_cpu.json"]
OUTPUTS = WITH_PROVENANCE


def step_limits(function: str) -> dict[str, int]:
    """NAME -> seconds of each `step NAME LIMIT ...` line in a shell function of the script."""
    text = SCRIPT.read_text()
    body = re.search(rf"^{function}\(\) \{{\n(.*?)^\}}", text, re.S | re.M).group(1)
    limits = {}
    for name, limit in re.findall(r"^\s*step (\S+) (\S+) ", body, re.M):
        default = re.fullmatch(r'"?\$\{\w+:-(\d+)\}"?', limit)
        limits[name] = int(default.group(1) if default else limit)
    return limits


@pytest.mark.parametrize("function", ["speed_steps", "quality_steps"])
def test_each_call_fits_eight_minutes(function):
    limits = step_limits(function)
    assert len(limits) >= 3, limits
    # the GPU machine also unpacks, installs from the carried wheels and (quality) rebuilds the model
    assert sum(limits.values()) <= CALL_LIMIT_S - 60, limits


def test_pack_checks_the_carry_limit_with_room_to_spare():
    text = SCRIPT.read_text()
    limit = int(re.search(r"^PACK_LIMIT_MB=(\d+)", text, re.M).group(1))
    assert limit <= 58  # 6 MiB (10%) under what a call carries
    assert re.search(r'\[ "\$mb" -le "\$PACK_LIMIT_MB" \] \|\| \{ echo "ERROR', text)


def test_the_gpu_calls_install_nothing_from_the_network():
    text = SCRIPT.read_text()
    for mode in ("speed", "quality", "dry-run"):
        body = re.search(rf"^{mode}\)[^\n]*\n(.*?)^    ;;", text, re.S | re.M).group(1)
        for line in body.splitlines():
            if "pip install" in line:
                assert "--no-index" in line, line


@pytest.mark.slow
def test_the_dry_run_runs_every_step_on_cpu(tmp_path):
    # The two calls' halves side by side, one per core (each step is mostly one process's start-up)
    runs = {half: subprocess.Popen(["bash", str(SCRIPT), "dry-run", half], cwd=ROOT, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   env={**os.environ, "OUT": str(tmp_path / "out"), "WORK": str(tmp_path / half),
                                        "PY": sys.executable})
            for half in ("speed", "quality")}
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    for half, proc in runs.items():
        stdout, stderr = proc.communicate(timeout=1500)
        assert proc.returncode == 0, stdout[-4000:] + stderr[-2000:]
        assert f"measuring: commit {head} dirty " in stdout
        names = set(step_limits(f"{half}_steps"))
        assert sorted(re.findall(r"^== (\S+) ", stdout, re.M)) == sorted(names)
        assert stdout.count("rc=0") == len(names)
    out = tmp_path / "out"
    for name in OUTPUTS:
        assert (out / name).is_file(), sorted(p.name for p in out.iterdir())
    for name in WITH_PROVENANCE:
        doc = json.loads((out / name).read_text())
        assert doc["command"].startswith("python bench/") and doc["commit"].startswith(head), doc["command"]
        assert doc["machine"]["cores"] and doc["warmup"]
        assert doc.get("attn_implementation"), name
    # The prefix step times PEFT's PrefixTuning, and its float32 loss equals softprompt's from the same start
    prefix = json.loads((out / PREFIX).read_text())
    assert prefix["method"] == "prefix" and "--method prefix" in prefix["command"]
    (row,) = prefix["tasks"]
    assert row["task"] == "sst2" and {"peft", "peft_best", "softprompt"} <= set(row)
    assert row["fp32_parity"]["equal"] and row["same_batches"]["loss_rel_diff_step1"] < 1e-12
