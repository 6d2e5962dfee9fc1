"""``icetide fbp``: output shape/header, methods, alignment inputs, and refusal of bad input before any output."""

import logging
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from icetide import __version__
from icetide.alignment import deformations_to_xf
from icetide.cli.main import app
from icetide.deform import Deformations, warp_images
from icetide.io import read_mrc, read_mrc_labels, write_deformations, write_mrc, write_tlt
from icetide.io.imod import write_xf
from icetide.classical import fbp as fbp_volume
from icetide.classical import project
from icetide.runlog import LOG_NAME

runner = CliRunner()

ANGLES = np.arange(-60.0, 61.0, 10.0)
SHAPE = (20, 24)  # detector (ny, nx)


def _volume() -> torch.Tensor:
    z, y, x = torch.meshgrid(
        torch.arange(10.0) - 4.5, torch.arange(20.0) - 9.5, torch.arange(24.0) - 11.5, indexing="ij"
    )
    return torch.exp(-((x - 3) ** 2 + (y + 2) ** 2 + z**2) / 12) + 0.5 * torch.exp(-((x + 4) ** 2 + (y - 3) ** 2) / 8)


@pytest.fixture
def clean(tmp_path):
    """An undeformed tilt series (13 tilts, 20 x 24) with its angle file; pixel size 6.5 A in the header."""
    series = project(_volume(), torch.tensor(np.deg2rad(ANGLES))).numpy()
    write_mrc(tmp_path / "ts.mrc", series, 6.5, stack=True)
    write_tlt(tmp_path / "ts.tlt", ANGLES)
    return tmp_path / "ts.mrc", tmp_path / "ts.tlt", series


@pytest.fixture
def deformed(tmp_path, clean):
    """The same series with known shifts and rotations applied, and the deformations that undo them."""
    _, tlt, series = clean
    m = len(ANGLES)
    rng = np.random.default_rng(0)
    d = Deformations(ANGLES, rng.uniform(-2, 2, (m, 2)), rng.uniform(-2, 2, m), np.zeros((m, 2, 2, 2)), SHAPE)
    observed = warp_images(torch.as_tensor(series), **d.tensors(), interpolation=d.local_interpolation).numpy()
    write_mrc(tmp_path / "deformed.mrc", observed, 6.5, stack=True)
    return tmp_path / "deformed.mrc", tlt, d


def _run(*args):
    return runner.invoke(app, ["fbp", *(str(a) for a in args)])


def _corr(a, b) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def test_fbp_writes_the_volume_with_the_pixel_size(tmp_path, clean):
    mrc, tlt, series = clean
    out = tmp_path / "vol.mrc"
    result = _run(mrc, "--angles", tlt, "-o", out, "--thickness", 10, "--device", "cpu")
    assert result.exit_code == 0, result.output
    vol, voxel = read_mrc(out)
    assert vol.shape == (10, 20, 24) and voxel == pytest.approx(6.5)
    np.testing.assert_allclose(vol, fbp_volume(torch.as_tensor(series), ANGLES, 10).numpy(), rtol=1e-5, atol=1e-5)
    assert _corr(vol, _volume().numpy()) > 0.9


def test_invert_and_polarity_set_the_sign_and_the_header_label_states_it(tmp_path, clean):
    mrc, tlt, series = clean
    write_mrc(tmp_path / "dark.mrc", -series, 6.5, stack=True)
    volumes = {}
    for name, stack, extra in (("plain", mrc, []), ("bright", tmp_path / "dark.mrc", ["--invert"]),
                               ("input", tmp_path / "dark.mrc", ["--invert", "--polarity", "input"])):
        result = _run(stack, "--angles", tlt, "-o", tmp_path / f"{name}.mrc", "--thickness", 10, "--device", "cpu",
                      *extra)
        assert result.exit_code == 0, result.output
        volumes[name] = read_mrc(tmp_path / f"{name}.mrc")[0]
    np.testing.assert_allclose(volumes["bright"], volumes["plain"], rtol=1e-5, atol=1e-6)  # dense = bright
    np.testing.assert_allclose(volumes["input"], -volumes["plain"], rtol=1e-5, atol=1e-6)  # as the dark input
    labels = {name: " ".join(read_mrc_labels(tmp_path / f"{name}.mrc")) for name in volumes}
    assert "icetide: density bright (positive = dense), as in the input images" in labels["plain"]
    assert "icetide: density bright (positive = dense), the input images inverted" in labels["bright"]
    assert "icetide: density dark (negative = dense), as in the input images" in labels["input"]


def test_default_thickness_filter_and_pixel_size_override(tmp_path, clean):
    mrc, tlt, series = clean
    out = tmp_path / "vol.mrc"
    result = _run(mrc, "-a", tlt, "-o", out, "--filter", "hann", "--pixel-size", 3.0, "--device", "cpu")
    assert result.exit_code == 0, result.output
    vol, voxel = read_mrc(out)
    assert vol.shape == (10, 20, 24)  # max(8, min(20, 24) // 2)
    assert voxel == pytest.approx(3.0)
    np.testing.assert_allclose(vol, fbp_volume(torch.as_tensor(series), ANGLES, 10, "hann").numpy(), atol=1e-5)


