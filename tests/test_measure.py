"""measure.PeakMemory on the CPU: the resident high-water mark above the phase's start."""
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
