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


def test_quarter_turned_series_turns_the_images_and_the_tilt_axis_with_them():
    images = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4) + np.array([0, 100], np.float32)[:, None, None]
    series = TiltSeries(images, [-10.0, 10.0], 5.0, 88.0, half_images=images + 1)
    turned = series.quarter_turned(1)
    assert turned.shape == (4, 3) and turned.tilt_axis_angle_deg == pytest.approx(-2.0)
    np.testing.assert_array_equal(turned.images[0], np.rot90(images[0]))
    np.testing.assert_array_equal(turned.half_images, np.rot90(images + 1, axes=(1, 2)))
    assert series.quarter_turned(0) is series
    assert series.quarter_turned(-1).tilt_axis_angle_deg == pytest.approx(178.0)
