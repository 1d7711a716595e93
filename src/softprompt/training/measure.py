"""Measuring a phase of work: its peak memory above its start, and a model made resident first.

Peak memory: on CUDA, torch.cuda.max_memory_allocated above the allocation at the phase's start;
on CPU, the process's resident set size peak minus its value at the phase's start (after gc and
malloc_trim), i.e. what the phase needs beyond the loaded base model: activations, gradients,
optimiser state. On Linux the peak is the kernel's own high-water mark (VmHWM, reset at the phase's
start through /proc/self/clear_refs), exact however short the spike; elsewhere, or where the mark does not
reset, psutil samples RSS every 10 ms, which can miss a spike shorter than that.
malloc_trim stays a ctypes call: psutil reads memory but cannot make glibc hand freed heap pages
back, and without that the next phase's baseline would include the last phase's garbage.
"""
from __future__ import annotations

import ctypes
import gc
import threading
from pathlib import Path

import psutil
import torch


def release_memory() -> None:
    gc.collect()
    try:  # hand freed heap pages back to the OS so the next phase starts from a true baseline
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@torch.no_grad()
def resident(model):
    """Read every weight once: safetensors are memory-mapped, so pages of an untouched model become
    resident only on first use, which would otherwise count as the first phase's memory."""
    for t in model.state_dict().values():
        t.float().sum() if t.is_floating_point() else t.sum()
    return model


def reset_peak_rss(tries: int = 3, slack: int = 4 * 2**20) -> bool:
    """Reset the kernel's resident high-water mark to the current RSS; False where it can't be, or
    where the mark still stands above the RSS after `tries` resets: a peak read from a stale mark
    would count an earlier phase's memory (a CI run once saw the last phase's 256 MB that way).
    `slack` covers RSS another thread frees between the two reads."""
    for _ in range(tries):
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            return False
        mark = peak_rss()
        if mark is None:
            return False
        if mark <= psutil.Process().memory_info().rss + slack:
            return True
    return False


def peak_rss() -> int | None:
    """The kernel's resident high-water mark in bytes (Linux's VmHWM), or None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory of the enclosed block above its start, in bytes (see the module docstring)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.start = self.peak = 0
        self.process = psutil.Process()
        self._stop = threading.Event()
        self._thread = None

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> "PeakMemory":
        release_memory()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.kernel_peak = reset_peak_rss()  # else sample, rather than trust a stale mark
            self.start = self.peak = self.process.memory_info().rss
            if not self.kernel_peak:
                self._thread = threading.Thread(target=self._sample, daemon=True)
                self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            if self._thread is not None:
                self._stop.set()
                self._thread.join()
            self.peak = max(self.peak, self.process.memory_info().rss, peak_rss() if self.kernel_peak else 0)

    @property
    def extra_mb(self) -> float:
        return round((self.peak - self.start) / 2**20, 1)
