"""Readers and writers of IMOD .xf, AreTomo .aln, RELION-5 STAR and SerialEM .mdoc files."""

import numpy as np
import pytest
import starfile

from icetide.deform import Deformations
from icetide.errors import IcetideError
from icetide.io.aretomo import read_aln
from icetide.io.imod import imod_view_list, read_xf, write_view_list, write_xf
from icetide.io.mdoc import read_mdoc
from icetide.io.relion import (
    RelionTomogram,
    read_relion_tilt_series_star,
    read_relion_tomograms_star,
    write_relion_tilt_series_star,
    write_relion_tomograms_star,
)


def test_xf_round_trip_to_printed_precision(tmp_path):
    rng = np.random.default_rng(0)
    xf = np.concatenate([rng.uniform(-1.2, 1.2, (6, 2, 2)), rng.uniform(-900, 900, (6, 2, 1))], -1)
    write_xf(tmp_path / "a.xf", xf)
    back = read_xf(tmp_path / "a.xf")
    assert back.shape == (6, 2, 3)
    np.testing.assert_allclose(back[:, :, :2], xf[:, :, :2], rtol=0, atol=5e-8)
    np.testing.assert_allclose(back[:, :, 2], xf[:, :, 2], rtol=0, atol=5e-4)
    first = (tmp_path / "a.xf").read_text().splitlines()[0].split()
    assert [float(v) for v in first] == pytest.approx([xf[0, 0, 0], xf[0, 0, 1], xf[0, 1, 0], xf[0, 1, 1],
                                                       xf[0, 0, 2], xf[0, 1, 2]], abs=5e-4)


def test_xf_reader_accepts_imod_and_aretomo_layouts(tmp_path):
    # IMOD: fixed 12-column fields; AreTomo: %9.3f fields and a trailing blank line
    (tmp_path / "b.xf").write_text(
        "   0.9998477  -0.0174524   0.0174524   0.9998477      12.500      -3.250\n"
        "    0.996     0.087    -0.087     0.996     -1.50      2.00\n\n"
    )
    xf = read_xf(tmp_path / "b.xf")
    assert xf[0, 0, 2] == 12.5 and xf[0, 1, 2] == -3.25
    assert xf[1, 0, 1] == 0.087 and xf[1, 1, 0] == -0.087 and xf[1, 1, 1] == 0.996


def test_xf_errors_name_file_and_line(tmp_path):
    (tmp_path / "c.xf").write_text("1 0 0 1 0 0\n1 0 0 1 0\n")
    with pytest.raises(IcetideError, match=r"c\.xf:2: expected 6 numbers"):
        read_xf(tmp_path / "c.xf")
    (tmp_path / "d.xf").write_text("1 0 0 1 x 0\n")
    with pytest.raises(IcetideError, match=r"d\.xf:1:"):
        read_xf(tmp_path / "d.xf")
    (tmp_path / "e.xf").write_text("\n")
    with pytest.raises(IcetideError, match="no transforms"):
        read_xf(tmp_path / "e.xf")
    with pytest.raises(IcetideError, match="no such file"):
        read_xf(tmp_path / "missing.xf")
    with pytest.raises(IcetideError, match=r"shape \(M, 2, 3\)"):
        write_xf(tmp_path / "f.xf", np.zeros((3, 3, 3)))
    assert not (tmp_path / "f.xf").exists()


ALN = """\
# AreTomo Alignment / Priims bprmMn
# RawSize = 1024 960 5
# NumPatches = 2
# DarkFrame =     0    0   -60.00
# AlphaOffset =     1.50
# Thickness = 1910
# SEC     ROT         GMAG       TX          TY      SMEAN     SFIT    SCALE     BASE     TILT
    1    84.5000    1.00000     12.345     -6.789     1.00     1.00     1.00     0.00   -30.00
    2    84.6000    1.00000      0.000      0.000     1.00     1.00     1.00     0.00     0.00
    3    84.7000    1.00000     -4.000      2.500     1.00     1.00     1.00     0.00    30.00
# Local Alignment
   0   0  -200.00   -150.00      1.00      2.00   1.0
   0   1   200.00    150.00     -1.00     -2.00   0.0
"""


