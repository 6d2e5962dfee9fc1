"""Memory measurement: RSS, available memory, and the peak of a block of work."""

import math
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from icetide.memory import PeakMemory, available_bytes, rss_bytes

linux = pytest.mark.skipif(not Path("/proc/meminfo").is_file(), reason="needs /proc")


@pytest.fixture
def no_proc(monkeypatch):
    """As on macOS or Windows: every read under /proc fails."""
    read_text = Path.read_text

    def read_outside_proc(self, *args, **kwargs):
        if str(self).startswith("/proc/"):
            raise FileNotFoundError(2, "No such file or directory", str(self))
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_outside_proc)


def _touch_64_mb() -> None:
    block = np.ones(64 * 2**20 // 8)
    block += 1.0
    # Held while the sampler certainly runs: on a busy machine its thread may not be scheduled during the
    # few milliseconds of the work itself, and the block is freed before the exit's last reading.
    time.sleep(0.1)
    block += 1.0


def test_peak_memory_sees_a_temporary_allocation():
    with PeakMemory(interval_s=0.001) as used:
        _touch_64_mb()
    assert 48 <= used.cpu_peak_mb <= 200
    assert used.seconds > 0 and used.gpu_peak_mb is None
    assert set(used.as_dict()) == {"seconds", "cpu_peak_mb", "gpu_peak_mb"}


@linux
def test_available_memory_is_positive_and_below_total():
    free = available_bytes("cpu")
    total = int(open("/proc/meminfo").readline().split()[1]) * 1024
    assert 0 < free <= total


def test_without_proc_the_figures_come_from_psutil(no_proc):
    assert rss_bytes() > 0
    assert 0 < available_bytes("cpu") <= psutil.virtual_memory().total
    with PeakMemory(interval_s=0.001) as used:
        _touch_64_mb()
    assert 48 <= used.cpu_peak_mb <= 200


def test_unknown_memory_is_none_not_an_error(no_proc, monkeypatch):
    def refused(*args, **kwargs):
        raise psutil.AccessDenied()

    monkeypatch.setattr(psutil, "Process", refused)
    monkeypatch.setattr(psutil, "virtual_memory", refused)
    assert rss_bytes() is None and available_bytes("cpu") is None
    with PeakMemory() as used:
        pass
    assert math.isnan(used.cpu_peak_mb) and used.seconds >= 0
