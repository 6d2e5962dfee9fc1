import mrcfile
import numpy as np
import pytest

from icetide.data import TiltSeries
from icetide.deform import Deformations
from icetide.errors import IcetideError
from icetide.io import (
    parse_exclude, read_deformations, read_mrc, read_mrc_labels, read_tlt, write_deformations, write_mrc, write_tlt,
)


def test_mrc_round_trip_volume_and_voxel_size(tmp_path):
    vol = np.random.default_rng(0).standard_normal((4, 5, 6)).astype(np.float32)
    write_mrc(tmp_path / "v.mrc", vol, 12.5)
    data, vs = read_mrc(tmp_path / "v.mrc")
    assert np.array_equal(data, vol) and vs == pytest.approx(12.5)
    with mrcfile.open(tmp_path / "v.mrc") as m:
        assert m.is_volume() and m.header.nx == 6 and m.header.nz == 4


def test_mrc_stack_flag_and_any_mode_in(tmp_path):
    stack = (np.arange(2 * 3 * 4).reshape(2, 3, 4)).astype(np.int16)
    with mrcfile.new(tmp_path / "s.mrc") as m:
        m.set_data(stack)
    data, vs = read_mrc(tmp_path / "s.mrc")
    assert data.dtype == np.float32 and np.array_equal(data, stack) and vs is None
    write_mrc(tmp_path / "o.mrc", data, 3.0, stack=True)
    with mrcfile.open(tmp_path / "o.mrc") as m:
        assert m.is_image_stack()


def test_mrc_label_is_written_and_read_back(tmp_path):
    write_mrc(tmp_path / "v.mrc", np.zeros((2, 3, 4)), 2.0, label="icetide: density bright (positive = dense)")
    assert "icetide: density bright (positive = dense)" in read_mrc_labels(tmp_path / "v.mrc")
    with pytest.raises(IcetideError, match="at most 80 ASCII characters"):
        write_mrc(tmp_path / "w.mrc", np.zeros((2, 3, 4)), label="x" * 81)
    assert not (tmp_path / "w.mrc").exists()


@pytest.mark.parametrize(
    "text, expected",
    [(None, []), ("", []), ("0,40", [0, 40]), ("0-2,40", [0, 1, 2, 40]), (" 38 - 40 , 5", [5, 38, 39, 40]),
     ("7-7", [7])],
)
def test_exclude_takes_views_and_ranges_numbered_from_0(text, expected):
    assert parse_exclude(text, 41).tolist() == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("a-b", r"'a-b' is neither a view nor a range of views \(0-based"),
        ("-1", "neither a view nor a range"),
        ("1-2-3", "neither a view nor a range"),
        ("5-2", "range '5-2' runs backwards"),
        ("0-2,2", r"view\(s\) 2 given more than once"),
        ("3,41,39-45", r"view\(s\) 41, 39-45 outside 0..40"),
        ("0-1000000000", "outside 0..40"),  # refused before the range is expanded
        ("1-40", "fewer than 2 views"),
    ],
)
def test_bad_exclude_lists_are_one_line_errors(text, message):
    with pytest.raises(IcetideError, match=message) as info:
        parse_exclude(text, 41)
    assert "\n" not in str(info.value)


def test_mrc_errors_are_one_line(tmp_path):
    (tmp_path / "bad.mrc").write_bytes(b"not an mrc file at all" * 10)
    with pytest.raises(IcetideError, match="not a readable MRC"):
        read_mrc(tmp_path / "bad.mrc")
    with pytest.raises(IcetideError, match="no such file"):
        read_mrc(tmp_path / "missing.mrc")


def test_tlt_round_trip(tmp_path):
    angles = np.array([-60.0, -57.5, 0.0, 12.25, 60.0])
    write_tlt(tmp_path / "a.tlt", angles)
    assert np.allclose(read_tlt(tmp_path / "a.tlt"), angles)
    (tmp_path / "b.tlt").write_text("1.0\nabc\n")
    with pytest.raises(IcetideError, match=":2:"):
        read_tlt(tmp_path / "b.tlt")


def test_deformations_json_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    d = Deformations(
        [-10.0, 0.0, 10.0], rng.normal(size=(3, 2)), rng.normal(size=3), rng.normal(size=(3, 2, 4, 5)), (30, 40),
        "bilinear", {"note": "x"},
    )
    write_deformations(tmp_path / "d.json", d)
    e = read_deformations(tmp_path / "d.json")
    for key in ("tilt_angles_deg", "shifts_px", "angles_deg", "local_px"):
        assert np.array_equal(getattr(d, key), getattr(e, key))
    assert e.detector_shape == (30, 40) and e.local_interpolation == "bilinear" and e.extra == {"note": "x"}


def test_tilt_series_validation():
    img = np.random.default_rng(0).standard_normal((3, 8, 8)).astype(np.float32)
    ts = TiltSeries(img, [-10, 0, 10], 5.0)
    assert ts.shape == (8, 8) and ts.n_tilts == 3
    bad_cases = [
        (img[0], [0.0], "single 2-D image"),
        (img, [0, 10], "2 tilt angles for 3 images"),
        (img, [0, 0, 10], "duplicated"),
        (img, [-95, 0, 10], r"\(-90, 90\)"),
    ]
    for images, angles, msg in bad_cases:
        with pytest.raises(IcetideError, match=msg):
            TiltSeries(images, angles)
    nan = img.copy()
    nan[1, 2, 2] = np.nan
    with pytest.raises(IcetideError, match="tilt\\(s\\) 1"):
        TiltSeries(nan, [-10, 0, 10])
    const = img.copy()
    const[2] = 4.0
    with pytest.raises(IcetideError, match="constant"):
        TiltSeries(const, [-10, 0, 10])
