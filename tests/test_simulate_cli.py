"""``icetide simulate``: every output file, consistent shapes/angles/headers; bad input leaves nothing."""

import json

import mrcfile
import numpy as np
import pytest
from typer.testing import CliRunner

from icetide.cli.main import app
from icetide.io import read_defocus, read_deformations, read_mrc, read_pre_exposure, read_tlt, write_mrc
from icetide.simulate import crowded_phantom, measure_snr_db

runner = CliRunner()


@pytest.fixture
def volume_path(tmp_path):
    path = tmp_path / "vol.mrc"
    write_mrc(path, crowded_phantom((16, 32, 32), seed=3), voxel_size_A=7.5)
    return path


def _run(*args):
    return runner.invoke(app, ["simulate", *map(str, args)])


def test_simulate_writes_every_file_consistently(tmp_path, volume_path):
    out = tmp_path / "sim"
    result = _run(
        volume_path, "-o", out, "--tilt-min", -50, "--tilt-max", 50, "--tilt-step", 10, "--snr-db", 5, "--seed", 4
    )
    assert result.exit_code == 0, result.output
    angles = np.arange(-50, 51, 10.0)
    np.testing.assert_allclose(read_tlt(out / "tilt_series.tlt"), angles)
    stacks = ["tilt_series.mrc", "truth/clean_deformed.mrc", "truth/clean_undeformed.mrc", "truth/noisy_undeformed.mrc"]
    for name in stacks:
        data, px = read_mrc(out / name)
        assert data.shape == (11, 32, 32), name
        assert px == pytest.approx(7.5), name
        with mrcfile.open(out / name) as m:
            assert m.is_image_stack(), name
    vol, vx = read_mrc(out / "truth" / "volume.mrc")
    assert vol.shape == (16, 32, 32) and vx == pytest.approx(7.5)
    np.testing.assert_array_equal(vol, read_mrc(volume_path)[0])
    d = read_deformations(out / "truth" / "deformations.json")
    assert d.n_tilts == 11 and d.detector_shape == (32, 32)
    np.testing.assert_allclose(d.tilt_angles_deg, angles)
    assert np.abs(d.shifts_px).max() <= 6

    info = json.loads((out / "simulation.json").read_text())
    assert info["seed"] == 4 and info["profile"] == "paper" and info["bin"] == 1 and info["n_tilts"] == 11
    assert info["pixel_size_A"] == pytest.approx(7.5) and info["pixel_size_source"] == "MRC header"
    noisy, clean = read_mrc(out / "tilt_series.mrc")[0], read_mrc(out / "truth" / "clean_deformed.mrc")[0]
    assert info["snr_db_measured"] == pytest.approx(measure_snr_db(clean, noisy), abs=1e-4)
    assert info["snr_zero_mean_db"] == pytest.approx(measure_snr_db(clean, noisy, zero_mean=True), abs=1e-4)
    assert info["snr_db"] == 5 and abs(info["snr_db_measured"] - 5) < 0.3
    assert np.std(noisy - clean) == pytest.approx(info["noise_sigma"], rel=0.05)
    assert {"project_deformed", "project_undeformed", "write", "total"} <= set(info["timings_s"])


def test_simulate_bins_hard_profile_and_default_pixel_size(tmp_path):
    path = tmp_path / "nohdr.mrc"
    write_mrc(path, crowded_phantom((16, 32, 32), seed=1))  # no voxel size in the header
    out = tmp_path / "sim"
    tilts = ["--tilt-min", -30, "--tilt-max", 30, "--tilt-step", 15]
    result = _run(path, "-o", out, "--bin", 2, "--profile", "hard", *tilts)
    assert result.exit_code == 0, result.output
    data, px = read_mrc(out / "tilt_series.mrc")
    assert data.shape == (5, 16, 16) and px == pytest.approx(20.0)
    vol, vx = read_mrc(out / "truth" / "volume.mrc")
    assert vol.shape == (8, 16, 16) and vx == pytest.approx(20.0)
    info = json.loads((out / "simulation.json").read_text())
    assert info["input_voxel_size_A"] == 10.0 and "default" in info["pixel_size_source"]
    assert info["tilt_axis_offset_deg"] != 0.0
    truth = read_deformations(out / "truth" / "deformations.json")
    assert truth.extra["tilt_axis_offset_deg"] == info["tilt_axis_offset_deg"]

    again = tmp_path / "again"
    assert _run(path, "-o", again, "--bin", 2, "--profile", "hard", "--pixel-size", 4, *tilts).exit_code == 0
    assert read_mrc(again / "tilt_series.mrc")[1] == pytest.approx(8.0)
    np.testing.assert_array_equal(read_mrc(again / "tilt_series.mrc")[0], data)  # same seed, same data


