"""A RELION-5 tomography project as input: the reader, ``icetide reconstruct STAR`` and ``icetide batch STAR``.

The project is laid out and written (with ``starfile``) as RELION-5 lays out and writes it, with the column sets
of its ImportTomo, MotionCorr and CtfFind jobs (see :mod:`icetide.io.relion_project`): rows in acquisition order
(dose-symmetric), one motion-corrected MRC per tilt under ``MotionCorr/job002/frames/``, paths relative to the
project folder.
"""

import json

import numpy as np
import pandas as pd
import pytest
import starfile
from cli_helpers import ANGLES, SHAPE, TINY_VOLUME_YAML
from cli_helpers import run_cli as _run

from icetide.batch import load_item, find_items
from icetide.inputs import load_inputs, relion_inputs
from icetide.config import ReconstructConfig
from icetide.deform import Deformations
from icetide.errors import IcetideError
from icetide.io import (
    RelionTomogram, read_mdoc, read_tlt, relion_series, write_mdoc, write_mrc, write_relion_tilt_series_star,
    write_relion_tomograms_star,
)
from icetide.io.relion_project import names_stack_slices
from icetide.simulate import crowded_phantom, simulate_tilt_series

ORDER = [3, 4, 2, 1, 5, 6, 0]  # dose-symmetric acquisition: 0, 15, -15, -30, 30, 45, -45 degrees
ACQUIRED = ANGLES[ORDER]
ORIGINAL_PIXEL_A, BINNING = 4.0, 2
DEFOCUS_U = 20000.0 + 150.0 * np.arange(len(ORDER))  # per STAR row
DEFOCUS_V = DEFOCUS_U - 300.0
DEFOCUS_ANGLE = 30.0 + np.arange(len(ORDER))
DOSE_PER_TILT = 3.0
AXIS_DEG = 85.0


def _images(seed: int) -> np.ndarray:
    """``(7, ny, nx)`` simulated images at :data:`ANGLES` (sorted)."""
    sim = simulate_tilt_series(crowded_phantom(SHAPE, seed=1), ANGLES, snr_db=20, seed=seed, samples_per_voxel=1.0)
    return sim.noisy.astype(np.float32)


def _movie(name: str, row: int) -> str:
    return f"frames/{name}_{row:03d}_{ACQUIRED[row]:.1f}.tif"


def _micrograph(name: str, row: int, suffix: str = "") -> str:
    """MotionCorr's name of a row's micrograph: the movie's, under the job's frames/, dots made underscores."""
    return f"MotionCorr/job002/frames/{name}_{row:03d}_{ACQUIRED[row]:.1f}".replace(".", "_") + suffix + ".mrc"


def _import_rows(name: str, axis: float) -> dict:
    """ImportTomo's per-series columns (serialem.py), rows in acquisition order."""
    n = len(ORDER)
    return {"rlnMicrographMovieName": [_movie(name, k) for k in range(n)], "rlnTomoTiltMovieFrameCount": [8] * n,
            "rlnTomoNominalStageTiltAngle": ACQUIRED, "rlnTomoNominalTiltAxisAngle": [axis] * n,
            "rlnMicrographPreExposure": DOSE_PER_TILT * np.arange(n), "rlnTomoNominalDefocus": [-4.0] * n}


def _motioncorr_rows(name: str, halves: bool) -> dict:
    """What MotionCorr adds (motioncorr_runner.cpp): the micrographs, even/odd sums with its even/odd split."""
    n = len(ORDER)
    rows = {"rlnMicrographName": [_micrograph(name, k) for k in range(n)],
            "rlnMicrographMetadata": [_micrograph(name, k).replace(".mrc", ".star") for k in range(n)],
            "rlnAccumMotionTotal": [2.0] * n, "rlnAccumMotionEarly": [1.0] * n, "rlnAccumMotionLate": [1.0] * n}
    if halves:
        rows["rlnMicrographNameEven"] = [_micrograph(name, k, "_EVN") for k in range(n)]
        rows["rlnMicrographNameOdd"] = [_micrograph(name, k, "_ODD") for k in range(n)]
    return rows


