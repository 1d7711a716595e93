"""measure.PeakMemory on the CPU: the resident high-water mark above the phase's start."""
import time

import pytest
import torch

from softprompt.training.measure import PeakMemory


def test_cpu_peak_counts_what_the_phase_allocated_and_not_what_it_freed_before():
    before = torch.ones(64 * 2**20 // 4)  # 64 MB, freed before the phase: not counted
    del before
    with PeakMemory(torch.device("cpu")) as mem:
        x = torch.ones(256 * 2**20 // 4)  # 256 MB, written, so resident
        del x
    assert 240 <= mem.extra_mb <= 300, mem.extra_mb


def test_cpu_peak_catches_a_spike_shorter_than_any_sampling_interval():
    # 128 MB touched and freed in well under 10 ms of wall time would slip between samples; the
    # kernel's high-water mark cannot miss it
    with PeakMemory(torch.device("cpu")) as mem:
        for _ in range(3):
            x = torch.empty(128 * 2**20, dtype=torch.uint8)
            x[:: 4096] = 1  # one write per page makes every page resident
            del x
    if not mem.kernel_peak:
        pytest.skip("no /proc/self/clear_refs here: the peak is sampled")
    assert 120 <= mem.extra_mb <= 160, mem.extra_mb


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
