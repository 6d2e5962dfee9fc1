"""How much memory there is and how much a piece of work used: CPU RSS and available RAM, GPU free memory.

Linux figures come from ``/proc`` (with the cgroup's limit, which containers and batch jobs set); where
``/proc`` is absent (macOS, Windows) from ``psutil``. A figure that neither gives is ``None``, and callers fall
back to fixed defaults.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import torch

__all__ = ["PeakMemory", "available_bytes", "rss_bytes"]

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int | None:
    """Resident set size of this process now, bytes (None when unknown)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        import psutil

        try:
            return int(psutil.Process().memory_info().rss)
        except (psutil.Error, OSError):
            return None


def _cgroup_limit_bytes() -> int | None:
    """The memory limit of this process's cgroup (v2 or v1), if one is set."""
    for name in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(name).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:
            return int(text)
    return None


def available_bytes(device: torch.device | str = "cpu") -> int | None:
    """Memory a new allocation can use now, bytes: free GPU memory on CUDA; on CPU ``MemAvailable`` of
    ``/proc/meminfo``, capped by the cgroup limit minus this process's RSS, or psutil's available memory where
    ``/proc`` is absent. None when unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
        available = next(int(line.split()[1]) * 1024 for line in lines if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        import psutil

        try:
            return int(psutil.virtual_memory().available)
        except (psutil.Error, OSError):
            return None
    limit, rss = _cgroup_limit_bytes(), rss_bytes()
    if limit is not None and rss is not None:
        available = min(available, max(limit - rss, 0))
    return available


class PeakMemory:
    """Context manager measuring the peak memory of the work inside it.

    ``cpu_peak_mb``: the highest RSS seen while inside, minus the RSS on entry (sampled every ``interval_s``;
    NaN when the RSS cannot be read).
    ``gpu_peak_mb``: ``torch.cuda.max_memory_allocated`` over the block (after a reset), when ``device`` is
    CUDA; else None. ``seconds``: wall time of the block.
    """

    def __init__(self, device: torch.device | str = "cpu", interval_s: float = 0.005):
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.cpu_peak_mb: float = 0.0
        self.gpu_peak_mb: float | None = None
        self.seconds: float = 0.0

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            now = rss_bytes() or 0
            self._peak = max(self._peak, now)

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self._start_rss = rss_bytes()
        self._peak = self._start_rss or 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        if self._start_rss is not None:
            self._thread.start()
        self._t0 = time.monotonic()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.gpu_peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        self.seconds = time.monotonic() - self._t0
        self._stop.set()
        if self._start_rss is not None:
            self._thread.join()
            self._peak = max(self._peak, rss_bytes() or 0)
            self.cpu_peak_mb = (self._peak - self._start_rss) / 2**20
        else:
            self.cpu_peak_mb = float("nan")

    def as_dict(self) -> dict:
        return {"seconds": self.seconds, "cpu_peak_mb": self.cpu_peak_mb, "gpu_peak_mb": self.gpu_peak_mb}