def test_sirt_with_positivity(tmp_path, clean, monkeypatch):
    mrc, tlt, _ = clean
    out = tmp_path / "sirt.mrc"
    args = [mrc, "-a", tlt, "-o", out, "--thickness", 10, "--method", "sirt", "--iterations", 15, "--positivity",
            "--device", "cpu"]
    monkeypatch.setattr(sys, "argv", ["icetide", "fbp", *map(str, args)])  # as the shell sets it: in the log
    result = _run(*args)
    assert result.exit_code == 0, result.output
    vol, _ = read_mrc(out)
    assert vol.shape == (10, 20, 24) and vol.min() >= 0
    assert _corr(vol, _volume().numpy()) > 0.9
    # the log of a single output file is beside it
    log = (tmp_path / LOG_NAME).read_text()
    assert f"icetide {__version__}" in log and f"command: icetide fbp {mrc} -a {tlt} -o {out}" in log
    assert "SIRT iteration 10/15" in log and "SIRT iteration 15/15" in log and f"wrote {out}" in log
    assert not logging.getLogger("icetide").handlers


def test_refuses_to_overwrite_without_force(tmp_path, clean):
    mrc, tlt, _ = clean
    out = tmp_path / "vol.mrc"
    out.write_text("keep me")
    result = _run(mrc, "-a", tlt, "-o", out, "--device", "cpu")
    assert result.exit_code == 2 and "--force" in result.output
    assert out.read_text() == "keep me"
    result = _run(mrc, "-a", tlt, "-o", out, "--force", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert read_mrc(out)[0].shape == (10, 20, 24)


@pytest.mark.parametrize("source", ["deformations", "xf"])
def test_alignment_from_deformations_or_xf_improves_the_reconstruction(tmp_path, clean, deformed, source):
    mrc, tlt, d = deformed
    if source == "deformations":
        path = tmp_path / "deformations.json"
        write_deformations(path, d)
    else:
        path = tmp_path / "ts.xf"
        write_xf(path, deformations_to_xf(d))
    aligned, raw = tmp_path / "aligned.mrc", tmp_path / "raw.mrc"
    assert _run(mrc, "-a", tlt, "-o", aligned, "--thickness", 10, f"--{source}", path, "--device", "cpu").exit_code == 0
    assert _run(mrc, "-a", tlt, "-o", raw, "--thickness", 10, "--device", "cpu").exit_code == 0
    reference = fbp_volume(torch.as_tensor(clean[2]), ANGLES, 10).numpy()
    c_aligned, c_raw = _corr(read_mrc(aligned)[0], reference), _corr(read_mrc(raw)[0], reference)
    assert c_aligned > 0.97 and c_aligned > c_raw + 0.05


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--method", "art"], "--method"),
        (["--filter", "cosine"], "--filter"),
        (["--method", "sirt", "--filter", "hann"], "--filter"),
        (["--iterations", "5"], "sirt only"),
        (["--positivity"], "sirt only"),
        (["--method", "sirt", "--iterations", "0"], "--iterations"),
        (["--deformations", "d.json", "--xf", "a.xf"], "exclude each other"),
        (["--xf", "a.xf", "--tilt-axis-angle", "3"], "--tilt-axis-angle"),
        (["--thickness", "0"], "--thickness"),
        (["--polarity", "dark"], "--polarity: Input should be 'bright' or 'input'"),
        (["--bin", "0"], "--bin: Input should be greater than or equal to 1"),
        (["--voltage", "0"], "--voltage: Input should be greater than 0"),
        (["--defocus-hand", "2"], "--defocus-hand: Input should be 1 or -1"),
        (["--xf", "missing.xf"], "missing.xf"),
    ],
)
def test_bad_input_fails_on_one_line_and_writes_nothing(tmp_path, clean, extra, message):
    mrc, tlt, _ = clean
    out = tmp_path / "vol.mrc"
    result = _run(mrc, "-a", tlt, "-o", out, "--device", "cpu", *extra)
    assert result.exit_code == 2, result.output
    assert message in result.output and result.output.strip().startswith("error:")
    assert not out.exists() and not (tmp_path / LOG_NAME).exists()


def test_mismatched_deformations_and_angles_are_refused(tmp_path, clean):
    mrc, tlt, _ = clean
    path = tmp_path / "d.json"
    write_deformations(path, Deformations.identity(ANGLES[:-1], SHAPE))
    result = _run(mrc, "-a", tlt, "-o", tmp_path / "v.mrc", "--deformations", path, "--device", "cpu")
    assert result.exit_code == 2 and "tilts" in result.output
    write_deformations(path, Deformations.identity(ANGLES + 1.0, SHAPE))
    result = _run(mrc, "-a", tlt, "-o", tmp_path / "v.mrc", "--deformations", path, "--device", "cpu")
    assert result.exit_code == 2 and "tilt angles differ" in result.output
    assert not (tmp_path / "v.mrc").exists()


