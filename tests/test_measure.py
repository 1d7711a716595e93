"""measure.PeakMemory on the CPU: the resident high-water mark above the phase's start.

The CPU figures are the whole process's resident memory, so the two tests that read them run their
phase in a fresh interpreter: a pytest worker carries what earlier test files left (threads, heap,
maps), and twice in clean-clone runs (never alone, beside a second process, or after any single
test file in one process) the spike test read 256 MB for a 128 MB spike. A failure prints the
phase's own record: its threads and the mark after every allocation, which name the cause.
"""
import json
import subprocess
import sys
import time

import pytest
import torch

from softprompt.training.measure import PeakMemory

PRELUDE = """
import json, threading, torch
from softprompt.training.measure import PeakMemory, peak_rss
torch.set_num_threads(1)
marks = []  # the mark above the phase's start after each allocation, MB
"""
REPORT = """
print(json.dumps({"extra_mb": mem.extra_mb, "kernel_peak": mem.kernel_peak, "start_mb": mem.start / 2**20,
                  "marks_mb": marks, "threads": [t.name for t in threading.enumerate()]}))
"""
MARK = "marks.append(round(((peak_rss() or 0) - mem.start) / 2**20, 1))  # no mark off Linux: 0"


def run_phase(script: str) -> dict:
    """Run `script` (which measures a phase as `mem`) in a fresh interpreter: the phase's record."""
    done = subprocess.run([sys.executable, "-c", PRELUDE + script + REPORT], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_cpu_peak_counts_what_the_phase_allocated_and_not_what_it_freed_before():
    rec = run_phase(f"""
before = torch.ones(64 * 2**20 // 4)  # 64 MB, freed before the phase: not counted
del before
with PeakMemory(torch.device("cpu")) as mem:
    x = torch.ones(256 * 2**20 // 4)  # 256 MB, written, so resident
    del x
    {MARK}
""")
    assert 240 <= rec["extra_mb"] <= 300, rec


def test_cpu_peak_catches_a_spike_shorter_than_any_sampling_interval():
    # 128 MB touched and freed in well under 10 ms of wall time would slip between samples; the
    # kernel's high-water mark cannot miss it. The 256 MB freed before the phase is what a mark that
    # did not reset would report.
    rec = run_phase(f"""
before = torch.ones(256 * 2**20 // 4)
del before
with PeakMemory(torch.device("cpu")) as mem:
    for _ in range(3):
        x = torch.empty(128 * 2**20, dtype=torch.uint8)
        x[:: 4096] = 1  # one write per page makes every page resident
        del x
        {MARK}
""")
    if not rec["kernel_peak"]:
        pytest.skip("no /proc/self/clear_refs here: the peak is sampled")
    assert 120 <= rec["extra_mb"] <= 160, rec


def test_a_mark_that_does_not_reset_falls_back_to_sampling_instead_of_counting_an_earlier_phase(monkeypatch):
    import psutil

    from softprompt.training import measure
    stale = psutil.Process().memory_info().rss + 512 * 2**20  # an earlier phase's 512 MB the reset left
    monkeypatch.setattr(measure, "peak_rss", lambda: stale)
    assert not measure.reset_peak_rss()
    with PeakMemory(torch.device("cpu")) as mem:
        x = torch.ones(64 * 2**20 // 4)  # 64 MB, held long enough for the 10 ms sampler to see it
        time.sleep(0.2)
        del x
    assert not mem.kernel_peak
    assert 56 <= mem.extra_mb <= 100, mem.extra_mb
