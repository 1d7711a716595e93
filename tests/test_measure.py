"""measure.PeakMemory on the CPU: psutil's resident set size, sampled, above the phase's start."""
import torch

from softprompt.measure import PeakMemory


def test_cpu_peak_counts_what_the_phase_allocated_and_not_what_it_freed_before():
    before = torch.ones(64 * 2**20 // 4)  # 64 MB, freed before the phase: not counted
    del before
    with PeakMemory(torch.device("cpu")) as mem:
        x = torch.ones(256 * 2**20 // 4)  # 256 MB, written, so resident
        del x
    assert 240 <= mem.extra_mb <= 300, mem.extra_mb