def _ctffind_rows(name: str) -> dict:
    """What CtfFind adds (ctffind_runner.cpp)."""
    n = len(ORDER)
    return {"rlnCtfImage": [_micrograph(name, k).replace("MotionCorr/job002", "CtfFind/job003").replace(
                ".mrc", "_PS.ctf:mrc") for k in range(n)],
            "rlnDefocusU": DEFOCUS_U, "rlnDefocusV": DEFOCUS_V, "rlnCtfAstigmatism": DEFOCUS_U - DEFOCUS_V,
            "rlnDefocusAngle": DEFOCUS_ANGLE, "rlnCtfFigureOfMerit": [0.03] * n, "rlnCtfMaxResolution": [8.5] * n}


def _write_job(project, job: str, star_name: str, names, per_series, pixel: bool) -> None:
    """A job's global STAR ``<job>/<star_name>`` and its per-series STARs ``<job>/tilt_series/<name>.star``."""
    rows = []
    (project / job / "tilt_series").mkdir(parents=True)
    for name in names:
        starfile.write({name: pd.DataFrame(per_series(name))}, project / job / "tilt_series" / f"{name}.star")
        row = {"rlnTomoName": name, "rlnTomoTiltSeriesStarFile": f"{job}/tilt_series/{name}.star",
               "rlnVoltage": 300.0, "rlnSphericalAberration": 2.7, "rlnAmplitudeContrast": 0.1,
               "rlnMicrographOriginalPixelSize": ORIGINAL_PIXEL_A, "rlnTomoHand": -1.0}
        if pixel:  # MotionCorr: the original pixel size times its binning
            row["rlnTomoTiltSeriesPixelSize"] = ORIGINAL_PIXEL_A * BINNING
        rows.append(row)
    starfile.write({"global": pd.DataFrame(rows)}, project / job / star_name)


def write_project(root, names=("TS_01",), halves=False, axis=AXIS_DEG):
    """A RELION-5 project after ImportTomo (job001), MotionCorr (job002) and CtfFind (job003); returns it."""
    project = root / "project"
    (project / "MotionCorr" / "job002" / "frames").mkdir(parents=True)
    for seed, name in enumerate(names):
        images = _images(seed)
        for row, view in enumerate(ORDER):  # no pixel size in the headers: the STAR's must be used
            write_mrc(project / _micrograph(name, row), images[view])
            if halves:
                write_mrc(project / _micrograph(name, row, "_EVN"), images[view] + 0.01)
                write_mrc(project / _micrograph(name, row, "_ODD"), images[view] - 0.01)
    _write_job(project, "ImportTomo/job001", "tilt_series.star", names, lambda n: _import_rows(n, axis), False)
    _write_job(project, "MotionCorr/job002", "corrected_tilt_series.star", names,
               lambda n: {**_import_rows(n, axis), **_motioncorr_rows(n, halves)}, True)
    _write_job(project, "CtfFind/job003", "tilt_series_ctf.star", names,
               lambda n: {**_import_rows(n, axis), **_motioncorr_rows(n, halves), **_ctffind_rows(n)}, True)
    return project


CTF_STAR = "CtfFind/job003/tilt_series_ctf.star"


