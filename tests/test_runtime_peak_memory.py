"""PeakMemory on the CPU: the process's peak RSS over a block, from the kernel's high-water
mark (or, where /proc/self/clear_refs cannot be written, sampled)."""

from __future__ import annotations

import time

import pytest
import torch

from hlwq.runtime import peak_memory
from hlwq.runtime.peak_memory import CPU_RSS, PeakMemory

MB = 2**20


def burst(megabytes: int, hold_s: float = 0.0) -> None:
    """Touch ``megabytes`` of fresh memory, then free it (before the block ends)."""
    block = torch.ones(megabytes * MB, dtype=torch.uint8)
    time.sleep(hold_s)
    del block


@pytest.mark.parametrize("high_water_mark", [True, False])
def test_a_freed_burst_counts_in_the_peak(monkeypatch, high_water_mark):
    if not high_water_mark:         # the sampling fallback: the burst must outlast a sample
        monkeypatch.setattr(peak_memory, "reset_rss_high_water_mark", lambda: False)
    with PeakMemory("cpu", interval_s=0.005) as peak:
        burst(96, hold_s=0.0 if high_water_mark else 0.1)
    assert peak.kind == CPU_RSS
    assert peak.growth_bytes >= 90 * MB
    assert peak.peak_bytes == peak.start_bytes + peak.growth_bytes
    again = PeakMemory("cpu").start()       # a new block starts from the RSS now, not the old peak
    assert again.stop() - again.start_bytes < 48 * MB