def test_simulate_refuses_a_non_empty_folder_unless_forced(tmp_path, volume_path):
    out = tmp_path / "sim"
    out.mkdir()
    (out / "old.txt").write_text("x")
    args = [volume_path, "-o", out, "--tilt-min", -10, "--tilt-max", 10, "--tilt-step", 10]
    result = _run(*args)
    assert result.exit_code == 2 and (out / "old.txt").exists()
    assert _run(*args, "--force").exit_code == 0
    assert not (out / "old.txt").exists() and (out / "tilt_series.mrc").exists()


@pytest.mark.parametrize(
    "make_input, extra",
    [
        ("image2d", []),
        ("missing", []),
        ("volume", ["--tilt-min", "-95"]),
        ("volume", ["--tilt-min", "20", "--tilt-max", "10"]),
        ("volume", ["--tilt-step", "0"]),
        ("volume", ["--bin", "0"]),
        ("volume", ["--bin", "9"]),
        ("volume", ["--profile", "easy"]),
        ("volume", ["--pixel-size", "-1"]),
        ("volume", ["--ctf", "--dose", "2"]),
        ("volume", ["--ctf", "--defocus-hand", "0"]),
        ("volume", ["--ctf", "--defocus", "-1"]),
        ("volume", ["--exposure", "-5"]),
        ("volume", ["--frame-halves", "--dose", "2"]),
        ("zeros", []),
    ],
)
def test_bad_input_exits_2_with_one_line_and_no_output(tmp_path, volume_path, make_input, extra):
    if make_input == "image2d":
        path = tmp_path / "img.mrc"
        write_mrc(path, np.ones((32, 32), np.float32))
    elif make_input == "zeros":
        path = tmp_path / "zeros.mrc"
        write_mrc(path, np.zeros((8, 16, 16), np.float32))
    elif make_input == "missing":
        path = tmp_path / "nope.mrc"
    else:
        path = volume_path
    out = tmp_path / "sim"
    result = _run(path, "-o", out, *extra)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert not out.exists()


def test_simulate_ctf_and_exposure_write_the_true_defocus_and_pre_exposure(tmp_path, volume_path):
    out = tmp_path / "sim"
    result = _run(volume_path, "-o", out, "--tilt-step", 20, "--ctf", "--defocus", 2.5, "--defocus-spread", 0.1,
                  "--exposure", 70, "--seed", 2)
    assert result.exit_code == 0, result.output
    info = json.loads((out / "simulation.json").read_text())
    optics = info["optics"]
    assert optics["ctf"] and optics["pixel_size_A"] == pytest.approx(7.5)
    defocus = np.asarray(optics["defocus_A"])
    assert defocus.shape == (7,) and np.all(np.abs(defocus - 25000) <= 1000)
    table = read_defocus(out / "tilt_series.defocus", 7)
    np.testing.assert_allclose(table.defocus_u_A, defocus, atol=1e-2)  # IMOD's nm with 4 decimals
    np.testing.assert_allclose(read_pre_exposure(out / "tilt_series_pre_exposure.txt", 7),
                               optics["pre_exposure_e_per_A2"])
    np.testing.assert_allclose(sorted(optics["pre_exposure_e_per_A2"]), 10 * np.arange(7))
    clean = read_mrc(out / "truth" / "clean_undeformed.mrc")[0]
    assert clean.min() < 0  # a CTF image is contrast: the first lobe's ringing goes negative