def test_the_reader_stacks_the_micrographs_in_tilt_angle_order(tmp_path):
    project = write_project(tmp_path, halves=True)
    found = relion_series(project / CTF_STAR)
    by_angle = np.argsort(ACQUIRED)
    np.testing.assert_array_equal(found.star_rows, by_angle)
    np.testing.assert_array_equal(found.tilt_angles_deg, ANGLES)
    assert found.images == tuple(project / _micrograph("TS_01", k) for k in by_angle)
    assert found.even == tuple(project / _micrograph("TS_01", k, "_EVN") for k in by_angle)
    assert found.odd == tuple(project / _micrograph("TS_01", k, "_ODD") for k in by_angle)
    np.testing.assert_array_equal(found.defocus_A, np.stack([DEFOCUS_U, DEFOCUS_V, DEFOCUS_ANGLE], 1)[by_angle])
    np.testing.assert_array_equal(found.pre_exposure_e_per_A2, DOSE_PER_TILT * by_angle)
    assert found.tilt_axis_angle_deg == AXIS_DEG and found.name == "TS_01"
    entry = found.entry
    assert entry.pixel_size_A == ORIGINAL_PIXEL_A * BINNING and entry.hand == -1 and entry.project_dir == project
    assert (entry.voltage_kV, entry.spherical_aberration_mm, entry.amplitude_contrast) == (300.0, 2.7, 0.1)

    # What reconstruct loads: the images of each angle where the angle is, the STAR's pixel size and axis.
    got, line = relion_inputs(found, dict(angles=None, mdoc=None, defocus=None, pre_exposure=None, half_series=None,
                                          half_maps="none"))
    assert line == ("RELION-5 series TS_01: 7 micrographs in tilt-angle order, defocus (rlnDefocusU/V), "
                    "pixel 8 A, nominal tilt axis 85 deg, hand -1")
    assert got["ctf"] == {"voltage_kV": 300.0, "spherical_aberration_mm": 2.7, "amplitude_contrast": 0.1,
                          "defocus_hand": -1}
    series, init, stack = load_inputs(got["tilt_series"], got["angles"], None, got["pixel_size"],
                                      got["tilt_axis_angle"], "0", False, image_names=got["image_names"],
                                      defocus=got["defocus"], pre_exposure=got["pre_exposure"])
    np.testing.assert_array_equal(series.images, _images(0)[1:])
    assert series.pixel_size_A == 8.0 and series.tilt_axis_angle_deg == AXIS_DEG and init is None
    np.testing.assert_array_equal(series.defocus_A, found.defocus_A[1:])
    assert stack.image_names == tuple(str(p.resolve()) for p in found.images) and list(stack.kept) == list(range(1, 7))
    # By default the even/odd sums are the two half series (odd first, as for AreTomo3's ODD/EVN).
    got, line = relion_inputs(found, dict(got, angles=None, half_maps=None, defocus=None, pre_exposure=None))
    assert got["tilt_series"] == list(found.odd) and got["half_series"] == list(found.even)
    assert "half series rlnMicrographNameOdd/Even" in line
    series = load_inputs(got["tilt_series"], got["angles"], None, None, None, None, False,
                         half_series=got["half_series"])[0]
    np.testing.assert_allclose(series.images, _images(0) - 0.01, atol=1e-6)
    np.testing.assert_allclose(series.half_images, _images(0) + 0.01, atol=1e-6)


def test_the_tilt_axis_is_the_mdoc_angle_as_it_is(tmp_path):
    """ImportTomo's tilt axis is the nominal rotation angle, CCW from Y (SerialEM's, which icetide reads as is)."""
    project = write_project(tmp_path)
    write_mdoc(tmp_path / "TS_01.mrc.mdoc", ANGLES, 8.0, "TS_01.mrc", (SHAPE[2], SHAPE[1]),
               tilt_axis_angle_deg=AXIS_DEG)
    mdoc_axis = read_mdoc(tmp_path / "TS_01.mrc.mdoc")["tilt_axis_angle_deg"]
    assert relion_series(project / CTF_STAR).tilt_axis_angle_deg == mdoc_axis == AXIS_DEG


def test_motioncorr_and_importtomo_stars(tmp_path):
    project = write_project(tmp_path)
    found = relion_series(project / "MotionCorr/job002/corrected_tilt_series.star")
    assert found.defocus_A is None and found.even is None and found.entry.pixel_size_A == 8.0
    assert found.images[0] == project / _micrograph("TS_01", ORDER.index(0))  # -45 degrees: acquired last
    with pytest.raises(IcetideError, match=r"names only the movies \(rlnMicrographMovieName\).*corrected_tilt_series"):
        relion_series(project / "ImportTomo/job001/tilt_series.star")


def _edit_series_star(project, job, edit) -> None:
    path = project / job / "tilt_series" / "TS_01.star"
    block = starfile.read(path)
    starfile.write({"TS_01": edit(block)}, path, overwrite=True)