@pytest.mark.parametrize(
    "indices, text",
    [([], ""), ([4], "5"), ([0, 40], "1,41"), ([0, 1, 2, 40], "1-3,41"), ([40, 2, 0, 1, 5, 6], "1-3,6-7,41")],
)
def test_imod_view_lists_are_numbered_from_1_with_ranges(tmp_path, indices, text):
    assert imod_view_list(indices) == text
    write_view_list(tmp_path / "views.txt", indices)
    assert (tmp_path / "views.txt").read_text() == text + "\n"


def test_aln_reader_parses_header_rows_and_local_table(tmp_path):
    (tmp_path / "ts.aln").write_text(ALN)
    aln = read_aln(tmp_path / "ts.aln")
    assert aln.raw_size == (1024, 960, 5) and aln.num_patches == 2
    assert aln.dark_frames == [(0, 0, -60.0)] and aln.alpha_offset_deg == 1.5 and aln.header == {"Thickness": "1910"}
    assert aln.sec.tolist() == [1, 2, 3]
    np.testing.assert_array_equal(aln.rot_deg, [84.5, 84.6, 84.7])
    np.testing.assert_array_equal(aln.tx_px, [12.345, 0.0, -4.0])
    np.testing.assert_array_equal(aln.ty_px, [-6.789, 0.0, 2.5])
    np.testing.assert_array_equal(aln.tilt_deg, [-30.0, 0.0, 30.0])
    assert aln.local.shape == (2, 7) and aln.local[1, 6] == 0.0


@pytest.mark.parametrize(
    "text, message",
    [
        (ALN.replace("    0.00   -30.00", "   -30.00"), r"ts\.aln:8: expected 10 columns"),
        (ALN.replace("   0   1   200.00", "   0   1   2x0.00"), r"ts\.aln:13: not a row of numbers"),
        ("    1 84.5 1 0 0 1 1 1 0 0\n", r"ts\.aln:1: data before the '# SEC"),
        ("# AreTomo Alignment\n# RawSize = 1024 960\n", r"ts\.aln:2: RawSize needs 3 numbers"),
        ("# AreTomo Alignment\n# SEC ROT GMAG TX TY SMEAN SFIT SCALE BASE TILT\n", "no global alignment rows"),
    ],
)
def test_aln_errors_name_file_and_line(tmp_path, text, message):
    (tmp_path / "ts.aln").write_text(text)
    with pytest.raises(IcetideError, match=message):
        read_aln(tmp_path / "ts.aln")


def _deformations():
    rng = np.random.default_rng(2)
    return Deformations([-45.0, -15.0, 15.0, 45.0], rng.uniform(-9, 9, (4, 2)), rng.uniform(-95, -80, 4),
                        np.zeros((4, 2, 2, 2)), (48, 64))


def test_relion_tilt_series_star_round_trip_and_image_names(tmp_path):
    d = _deformations()
    write_relion_tilt_series_star(tmp_path / "TS_07.star", d, 1.35, "TS_07", "tilt_series/TS_07.mrcs")
    text = (tmp_path / "TS_07.star").read_text()
    assert "data_TS_07" in text and "1@tilt_series/TS_07.mrcs" in text and "4@tilt_series/TS_07.mrcs" in text
    e = read_relion_tilt_series_star(tmp_path / "TS_07.star", 1.35, d.detector_shape, grid=(3, 3))
    np.testing.assert_allclose(e.tilt_angles_deg, d.tilt_angles_deg, atol=5e-7)
    np.testing.assert_allclose(e.angles_deg, d.angles_deg, atol=5e-7)
    np.testing.assert_allclose(e.shifts_px, d.shifts_px, atol=1e-6 / 1.35)
    assert e.local_px.shape == (4, 2, 3, 3)
    names = [f"frames/TS_07_{k:03d}.mrc" for k in range(4)]
    write_relion_tilt_series_star(tmp_path / "b.star", d, 1.35, "TS_07", names)
    assert all(n in (tmp_path / "b.star").read_text() for n in names)
    with pytest.raises(IcetideError, match="3 image paths for 4 tilts"):
        write_relion_tilt_series_star(tmp_path / "c.star", d, 1.35, "TS_07", names[:3])
    assert not (tmp_path / "c.star").exists()