def test_frame_halves_are_two_noisier_series_whose_mean_is_the_data(tmp_path, volume_path):
    out = tmp_path / "sim"
    result = _run(volume_path, "-o", out, "--tilt-step", 20, "--frame-halves", "--snr-db", 6)
    assert result.exit_code == 0, result.output
    odd, even = read_mrc(out / "tilt_series_odd.mrc")[0], read_mrc(out / "tilt_series_even.mrc")[0]
    noisy, clean = read_mrc(out / "tilt_series.mrc")[0], read_mrc(out / "truth" / "clean_deformed.mrc")[0]
    np.testing.assert_allclose((odd + even) / 2, noisy, atol=1e-5)
    sigma = json.loads((out / "simulation.json").read_text())["noise_sigma"]
    assert np.std(odd - clean) == pytest.approx(np.sqrt(2) * sigma, rel=0.05)
    assert abs(np.corrcoef((odd - clean).ravel(), (even - clean).ravel())[0, 1]) < 0.05  # independent noise


CRYO_YAML = (
    "n_beads: 1\nbead_diameter_A: 40\nspecimen_thickness_A: 100\nz_offset_A: 20\ndrift_max_px: 3\n"
    "local_px: 0.5\n"
)


def test_cryo_profile_writes_what_a_microscope_and_a_ctf_program_write(tmp_path):
    settings = tmp_path / "acq.yaml"
    settings.write_text(CRYO_YAML)
    out = tmp_path / "cryo"
    result = _run("--profile", "cryo", "-o", out, "--field-of-view", 24, "--tilt-min", -45, "--tilt-max", 45,
                  "--tilt-step", 15, "--snr-db", -5, "--acquisition", settings, "--seed", 1)
    assert result.exit_code == 0, result.output
    counts, px = read_mrc(out / "tilt_series.mrc")
    assert counts.shape == (7, 24, 24) and px == 10.0 and counts.min() >= 0
    assert len(read_defocus(out / "tilt_series.defocus", 7).defocus_u_A) == 7
    assert read_pre_exposure(out / "tilt_series.mrc.mdoc", 7).max() == pytest.approx(18.0)  # 6 views of 3 e/A^2 before
    info = json.loads((out / "simulation.json").read_text())
    assert info["profile"] == "cryo" and info["acquisition"]["snr_db"] == -5
    assert abs(info["truth"]["snr_db_measured"] + 5) < 1.0
    assert read_mrc(out / "truth" / "volume.mrc")[0].shape == (10, 24, 24)
    assert read_deformations(out / "truth" / "deformations.json").n_tilts == 7


@pytest.mark.parametrize("args, message", [
    (["--bin", "2"], "--bin and --frame-halves"),
    (["--snr-db", "0", "--dose", "20"], "at most one of --snr-db and --dose"),
])
def test_cryo_profile_refuses_options_that_do_not_apply(tmp_path, args, message):
    out = tmp_path / "cryo"
    result = _run("--profile", "cryo", "-o", out, "--field-of-view", 24, *args)
    assert result.exit_code != 0 and message in result.output
    assert not out.exists()


def test_cryo_settings_file_with_an_unknown_key_is_refused(tmp_path):
    settings = tmp_path / "acq.yaml"
    settings.write_text("beads: 3\n")
    result = _run("--profile", "cryo", "-o", tmp_path / "cryo", "--acquisition", settings)
    assert result.exit_code != 0 and "unknown acquisition setting(s) beads" in result.output
    assert "Traceback" not in result.output


def test_other_profiles_need_a_volume(tmp_path):
    result = _run("-o", tmp_path / "sim")
    assert result.exit_code != 0 and "give the ground-truth VOLUME" in result.output
    result = _run("-o", tmp_path / "sim", "--field-of-view", 24)
    assert result.exit_code != 0
