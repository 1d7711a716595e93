"""bench/gpu_check.sh is what runs on a lent GPU: under 15 minutes of device time a session can
start the machine, run the `first` call and rerun it, or run `first` then the shorter `second`; each
call's step limits fit its timeout with room for its set-up, and it returns at most the 8 files the
device tool brings back; it says which commit it measured, and every step of both calls runs here on
CPU through the same command lines (`dry-run`: tiny sizes, tiny random models, nothing installed)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
DEVICE_TIME_S = 15 * 60  # a session's device time, the machine's start and every call included
START_S = 120            # a machine's start: "a minute or more"
FILES_BACK = 8           # the device tool brings back at most 8 files from $OUT
SETUP_S = {"first": 60, "second": 40}  # first unpacks and installs the wheels; second rebuilds the model
# Every bench the script runs records its provenance (bench/common.py's Results)
PREFIX = "train_speed_prefix_smollm2-135m-geometry_dry_cpu.json"  # issue 23: --method prefix beside prompt
WITH_PROVENANCE = [PREFIX, "train_speed_smollm2-135m-geometry_dry_cpu.json", "train_speed_llama-3.2-1b-geometry_b64_dry_cpu.json",
                   "train_speed_llama-3.2-1b-geometry_2048_dry_cpu.json", "train_speed_llama-3.1-8b-geometry_dry_cpu.json",
                   "generate_speed_smollm2-135m-instruct_dry_cpu.json"]
OUTPUTS = WITH_PROVENANCE


def function_body(function: str) -> str:
    return re.search(rf"^{function}\(\) \{{[^\n]*\n(.*?)^\}}", SCRIPT.read_text(), re.S | re.M).group(1)


def step_limits(function: str) -> dict[str, int]:
    """NAME -> seconds of each `step NAME LIMIT ...` line in a shell function of the script."""
    limits = {}
    for name, limit in re.findall(r"^\s*step (\S+) (\S+) ", function_body(function), re.M):
        default = re.fullmatch(r'"?\$\{\w+:-(\d+)\}"?', limit)
        limits[name] = int(default.group(1) if default else limit)
    return limits


def call_seconds(call: str) -> int:
    """The call's timeout_s, as the script declares it (FIRST_CALL_S=..., SECOND_CALL_S=...)."""
    return int(re.search(rf"^{call.upper()}_CALL_S=(\d+)", SCRIPT.read_text(), re.M).group(1))


def test_the_calls_fit_the_session_device_time():
    first, second = call_seconds("first"), call_seconds("second")
    assert first <= 360 and second <= 240, (first, second)
    assert START_S + 2 * first <= DEVICE_TIME_S  # the first call can be rerun once on the same machine
    assert START_S + first + second <= DEVICE_TIME_S - 60  # both calls, with a minute for the transfers


@pytest.mark.parametrize("call", ["first", "second"])
def test_each_call_s_steps_fit_its_timeout(call):
    limits = step_limits(f"{call}_steps")
    assert len(limits) >= 2, limits
    assert sum(limits.values()) <= call_seconds(call) - SETUP_S[call], limits


def test_the_first_call_measures_the_targets_first():
    # The targets lead, so that a call cut short by its budget loses the least that matters
    assert list(step_limits("first_steps"))[:3] == ["train_smol", "train_l1b_b64", "train_smol_prefix"]
    assert list(step_limits("second_steps"))[0] == "gen_bf16"


@pytest.mark.parametrize("call", ["first", "second"])
def test_each_call_returns_at_most_eight_files(call):
    # one result file per step plus the logs' archive, all of which the device tool brings back
    outputs = re.findall(r'--out "\$OUT/[^"/]+"', function_body(f"{call}_steps"))
    assert len(outputs) == len(step_limits(f"{call}_steps"))
    assert len(outputs) + 1 <= FILES_BACK


def test_pack_checks_the_carry_limit_with_room_to_spare():
    text = SCRIPT.read_text()
    limit = int(re.search(r"^PACK_LIMIT_MB=(\d+)", text, re.M).group(1))
    assert limit <= 58  # 6 MiB (10%) under what a call carries
    assert re.search(r'\[ "\$mb" -le "\$PACK_LIMIT_MB" \] \|\| \{ echo "ERROR', text)


def test_the_gpu_calls_install_nothing_from_the_network():
    text = SCRIPT.read_text()
    for mode in ("first", "second", "dry-run"):
        body = re.search(rf"^{mode}\)[^\n]*\n(.*?)^    ;;", text, re.S | re.M).group(1)
        for line in body.splitlines():
            if "pip install" in line:
                assert "--no-index" in line, line


@pytest.mark.slow
def test_the_dry_run_runs_every_step_on_cpu(fork_python, tmp_path):
    # The two calls side by side, one per core (each step is mostly one process's start-up)
    runs = {half: subprocess.Popen(["bash", str(SCRIPT), "dry-run", half], cwd=ROOT, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   env={**os.environ, "OUT": str(tmp_path / "out"), "WORK": str(tmp_path / half),
                                        "PY": fork_python})
            for half in ("first", "second")}
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


def run_step_function(deadline_in_s: int, tmp_path, command: str = "true") -> str:
    """The script's `step` on its own, `step demo 100 COMMAND`, with the call's deadline that far ahead."""
    step = re.search(r"^step\(\) \{.*?^\}\n", SCRIPT.read_text(), re.S | re.M).group(0)
    (tmp_path / "logs").mkdir(exist_ok=True)
    script = (f"{step}T0=$(date +%s) FAILED=0 LIMIT_SCALE=1 WORK={tmp_path}\n"
              f"DEADLINE=$(( T0 + {deadline_in_s} ))\nstep demo 100 {command}\necho FAILED=$FAILED\n")
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60).stdout


def test_a_step_is_cut_to_the_call_s_budget_or_skipped_past_it(tmp_path):
    # A call ends before the device tool's timeout_s, so that it still returns its files
    assert "rc=0" in (out := run_step_function(600, tmp_path)) and "cut" not in out and "FAILED=0" in out
    assert "limit 100s cut to the call's" in (out := run_step_function(30, tmp_path)) and "rc=0" in out
    out = run_step_function(5, tmp_path)
    assert "skipped: the call's budget is spent" in out and "rc=" not in out and "FAILED=1" in out
    t = time.monotonic()  # the cut is real: a step that would run 40 s is stopped at the deadline
    out = run_step_function(11, tmp_path, "sleep 40")
    assert "rc=124" in out and "FAILED=1" in out and time.monotonic() - t < 25, out


def test_second_on_a_fresh_machine_stops_with_one_error_line(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work")}
    run = subprocess.run(["bash", str(SCRIPT), "second"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=30)
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr.count("\n") == 1 and "ERROR:" in run.stderr and "after `first`" in run.stderr, run.stderr
