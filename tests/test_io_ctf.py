"""Per-view defocus (CTFFIND4, IMOD .defocus, RELION-5 STAR, SerialEM .mdoc) and pre-exposure files."""

import numpy as np
import pandas as pd
import pytest
import starfile

from icetide.errors import IcetideError
from icetide.io.ctf_files import (
    DefocusTable,
    read_defocus,
    read_pre_exposure,
    write_imod_defocus,
    write_pre_exposure,
)

CTFFIND4_TXT = """\
# Output from CTFFind version 4.1.14, run on 2024-03-12 14:03:21
# Input file: TS_01.mrc ; Number of micrographs: 3
# Pixel size: 1.350 Angstroms ; acceleration voltage: 300.0 keV ; spherical aberration: 2.70 mm ; amplitude contrast: 0.07
# Box size: 512 pixels ; min. res.: 30.0 Angstroms ; max. res.: 5.0 Angstroms ; min. def.: 5000.0 um; max. def. 50000.0 um
# Columns: #1 - micrograph number; #2 - defocus 1 [Angstroms]; #3 - defocus 2; #4 - azimuth of astigmatism; #5 - additional phase shift [radians]; #6 - cross correlation; #7 - spacing (in Angstroms) up to which CTF rings were fit successfully
1.000000 31250.500000 30750.250000 -44.710000 0.000000 0.494779 6.102857
2.000000 32000.000000 31500.000000 12.500000 0.000000 0.401000 7.000000
3.000000 33125.750000 32900.000000 78.283111 0.000000 0.131144 8.874623
"""


def _mdoc(sections: list[dict]) -> str:
    text = "PixelSpacing = 1.35\nImageFile = TS_01.mrc\nImageSize = 4096 4096\n\n"
    text += "[T = SerialEM: Krios   12-Mar-24  14:03:21]\n\n[T = Tilt axis angle = 85.3, binning = 1]\n\n"
    for z, keys in enumerate(sections):
        text += f"[ZValue = {z}]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items()) + "\n"
    return text


# ------------------------------------------------------------------------------------------- CTFFIND4


def test_ctffind4_diagnostic_output(tmp_path):
    path = tmp_path / "diagnostic_output.txt"
    path.write_text(CTFFIND4_TXT)
    table = read_defocus(path, 3)
    assert isinstance(table, DefocusTable) and table.source == "CTFFIND4"
    np.testing.assert_array_equal(table.defocus_u_A, [31250.5, 32000.0, 33125.75])
    np.testing.assert_array_equal(table.defocus_v_A, [30750.25, 31500.0, 32900.0])
    np.testing.assert_array_equal(table.astigmatism_angle_deg, [-44.71, 12.5, 78.283111])
    np.testing.assert_array_equal(table.mean_defocus_A, [31000.375, 31750.0, 33012.875])


def test_ctffind5_columns_and_columns_only_header(tmp_path):
    # CTFFIND5 appends tilt axis, tilt angle and thickness; some tools write only the '# Columns:' line
    path = tmp_path / "ctf5.txt"
    path.write_text(
        "# Columns: #1 - micrograph number; #2 - defocus 1 [Angstroms]; #3 - defocus 2; #4 - azimuth of "
        "astigmatism; #5 - additional phase shift [radians]; #6 - cross correlation; #7 - spacing (in "
        "Angstroms) up to which CTF rings were fit successfully; #8 - Estimated tilt axis angle; "
        "#9 - Estimated tilt angle ; #10 Estimated sample thickness (in Angstroms)\n"
        "1.000000 8984.742188 8709.236328 45.948771 0.000000 0.446317 3.720000 221.912292 12.251187 1619.773438\n"
    )
    table = read_defocus(path, 1)
    assert table.defocus_u_A.tolist() == [8984.742188] and table.defocus_v_A.tolist() == [8709.236328]
    assert table.astigmatism_angle_deg.tolist() == [45.948771]