def test_relion_image_names_point_into_the_stack_past_excluded_views(tmp_path):
    d = _deformations()  # views 1, 2, 4 and 5 of a stack of 7 whose views 0, 3 and 6 were excluded
    write_relion_tilt_series_star(tmp_path / "ts.star", d, 1.35, "TS_07", "ts.mrc", stack_indices=[1, 2, 4, 5])
    names = starfile.read(tmp_path / "ts.star")["rlnMicrographName"].tolist()
    assert names == ["2@ts.mrc", "3@ts.mrc", "5@ts.mrc", "6@ts.mrc"]
    with pytest.raises(IcetideError, match="3 stack indices for 4 tilts"):
        write_relion_tilt_series_star(tmp_path / "c.star", d, 1.35, "TS_07", "ts.mrc", stack_indices=[1, 2, 4])


def test_relion_tilt_series_star_errors(tmp_path):
    d = _deformations()
    (tmp_path / "bad.star").write_text("data_x\n\nloop_\n_rlnTomoYTilt #1\n_rlnTomoZRot #2\n1.0 2.0\n")
    with pytest.raises(IcetideError, match=r"bad\.star: missing columns rlnTomoXTilt, rlnTomoXShiftAngst"):
        read_relion_tilt_series_star(tmp_path / "bad.star", 1.0, (48, 64))
    write_relion_tilt_series_star(tmp_path / "ts.star", d, 1.0, "TS_01")
    with pytest.raises(IcetideError, match="no data block named 'TS_02'"):
        read_relion_tilt_series_star(tmp_path / "ts.star", 1.0, (48, 64), tilt_series_name="TS_02")
    with pytest.raises(IcetideError, match="no such file"):
        read_relion_tilt_series_star(tmp_path / "none.star", 1.0, (48, 64))
    with pytest.raises(IcetideError, match="pixel size must be positive"):
        write_relion_tilt_series_star(tmp_path / "p.star", d, 0.0, "TS_01")
    with pytest.raises(IcetideError, match="without spaces"):
        write_relion_tilt_series_star(tmp_path / "p.star", d, 1.0, "TS 01")
    assert not (tmp_path / "p.star").exists()


def test_relion_tomograms_star_round_trip(tmp_path):
    entries = [
        RelionTomogram("TS_01", "tilt_series/TS_01.star", 300.0, 2.7, 0.1, 0.675, 2.7, (1024, 1024, 256), -1),
        RelionTomogram("TS_02", "tilt_series/TS_02.star", 300.0, 2.7, 0.07, 0.675, 5.4, (512, 480, 128), 1,
                       "rec/TS_02/TS_02_rec.mrc", 4.0),
    ]
    write_relion_tomograms_star(tmp_path / "tomograms.star", entries)
    text = (tmp_path / "tomograms.star").read_text()
    assert "data_global" in text and "_rlnTomoTiltSeriesStarFile" in text and "_rlnTomoSizeZ" in text
    assert "_rlnTomoReconstructedTomogram" in text and "_rlnTomoTomogramBinning" in text
    assert read_relion_tomograms_star(tmp_path / "tomograms.star") == entries
    write_relion_tomograms_star(tmp_path / "one.star", entries[:1])  # no tomogram: no column, binning 1
    assert "_rlnTomoReconstructedTomogram" not in (tmp_path / "one.star").read_text()
    assert read_relion_tomograms_star(tmp_path / "one.star") == entries[:1]
    (tmp_path / "x.star").write_text("data_global\n\nloop_\n_rlnTomoName #1\nTS_01\n")
    with pytest.raises(IcetideError, match=r"x\.star: missing columns rlnTomoTiltSeriesStarFile"):
        read_relion_tomograms_star(tmp_path / "x.star")