def test_bad_projects_fail_in_one_line(tmp_path):
    project = write_project(tmp_path, names=("TS_01", "TS_02"))
    star = project / CTF_STAR
    with pytest.raises(IcetideError, match=r"holds 2 tilt series \(TS_01, TS_02\); name one \(--relion-name\)"):
        relion_series(star)
    with pytest.raises(IcetideError, match=r"no tilt series 'TS_03' \(rlnTomoName: TS_01, TS_02\)"):
        relion_series(star, "TS_03")
    with pytest.raises(IcetideError, match="this is the STAR of one series: give its job's tilt-series STAR"):
        relion_series(project / "CtfFind/job003/tilt_series/TS_01.star")
    (tmp_path / "other.star").write_text("data_particles\n\nloop_\n_rlnCoordinateX #1\n1.0\n")
    with pytest.raises(IcetideError, match="not a RELION-5 tilt-series STAR"):
        relion_series(tmp_path / "other.star")

    table = starfile.read(star)
    starfile.write({"global": table.drop(columns="rlnTomoHand")}, tmp_path / "no_hand.star")
    with pytest.raises(IcetideError, match="data_global lacks rlnTomoHand"):
        relion_series(tmp_path / "no_hand.star", "TS_01")
    moved = tmp_path / "elsewhere" / "tilt_series_ctf.star"  # outside the project: the relative paths lead nowhere
    moved.parent.mkdir()
    moved.write_text(star.read_text())
    with pytest.raises(IcetideError, match="CtfFind/job003/tilt_series/TS_01.star .rlnTomoTiltSeriesStarFile. not "
                                           "found in its folder or any folder above it"):
        relion_series(moved, "TS_01")

    missing = project / _micrograph("TS_02", 3)
    missing.unlink()
    with pytest.raises(IcetideError) as error:
        relion_series(star, "TS_02")
    assert str(error.value) == (f"{project / 'CtfFind/job003/tilt_series/TS_02.star'}: {_micrograph('TS_02', 3)} "
                                f"(rlnMicrographName, row 4) not found in the RELION project folder {project}")
    write_mrc(missing, np.ones((SHAPE[1], SHAPE[2] + 2), np.float32))
    load = relion_inputs(relion_series(star, "TS_02"), dict(angles=None, mdoc=None, defocus=None, pre_exposure=None,
                                                          half_series=None, half_maps=None))[0]
    with pytest.raises(IcetideError, match=r"image of 24 x 34 pixels, the first of the series .* has 24 x 32"):
        load_inputs(load["tilt_series"], load["angles"], None, None, None, None, False)

    _edit_series_star(project, "CtfFind/job003", lambda b: b.drop(columns="rlnMicrographPreExposure"))
    with pytest.raises(IcetideError, match="lacks rlnMicrographPreExposure"):
        relion_series(star, "TS_01")
    _edit_series_star(project, "CtfFind/job003", lambda b: b.assign(
        rlnMicrographName=[f"{k + 1}@stack.mrcs" for k in range(len(b))]))
    with pytest.raises(IcetideError, match=r"rlnMicrographName names slices of a stack \(k@stack"):
        relion_series(star, "TS_01")