def test_ctffind4_errors_name_file_and_line(tmp_path):
    path = tmp_path / "diag.txt"
    path.write_text(CTFFIND4_TXT)
    with pytest.raises(IcetideError, match=r"diag\.txt: defocus for 3 views, the stack has 4"):
        read_defocus(path, 4)
    path.write_text(CTFFIND4_TXT.replace("2.000000 32000.000000", "2.000000 -32000.000000"))
    with pytest.raises(IcetideError, match=r"diag\.txt:7: negative defocus"):
        read_defocus(path, 3)
    path.write_text(CTFFIND4_TXT.replace("3.000000 33125", "4.000000 33125"))
    with pytest.raises(IcetideError, match=r"diag\.txt:8: micrograph number 4, expected 3"):
        read_defocus(path, 3)
    path.write_text(CTFFIND4_TXT.replace(" 0.131144 8.874623", ""))
    with pytest.raises(IcetideError, match=r"diag\.txt:8: expected the 7 CTFFIND4 columns"):
        read_defocus(path, 3)


# ----------------------------------------------------------------------------------------------- IMOD


def test_imod_version2_range_goes_to_its_middle_view(tmp_path):
    # views 1-2 in one range: its value belongs to view (1+2)//2 = 1; view 2 is interpolated between
    # the middles of the two lines (views 1 and 3); view 4 takes the last value (ctfphaseflip's rule)
    path = tmp_path / "ts.defocus"
    path.write_text("1 2 -3.00 0.00 3000.0 2\n3 3 3.00 3.00 3200.0\n")
    table = read_defocus(path, 4)
    assert table.source == "IMOD"
    np.testing.assert_array_equal(table.defocus_u_A, [30000.0, 31000.0, 32000.0, 32000.0])
    np.testing.assert_array_equal(table.defocus_v_A, table.defocus_u_A)
    np.testing.assert_array_equal(table.astigmatism_angle_deg, [0.0, 0.0, 0.0, 0.0])


def test_imod_version1_views_numbered_from_zero_are_shifted(tmp_path):
    # ctfplotter before IMOD 4.0.29 numbered views from 0 and wrote no version number
    path = tmp_path / "old.defocus"
    path.write_text("0 0 -3.0 -3.0 3000.0\n1 1 0.0 0.0 3100.0\n2 2 3.0 3.0 3200.0\n")
    np.testing.assert_array_equal(read_defocus(path, 3).defocus_u_A, [30000.0, 31000.0, 32000.0])


def test_imod_version3_astigmatic(tmp_path):
    path = tmp_path / "astig.defocus"
    path.write_text(
        "1 0 0.0 0.0 0 3\n"
        "1 1 -3.0 -3.0 3000.0 2800.0 45.0\n"
        "2 2 0.0 0.0 2900.0 3100.0 10.0\n"  # defocus 2 > defocus 1: IMOD swaps and turns the axis by -90
        "3 3 3.0 3.0 3200.0 3000.0 -30.0\n"
    )
    table = read_defocus(path, 3)
    np.testing.assert_array_equal(table.defocus_u_A, [30000.0, 31000.0, 32000.0])
    np.testing.assert_array_equal(table.defocus_v_A, [28000.0, 29000.0, 30000.0])
    np.testing.assert_array_equal(table.astigmatism_angle_deg, [45.0, -80.0, -30.0])


def test_imod_version3_interpolation_flags_radians_and_phase(tmp_path):
    # flags 1 + 2 + 4: astigmatism, its angle in radians, a phase-shift column (ignored here)
    path = tmp_path / "p.defocus"
    path.write_text(
        "7 0 0.0 0.0 0 3\n"
        f"1 1 -3.0 -3.0 3000.0 2000.0 {float(np.deg2rad(80.0))!r} 0.5\n"
        f"3 3 3.0 3.0 4000.0 2000.0 {float(np.deg2rad(-80.0))!r} 0.6\n"
    )
    table = read_defocus(path, 3)
    # view 2: defocus 1 interpolated, defocus 2 through the ratio (2/3 and 1/2 -> 7/12), the axis the
    # short way round from 80 to -80 (through 90 = -90)
    np.testing.assert_allclose(table.defocus_u_A, [30000.0, 35000.0, 40000.0], rtol=0, atol=1e-9)
    np.testing.assert_allclose(table.defocus_v_A, [20000.0, 35000.0 * 7 / 12, 20000.0], rtol=0, atol=1e-9)
    np.testing.assert_allclose(table.astigmatism_angle_deg, [80.0, -90.0, -80.0], rtol=0, atol=1e-9)


