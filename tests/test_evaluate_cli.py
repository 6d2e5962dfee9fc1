"""``icetide evaluate``: metrics.json and figures from tiny MRC files; bad input leaves nothing."""

import json

import numpy as np
import pytest
from scipy import ndimage
from typer.testing import CliRunner

from icetide.cli.main import app
from icetide.deform import Deformations, gauge_shifts
from icetide.io import write_deformations, write_mrc

runner = CliRunner()

SHAPE = (12, 20, 24)
ANGLES = np.arange(-40.0, 41.0, 20.0)


def _run(*args):
    return runner.invoke(app, ["evaluate", *(str(a) for a in args)])


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    inside = np.zeros(SHAPE)
    inside[3:-3, 4:-4, 4:-4] = 1  # content away from the faces, so that a shift loses none of it
    truth = ndimage.gaussian_filter(rng.normal(size=SHAPE), 1.2) * ndimage.gaussian_filter(inside, 1)
    truth = truth.astype(np.float32)
    shifted = ndimage.shift(truth, (0.5, -1.0, 1.5), order=3) + 0.05 * truth.std() * rng.normal(size=SHAPE)
    blurred = ndimage.gaussian_filter(truth, 1.0)
    paths = {"truth": tmp_path / "truth.mrc", "shifted": tmp_path / "shifted.mrc", "blurred": tmp_path / "blurred.mrc"}
    write_mrc(paths["truth"], truth, voxel_size_A=12.0)
    write_mrc(paths["shifted"], shifted, voxel_size_A=12.0)
    write_mrc(paths["blurred"], blurred)
    local = np.zeros((5, 2, 5, 5))
    local[:, :, 1:-1, 1:-1] = rng.uniform(-2, 2, (5, 2, 3, 3))
    true = Deformations(ANGLES, rng.uniform(-6, 6, (5, 2)), np.zeros(5), local, SHAPE[1:])
    est = Deformations(ANGLES, true.shifts_px + gauge_shifts((1, 2, 3), ANGLES), np.full(5, 0.02),
                       np.zeros((5, 2, 10, 10)), SHAPE[1:])
    paths["true_def"], paths["est_def"] = tmp_path / "true.json", tmp_path / "est.json"
    write_deformations(paths["true_def"], true)
    write_deformations(paths["est_def"], est)
    return paths


def test_evaluate_writes_metrics_and_figures(tmp_path, files):
    out = tmp_path / "eval"
    result = _run(
        files["shifted"], files["blurred"], "--truth", files["truth"], "-o", out, "--names", "shifted,blurred",
        "--truth-deformations", files["true_def"], "--deformations", files["est_def"],
    )
    assert result.exit_code == 0, result.output
    assert "shifted" in result.output and "FSC 0.143" in result.output
    report = json.loads((out / "metrics.json").read_text())
    assert report["voxel_size_A"] == pytest.approx(12.0) and report["shape_zyx"] == list(SHAPE)
    recons = report["reconstructions"]
    assert list(recons) == ["shifted", "blurred"]
    for r in recons.values():
        assert {"cc", "fsc", "shift_zyx_vox", "registered", "path"} <= set(r)
        assert {"frequency", "fsc", "n_voxels", "resolution"} <= set(r["fsc"])
        assert set(r["fsc"]["resolution"]) == {"0.5", "0.143"}
    np.testing.assert_allclose(recons["shifted"]["shift_zyx_vox"], [-0.5, 1.0, -1.5], atol=0.1)
    assert recons["shifted"]["cc"] > 0.98
    r05 = recons["blurred"]["fsc"]["resolution"]["0.5"]
    assert r05["angstrom"] == pytest.approx(12.0 * r05["voxels"])
    deform = report["deformations"]
    assert deform["shift_rms_px"] < 1e-6 and deform["rotation_mae_deg"] == pytest.approx(0.02)
    np.testing.assert_allclose(deform["gauge_translation_xyz_vox"], [1, 2, 3], atol=1e-6)
    assert deform["local_mean_error_px"] == pytest.approx(deform["local_true_mean_px"])
    for name in ("fsc.png", "fsc.csv", "orthoslices.png", "orthoslices.json", "fourier_slices.png",
                 "fourier_slices.json", "local_fields.png", "local_fields.json", "deformation_errors.png",
                 "deformation_errors.csv"):
        assert (out / name).stat().st_size > 0, name


def test_evaluate_default_names_mask_no_register_and_force(tmp_path, files):
    out = tmp_path / "eval"
    args = [files["shifted"], "--truth", files["truth"], "-o", out, "--no-register", "--mask-thickness", 6,
            "--taper", 2]
    assert _run(*args).exit_code == 0
    report = json.loads((out / "metrics.json").read_text())
    r = report["reconstructions"]["shifted"]
    assert r["shift_zyx_vox"] == [0.0, 0.0, 0.0] and not r["registered"] and r["masked"]
    assert r["cc"] < 0.9 and report["mask"] == {"slab_thickness_vox": 6.0} and report["fsc_taper_vox"] == 2.0
    assert not (out / "local_fields.png").exists()
    assert _run(*args).exit_code == 2  # output folder not empty
    assert _run(*args, "--force").exit_code == 0


@pytest.mark.parametrize(
    "case",
    ["shape", "names", "deformations_alone", "truth_deformations_alone", "other_tilts", "missing", "mask", "taper"],
)
def test_bad_input_exits_2_with_one_line_and_no_output(tmp_path, files, case):
    args = [files["shifted"], "--truth", files["truth"]]
    if case == "shape":
        small = tmp_path / "small.mrc"
        write_mrc(small, np.ones((12, 20, 20), np.float32))
        args = [files["shifted"], small, "--truth", files["truth"]]
    elif case == "names":
        args += ["--names", "a,b"]
    elif case == "deformations_alone":
        args += ["--deformations", files["est_def"]]
    elif case == "truth_deformations_alone":
        args += ["--truth-deformations", files["true_def"]]
    elif case == "other_tilts":
        d = Deformations(ANGLES[:3], np.zeros((3, 2)), np.zeros(3), np.zeros((3, 2, 2, 2)), SHAPE[1:])
        write_deformations(tmp_path / "three.json", d)
        args += ["--truth-deformations", files["true_def"], "--deformations", tmp_path / "three.json"]
    elif case == "missing":
        args = [tmp_path / "nope.mrc", "--truth", files["truth"]]
    elif case == "mask":
        args += ["--mask-thickness", 40]
    elif case == "taper":
        args += ["--taper", 6]
    out = tmp_path / "eval"
    result = _run(*args, "-o", out)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    if case == "shape":
        assert "(12, 20, 20)" in lines[0] and str(SHAPE) in lines[0]
    assert not out.exists()
