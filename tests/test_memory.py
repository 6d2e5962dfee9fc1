"""Memory measurement: RSS, available memory, and the peak of a block of work."""

import numpy as np
import pytest

from icetide.memory import PeakMemory, available_bytes, rss_bytes

linux = pytest.mark.skipif(rss_bytes() is None, reason="needs /proc")


@linux
def test_peak_memory_sees_a_temporary_allocation():
    with PeakMemory(interval_s=0.001) as used:
        block = np.ones(64 * 2**20 // 8)  # 64 MB, touched
        block += 1.0
        del block
    assert 48 <= used.cpu_peak_mb <= 200
    assert used.seconds > 0 and used.gpu_peak_mb is None
    assert set(used.as_dict()) == {"seconds", "cpu_peak_mb", "gpu_peak_mb"}


@linux
def test_available_memory_is_positive_and_below_total():
    free = available_bytes("cpu")
    total = int(open("/proc/meminfo").readline().split()[1]) * 1024
    assert 0 < free <= total