def test_imod_errors_name_file_and_line(tmp_path):
    path = tmp_path / "x.defocus"
    path.write_text("1 1 0.0 0.0 3000.0 2\n2 2 1.0 1.0 3000.0\n3 3 2.0 2.0 3000.0\n")
    with pytest.raises(IcetideError, match=r"x\.defocus: defocus for 3 views, the stack has 2"):
        read_defocus(path, 2)
    path.write_text("1 1 0.0 0.0 3000.0 2\n2 2 1.0 1.0 -3000.0\n")
    with pytest.raises(IcetideError, match=r"x\.defocus:2: negative defocus"):
        read_defocus(path, 2)
    path.write_text("1 0 0.0 0.0 0 3\n1 1 0.0 0.0 3000.0 2900.0\n")
    with pytest.raises(IcetideError, match=r"x\.defocus:2: expected 7 numbers"):
        read_defocus(path, 1)
    path.write_text("hello defocus\n")
    with pytest.raises(IcetideError, match=r"x\.defocus:1: expected 'start_view end_view"):
        read_defocus(path, 1)


def test_write_imod_defocus_plain_round_trip(tmp_path):
    path = tmp_path / "w.defocus"
    tilts = np.array([-60.0, -1.5, 0.0, 1.5, 60.0])
    u = np.array([30000.0, 31234.5, 32000.0, 29999.9, 35000.0])
    write_imod_defocus(path, tilts, u)
    lines = path.read_text().splitlines()
    assert lines[0].split() == ["1", "1", "-60.0000", "-60.0000", "3000.0000", "2"]
    assert lines[4].split() == ["5", "5", "60.0000", "60.0000", "3500.0000"]
    table = read_defocus(path, 5)
    np.testing.assert_allclose(table.defocus_u_A, u, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(table.defocus_v_A, table.defocus_u_A)
    # the same values as v = u: still the plain format
    write_imod_defocus(path, tilts, u, u.copy(), np.full(5, 30.0))
    assert path.read_text().splitlines()[0].endswith(" 2")


def test_write_imod_defocus_astigmatic_round_trip(tmp_path):
    path = tmp_path / "a.defocus"
    tilts = np.array([-3.0, 0.0, 3.0])
    u = np.array([31000.0, 30000.0, 32000.0])
    v = np.array([30000.0, 31000.0, 31500.0])  # view 2 has v > u
    angle = np.array([45.0, 10.0, -30.5])
    write_imod_defocus(path, tilts, u, v, angle)
    lines = path.read_text().splitlines()
    assert lines[0] == "1 0 0.0 0.0 0 3"
    assert lines[2].split() == ["2", "2", "0.0000", "0.0000", "3000.0000", "3100.0000", "10.0000"]
    table = read_defocus(path, 3)
    # IMOD's convention u >= v: view 2 comes back as the same CTF with the axes swapped
    np.testing.assert_allclose(table.defocus_u_A, [31000.0, 31000.0, 32000.0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(table.defocus_v_A, [30000.0, 30000.0, 31500.0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(table.astigmatism_angle_deg, [45.0, -80.0, -30.5], rtol=0, atol=1e-9)
    with pytest.raises(IcetideError, match=r"b\.defocus: defocus U of view 2 is negative"):
        write_imod_defocus(tmp_path / "b.defocus", tilts, [1.0, -1.0, 1.0])
    with pytest.raises(IcetideError, match=r"c\.defocus: defocus_v_A has 2 values for 3"):
        write_imod_defocus(tmp_path / "c.defocus", tilts, u, v[:2])
    assert not (tmp_path / "b.defocus").exists() and not (tmp_path / "c.defocus").exists()


# --------------------------------------------------------------------------------------------- RELION


def _relion_tilts() -> pd.DataFrame:
    return pd.DataFrame({
        "rlnMicrographName": ["1@TS_01.mrcs", "2@TS_01.mrcs", "3@TS_01.mrcs"],
        "rlnTomoNominalStageTiltAngle": [-3.0, 0.0, 3.0],
        "rlnDefocusU": [31000.5, 30000.25, 32000.0],
        "rlnDefocusV": [30500.0, 29800.0, 31900.75],
        "rlnDefocusAngle": [-45.5, 10.0, 80.25],
        "rlnMicrographPreExposure": [3.0, 0.0, 6.0],
    })


def test_relion_tilt_series_star(tmp_path):
    path = tmp_path / "TS_01.star"
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnVoltage": [300.0]})
    starfile.write({"optics": optics, "TS_01": _relion_tilts()}, path)
    table = read_defocus(path, 3)
    assert table.source == "RELION"
    np.testing.assert_array_equal(table.defocus_u_A, [31000.5, 30000.25, 32000.0])
    np.testing.assert_array_equal(table.defocus_v_A, [30500.0, 29800.0, 31900.75])
    np.testing.assert_array_equal(table.astigmatism_angle_deg, [-45.5, 10.0, 80.25])
    np.testing.assert_array_equal(read_pre_exposure(path, 3), [3.0, 0.0, 6.0])


def test_relion_star_errors(tmp_path):
    path = tmp_path / "TS_02.star"
    starfile.write({"TS_02": _relion_tilts()}, path)
    with pytest.raises(IcetideError, match=r"TS_02\.star: defocus for 3 views, the stack has 2"):
        read_defocus(path, 2)
    with pytest.raises(IcetideError, match=r"TS_02\.star: pre-exposure for 3 views, the stack has 4"):
        read_pre_exposure(path, 4)
    starfile.write({"TS_02": _relion_tilts().drop(columns="rlnDefocusAngle")}, path)
    with pytest.raises(IcetideError, match=r"TS_02\.star: no data block has rlnDefocusAngle"):
        read_defocus(path, 3)
    starfile.write({"TS_02": _relion_tilts().assign(rlnDefocusV=[30500.0, -1.0, 31900.0])}, path)
    with pytest.raises(IcetideError, match=r"TS_02\.star: rlnDefocusV of row 2 is negative"):
        read_defocus(path, 3)
    starfile.write({"a": _relion_tilts(), "b": _relion_tilts()}, path)
    with pytest.raises(IcetideError, match=r"TS_02\.star: 2 data blocks \(a, b\) have"):
        read_defocus(path, 3)


# ------------------------------------------------------------------------------------------- SerialEM

# stack order = tilt order -20..20; dose-symmetric acquisition 0, +10, -10, -20, +20 across midnight
_DOSE_SYMMETRIC = [
    {"TiltAngle": -20.0, "ExposureDose": 2.0, "Defocus": -3.0, "DateTime": "13-Mar-2024  00:01:30"},
    {"TiltAngle": -10.0, "ExposureDose": 2.5, "Defocus": -3.25, "DateTime": "13-Mar-24  00:00:10"},
    {"TiltAngle": 0.0, "ExposureDose": 3.0, "Defocus": -3.5, "DateTime": "12-Mar-24  23:58:00"},
    {"TiltAngle": 10.0, "ExposureDose": 3.5, "Defocus": -3.75, "DateTime": "12-Mar-24  23:59:30"},
    {"TiltAngle": 20.0, "ExposureDose": 4.0, "Defocus": -4.0, "DateTime": "13-Mar-2024  00:03:00"},
]


def test_mdoc_dose_symmetric_pre_exposure_and_defocus(tmp_path):
    path = tmp_path / "TS_01.mrc.mdoc"
    path.write_text(_mdoc(_DOSE_SYMMETRIC))
    # acquired: z2 (3.0), z3 (3.5), z1 (2.5), z0 (2.0), z4 -> before each: 0, 3, 6.5, 9, 11
    np.testing.assert_array_equal(read_pre_exposure(path, 5), [9.0, 6.5, 0.0, 3.0, 11.0])
    table = read_defocus(path, 5)
    assert table.source == "SerialEM"
    np.testing.assert_array_equal(table.defocus_u_A, [30000.0, 32500.0, 35000.0, 37500.0, 40000.0])
    np.testing.assert_array_equal(table.defocus_v_A, table.defocus_u_A)
    np.testing.assert_array_equal(table.astigmatism_angle_deg, np.zeros(5))


def test_mdoc_prior_record_dose_is_used_directly(tmp_path):
    # PriorRecordDose also counts Preview/View images taken in tasks, so it exceeds the ExposureDose sum
    sections = [dict(s, PriorRecordDose=p) for s, p in zip(_DOSE_SYMMETRIC, [9.5, 7.0, 0.0, 3.2, 11.8])]
    path = tmp_path / "prior.mdoc"
    path.write_text(_mdoc(sections))
    np.testing.assert_array_equal(read_pre_exposure(path, 5), [9.5, 7.0, 0.0, 3.2, 11.8])


def test_mdoc_errors(tmp_path):
    path = tmp_path / "bad.mdoc"
    path.write_text(_mdoc([{k: v for k, v in s.items() if k != "DateTime"} for s in _DOSE_SYMMETRIC]))
    with pytest.raises(IcetideError, match=r"bad\.mdoc: \[ZValue = 0\] has no DateTime"):
        read_pre_exposure(path, 5)
    path.write_text(_mdoc(_DOSE_SYMMETRIC[:2] + [{"TiltAngle": 0.0, "DateTime": "12-Mar-24 23:58:00"}]))
    with pytest.raises(IcetideError, match=r"bad\.mdoc: \[ZValue = 2\] has no Defocus"):
        read_defocus(path, 3)
    with pytest.raises(IcetideError, match=r"bad\.mdoc: \[ZValue = 2\] has neither PriorRecordDose nor"):
        read_pre_exposure(path, 3)
    with pytest.raises(IcetideError, match=r"bad\.mdoc: defocus for 3 views, the stack has 5"):
        read_defocus(path, 5)
    path.write_text(_mdoc([dict(_DOSE_SYMMETRIC[0], Defocus=0.5)]))
    with pytest.raises(IcetideError, match=r"bad\.mdoc: \[ZValue = 0\] Defocus = 0\.5 um is overfocus"):
        read_defocus(path, 1)
    path.write_text(_mdoc([dict(_DOSE_SYMMETRIC[0], DateTime="2024-03-12 10:00:00")]))
    with pytest.raises(IcetideError, match=r"bad\.mdoc: \[ZValue = 0\] DateTime is not"):
        read_pre_exposure(path, 1)


# ---------------------------------------------------------------------------- plain list, dispatch


def test_pre_exposure_plain_round_trip_and_comments(tmp_path):
    path = tmp_path / "pre_exposure.txt"
    values = np.array([9.0, 6.5, 0.0, 3.0, 11.0, 0.1])
    write_pre_exposure(path, values)
    assert path.read_text().startswith("#") and "electrons per square Angstrom" in path.read_text()
    np.testing.assert_array_equal(read_pre_exposure(path, 6), values)
    (tmp_path / "hand.txt").write_text("# e/A^2\n3.0\n\n0  # first\n6.0\n")
    np.testing.assert_array_equal(read_pre_exposure(tmp_path / "hand.txt", 3), [3.0, 0.0, 6.0])


def test_pre_exposure_plain_errors(tmp_path):
    path = tmp_path / "dose.txt"
    path.write_text("3.0\n0.0\n")
    with pytest.raises(IcetideError, match=r"dose\.txt: pre-exposure for 2 views, the stack has 3"):
        read_pre_exposure(path, 3)
    path.write_text("3.0\n-1.0\n")
    with pytest.raises(IcetideError, match=r"dose\.txt:2: pre-exposure must be a finite number >= 0"):
        read_pre_exposure(path, 2)
    path.write_text("3.0 4.0\n")
    with pytest.raises(IcetideError, match=r"dose\.txt:1: expected one pre-exposure value"):
        read_pre_exposure(path, 1)
    with pytest.raises(IcetideError, match=r"w\.txt: pre-exposure of view 2 is not a finite number"):
        write_pre_exposure(tmp_path / "w.txt", [1.0, np.nan])
    assert not (tmp_path / "w.txt").exists()


def test_defocus_dispatch_of_unknown_text(tmp_path):
    imod_as_txt = tmp_path / "defocus.txt"  # IMOD content without the .defocus extension
    imod_as_txt.write_text("1 1 0.0 0.0 3000.0 2\n")
    assert read_defocus(imod_as_txt, 1).source == "IMOD"
    garbage = tmp_path / "notes.txt"
    garbage.write_text("defocus was about 3 um\n")
    with pytest.raises(IcetideError, match=r"notes\.txt: not a recognised defocus file \(supported: CTFFIND4"):
        read_defocus(garbage, 1)
    with pytest.raises(IcetideError, match=r"missing\.defocus: no such file"):
        read_defocus(tmp_path / "missing.defocus", 1)
