import numpy as np
import pytest

from icetide.data import TiltSeries
from icetide.errors import IcetideError


def test_binning_averages_centred_blocks_and_scales_the_pixel_size():
    images = np.arange(2 * 24 * 27, dtype=np.float32).reshape(2, 24, 27) ** 1.5
    series = TiltSeries(images, [0.0, 10.0], pixel_size_A=5.0, tilt_axis_angle_deg=4.3)
    binned = series.binned(3)
    assert binned.shape == (8, 9) and binned.pixel_size_A == 15.0 and binned.tilt_axis_angle_deg == 4.3
    np.testing.assert_allclose(binned.images[1, 0, 0], images[1, 0:3, 0:3].mean(), rtol=1e-6)
    by_two = series.binned(2)  # 27 columns: one cut off, on the right (the remainder split, left first)
    assert by_two.shape == (12, 13)
    np.testing.assert_allclose(by_two.images[0, 2, 3], images[0, 4:6, 6:8].mean(), rtol=1e-6)
    assert series.binned(1) is series
    with pytest.raises(IcetideError, match="fewer than 8"):
        series.binned(4)