def test_defocus_and_pre_exposure_correct_the_images_before_fbp(tmp_path, clean):
    from icetide.ctf import Microscope, exposure_weight_series, phase_flip_series
    from icetide.io import write_imod_defocus, write_pre_exposure

    stack, tlt, series = clean
    defocus = np.linspace(8000.0, 12000.0, len(ANGLES))
    dose = 2.0 * np.arange(len(ANGLES))
    write_imod_defocus(tmp_path / "ts.defocus", ANGLES, defocus)
    write_pre_exposure(tmp_path / "ts.dose", dose)
    out = tmp_path / "v.mrc"
    result = runner.invoke(app, ["fbp", str(stack), "-a", str(tlt), "-o", str(out), "--thickness", "10",
                                 "--defocus", str(tmp_path / "ts.defocus"), "--pre-exposure", str(tmp_path / "ts.dose"),
                                 "--amplitude-contrast", "0.1"])
    assert result.exit_code == 0, result.output
    corrected = exposure_weight_series(
        phase_flip_series(torch.from_numpy(series), ANGLES, 6.5, defocus, Microscope(amplitude_contrast=0.1)), 6.5, dose
    )
    expected = fbp_volume(corrected, ANGLES, 10).numpy()
    np.testing.assert_allclose(read_mrc(out)[0], expected, atol=1e-4 * np.abs(expected).max())


def test_the_defocus_gradient_follows_the_tilt_axis_of_a_starting_alignment():
    from icetide.ctf import tilt_axis_on_images_deg

    assert tilt_axis_on_images_deg(12.0) == 12.0
    # An .xf of a series whose axis is at 85 degrees holds rotations of about -85 degrees.
    assert tilt_axis_on_images_deg(0.0, np.array([-85.2, -84.9, -85.0, -85.1, -90.0])) == pytest.approx(85.1)


def test_mdoc_and_exclude_go_through_reconstructs_loader(tmp_path, clean):
    stack, tlt, series = clean
    sections = "".join(f"[ZValue = {k}]\nTiltAngle = {a}\n\n" for k, a in enumerate(ANGLES))
    (tmp_path / "ts.mdoc").write_text(f"PixelSpacing = 6.5\nTiltAxisAngle = 0\n\n{sections}")
    assert _run(stack, "--angles", tlt, "-o", tmp_path / "angles.mrc").exit_code == 0
    result = _run(stack, "--mdoc", tmp_path / "ts.mdoc", "-o", tmp_path / "mdoc.mrc")
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(read_mrc(tmp_path / "mdoc.mrc")[0], read_mrc(tmp_path / "angles.mrc")[0])

    # --exclude leaves the views out: the same volume as the stack without them
    kept = [k for k in range(len(ANGLES)) if k not in (0, 1, 12)]
    write_mrc(tmp_path / "kept.mrc", series[kept], 6.5, stack=True)
    write_tlt(tmp_path / "kept.tlt", ANGLES[kept])
    assert _run(tmp_path / "kept.mrc", "--angles", tmp_path / "kept.tlt", "-o", tmp_path / "kept_vol.mrc").exit_code == 0
    result = _run(stack, "--angles", tlt, "--exclude", "0-1,12", "-o", tmp_path / "excluded.mrc")
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(read_mrc(tmp_path / "excluded.mrc")[0], read_mrc(tmp_path / "kept_vol.mrc")[0])
    result = _run(stack, "--angles", tlt, "--exclude", "13", "-o", tmp_path / "bad.mrc")
    assert result.exit_code != 0 and "outside 0..12" in result.output and not (tmp_path / "bad.mrc").exists()
    result = _run(stack, "-o", tmp_path / "none.mrc")
    assert result.exit_code != 0 and "exactly one of --angles" in result.output


def test_an_axis_nearer_the_image_x_axis_turns_the_volume_so_that_its_y_runs_along_the_axis(tmp_path, clean):
    mrc, tlt, series = clean
    # The same views turned by a quarter: 24 x 20 images whose tilt axis lies at +90 degrees.
    write_mrc(tmp_path / "turned.mrc", np.ascontiguousarray(np.rot90(series, -1, axes=(1, 2))), 6.5, stack=True)
    out = tmp_path / "vol.mrc"
    result = _run(tmp_path / "turned.mrc", "--angles", tlt, "--tilt-axis-angle", 90, "-o", out, "--thickness", 10,
                  "--device", "cpu")
    assert result.exit_code == 0, result.output
    vol, _ = read_mrc(out)
    assert vol.shape == (10, 20, 24)  # not the detector's 24 x 20, which would cut the field along the axis
    np.testing.assert_allclose(vol, fbp_volume(torch.as_tensor(series), ANGLES, 10).numpy(), rtol=1e-4, atol=1e-4)