def test_reconstruct_a_ctffind_star_names_each_views_micrograph(tmp_path):
    project = write_project(tmp_path, axis=0.0)
    (tmp_path / "tiny.yaml").write_text(TINY_VOLUME_YAML + "fit: {tilts_per_step: 4}\n")
    out = tmp_path / "rec"
    result = _run("reconstruct", project / CTF_STAR, "-o", out, "--epochs", 1, "--thickness", 12, "--exclude", "1",
                  "--config", tmp_path / "tiny.yaml", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "RELION-5 series TS_01: 7 micrographs in tilt-angle order" in " ".join(result.output.split())
    kept = [k for k in np.argsort(ACQUIRED) if ACQUIRED[k] != ANGLES[1]]  # STAR rows of the views kept
    block = starfile.read(out / "TS_01.star", always_dict=True)["TS_01"]
    assert list(block["rlnMicrographName"]) == [str((project / _micrograph("TS_01", k)).resolve()) for k in kept]
    np.testing.assert_allclose(block["rlnTomoNominalStageTiltAngle"], np.delete(ANGLES, 1))
    np.testing.assert_allclose(read_tlt(out / "TS_01.tlt"), ANGLES)  # one line per view, stack order
    assert (out / "TS_01.exclude").read_text().split() == ["2"]
    tomograms = starfile.read(out / "tomograms.star")
    assert tomograms["rlnTomoHand"][0] == -1 and tomograms["rlnAmplitudeContrast"][0] == pytest.approx(0.1)
    assert tomograms["rlnTomoTiltSeriesPixelSize"][0] == pytest.approx(8.0)
    report = json.loads((out / "report.json").read_text())
    np.testing.assert_allclose(np.asarray(report["optics"]["defocus_A"])[:, 0], DEFOCUS_U[kept])
    assert "defocus_hand: -1" in (out / "config.yaml").read_text()

    result = _run("reconstruct", project / CTF_STAR, "--relion-name", "TS_09", "-o", tmp_path / "rec2")
    assert result.exit_code == 2 and "no tilt series 'TS_09' (rlnTomoName: TS_01)" in result.output
    result = _run("reconstruct", project / _micrograph("TS_01", 0), "--relion-name", "TS_01", "-o", tmp_path / "rec2")
    assert result.exit_code == 2 and "--relion-name needs a RELION-5 tilt-series STAR" in result.output
    assert not (tmp_path / "rec2").exists()


def test_batch_runs_every_series_of_the_star(tmp_path):
    project = write_project(tmp_path, names=("TS_01", "TS_02"), axis=0.0)
    items = find_items([str(project / CTF_STAR)])
    assert [(i.name, i.relion, i.side_files()) for i in items] == [
        ("TS_01", str(project / CTF_STAR), ""), ("TS_02", str(project / CTF_STAR), "")]
    config = ReconstructConfig()
    series, _, stack = load_item(items[1], config, tmp_path, False, "0")
    assert series.n_tilts == 6 and config.ctf.defocus_hand == -1 and config.ctf.amplitude_contrast == 0.1
    assert stack.image_names[0].endswith(_micrograph("TS_02", ORDER.index(0)))

    (tmp_path / "tiny.yaml").write_text(TINY_VOLUME_YAML + "fit: {tilts_per_step: 4}\n")
    out = tmp_path / "out"
    result = _run("batch", project / CTF_STAR, "-o", out, "--workers", 1, "--retries", 0, "--epochs", 1,
                  "--thickness", 12, "--config", tmp_path / "tiny.yaml", "--device", "cpu")
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads((out / "batch_summary.json").read_text())}
    assert set(rows) == {"TS_01", "TS_02"} and all(r["status"] == "done" for r in rows.values())
    for name in ("TS_01", "TS_02"):
        block = starfile.read(out / name / f"{name}.star", always_dict=True)[name]
        assert block["rlnMicrographName"][0].endswith(_micrograph(name, ORDER.index(0)))
        assert json.loads((out / name / "report.json").read_text())["batch"]["relion"] == str(project / CTF_STAR)


def test_batch_still_reads_icetides_own_tomograms_star_as_a_stack(tmp_path):
    """icetide's own RELION output names its images k@stack: batch keeps reading it as that stack."""
    stack = tmp_path / "ts.mrc"
    write_mrc(stack, _images(0), 8.0, stack=True)
    d = Deformations.identity(ANGLES, SHAPE[1:])
    write_relion_tilt_series_star(tmp_path / "ts.star", d, 8.0, "ts", stack)
    entry = RelionTomogram("ts", str(tmp_path / "ts.star"), 300.0, 2.7, 0.07, 8.0, 8.0, SHAPE[::-1])
    write_relion_tomograms_star(tmp_path / "tomograms.star", [entry])
    assert names_stack_slices(tmp_path / "ts.star")
    (item,) = find_items([str(tmp_path / "tomograms.star")])
    assert item.relion is None and item.stack == str(stack) and item.angles_deg == tuple(ANGLES)
    project = write_project(tmp_path / "p")
    assert not names_stack_slices(project / "CtfFind/job003/tilt_series/TS_01.star")
    assert not names_stack_slices(tmp_path / "nothing.star")
