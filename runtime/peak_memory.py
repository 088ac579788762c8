"""Peak memory while a block of code runs: the accelerator's on CUDA, the process's RSS on the CPU.

On CUDA it is the caching allocator's peak of allocated bytes (``max_memory_allocated``, reset at
the start). On the CPU it is the kernel's own high-water mark of the process's resident set
(``VmHWM`` in ``/proc/self/status``, reset by writing 5 to ``/proc/self/clear_refs``, Linux >= 4.0),
which no sampling can miss; where that file cannot be written, RSS is sampled every
``interval_s`` instead. Both count the whole process: weights resident, activations, and
whatever else the process holds.
"""

from __future__ import annotations

import threading
from typing import Self

import psutil
import torch

CUDA_ALLOCATED, CPU_RSS = "cuda_allocated", "cpu_rss"    # what a peak counts (catalog column)


class PeakMemory:
    """``with PeakMemory(device) as peak: ...`` then ``peak.peak_bytes`` (absolute) and
    ``peak.growth_bytes`` (above the bytes in use when the block began); ``peak.kind`` says which
    memory was counted. ``start()`` / ``stop()`` do the same without a ``with``."""

    def __init__(self, device: str | torch.device, interval_s: float = 0.01):
        self.device = torch.device(device)
        self.kind = CUDA_ALLOCATED if self.device.type == "cuda" else CPU_RSS
        self.interval_s, self.start_bytes, self.peak_bytes = interval_s, 0, 0
        self._process = psutil.Process()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    @property
    def growth_bytes(self) -> int:
        return max(0, self.peak_bytes - self.start_bytes)

    def start(self) -> Self:
        if self.kind == CUDA_ALLOCATED:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = torch.cuda.memory_allocated(self.device)
        else:
            self.start_bytes = self._process.memory_info().rss
            if not reset_rss_high_water_mark():
                self._stop.clear()
                self._thread = threading.Thread(target=self._sample, daemon=True)
                self._thread.start()
        self.peak_bytes = self.start_bytes
        return self

    def stop(self) -> int:
        """The peak since ``start()``, in bytes."""
        if self.kind == CUDA_ALLOCATED:
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        elif self._thread is None:
            self.peak_bytes = max(self.start_bytes, rss_high_water_mark())
        else:
            self._stop.set()
            self._thread.join()
            self._thread = None
        return self.peak_bytes

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _sample(self) -> None:
        while True:
            self.peak_bytes = max(self.peak_bytes, self._process.memory_info().rss)
            if self._stop.wait(self.interval_s):
                return


def reset_rss_high_water_mark() -> bool:
    """Set the kernel's peak-RSS mark of this process to its current RSS; False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return rss_high_water_mark() > 0
    except OSError:
        return False


def rss_high_water_mark() -> int:
    """``VmHWM`` of this process in bytes (0 where /proc has none)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