MDOC = """\
PixelSpacing = 2.125
Voltage = 300
ImageFile = TS_01.mrc
ImageSize = 1024 1024
DataMode = 1

[T = SerialEM: Digitized on Krios                     17-Feb-20  22:06:52    ]

[T =     Tilt axis angle = 85.3, binning = 1  spot = 9  camera = 0]

[ZValue = 1]
TiltAngle = 3.00057
ExposureDose = 3.1
Defocus = -3.84035
DateTime = 17-Feb-20  22:08:01

[ZValue = 0]
TiltAngle = -0.000999877
StagePosition = 20.7936 155.287
ExposureDose = 3.0
Defocus = -3.9
DateTime = 17-Feb-20  22:07:14

[ZValue = 2]
TiltAngle = -2.99
Defocus = -4.1
"""


def test_mdoc_reader_orders_by_zvalue_and_reads_per_section_values(tmp_path):
    (tmp_path / "TS_01.mrc.mdoc").write_text(MDOC)
    md = read_mdoc(tmp_path / "TS_01.mrc.mdoc")
    np.testing.assert_array_equal(md["tilt_angles_deg"], [-0.000999877, 3.00057, -2.99])
    assert md["z_values"].tolist() == [0, 1, 2]
    assert md["pixel_size_A"] == 2.125 and md["tilt_axis_angle_deg"] == 85.3
    np.testing.assert_array_equal(md["exposure_dose"][:2], [3.0, 3.1])
    assert np.isnan(md["exposure_dose"][2])
    np.testing.assert_array_equal(md["defocus_um"], [-3.9, -3.84035, -4.1])
    assert md["date_time"] == ["17-Feb-20  22:07:14", "17-Feb-20  22:08:01", None]
    assert md["header"]["ImageFile"] == "TS_01.mrc" and md["sections"][0]["StagePosition"] == "20.7936 155.287"


def test_mdoc_pixel_size_from_first_section_and_optional_keys(tmp_path):
    (tmp_path / "a.mdoc").write_text("[ZValue = 0]\nTiltAngle = 0\nPixelSpacing = 5.4\n[ZValue = 1]\nTiltAngle = 2\n")
    md = read_mdoc(tmp_path / "a.mdoc")
    assert md["pixel_size_A"] == 5.4 and md["tilt_axis_angle_deg"] is None
    assert "exposure_dose" not in md and "defocus_um" not in md and "date_time" not in md


@pytest.mark.parametrize(
    "text, message",
    [
        ("PixelSpacing = 1\n", "no \\[ZValue = N\\] sections"),
        ("[ZValue = 0]\nDefocus = -3\n", r"m\.mdoc:1: section \[ZValue = 0\] has no TiltAngle"),
        ("[ZValue = 0]\nTiltAngle = abc\n", r"m\.mdoc:1: TiltAngle is not a number"),
        ("[ZValue = 0]\nTiltAngle = 0\n[ZValue = 0]\nTiltAngle = 1\n", r"m\.mdoc:3: duplicated section"),
        ("[ZValue = 0]\nTiltAngle 0\n", r"m\.mdoc:2: expected 'key = value'"),
        ("[ZValue = one]\n", r"m\.mdoc:1: ZValue is not an integer"),
    ],
)
def test_mdoc_errors_name_file_and_line(tmp_path, text, message):
    (tmp_path / "m.mdoc").write_text(text)
    with pytest.raises(IcetideError, match=message):
        read_mdoc(tmp_path / "m.mdoc")
