"""``icetide reconstruct`` and ``icetide demo`` end to end on tiny inputs; bad input leaves nothing behind."""

import json
import logging
import os
import sys

import numpy as np
import pytest
import torch
from cli_helpers import ANGLES, SHAPE, TINY_VOLUME_YAML, gold_beads_about, write_series
from cli_helpers import run_cli as _run

from icetide import __version__
from icetide.alignment import xf_to_deformations
from icetide.io import (
    read_deformations, read_mrc, read_mrc_labels, read_relion_tilt_series_star, read_tlt, write_imod_defocus, write_mrc,
    write_pre_exposure, write_tlt,
)
from icetide.io.imod import read_xf
from icetide.runlog import LOG_NAME
from icetide.simulate import crowded_phantom

@pytest.fixture(scope="module")
def series_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("series")
    write_series(folder / "ts.mrc", crowded_phantom(SHAPE, seed=1), seed=0, voxel_size_A=8.0)
    write_tlt(folder / "short.tlt", ANGLES[:-1])
    (folder / "tiny.yaml").write_text(TINY_VOLUME_YAML + "fit: {tilts_per_step: 4}\n")
    write_imod_defocus(folder / "ts.defocus", ANGLES, np.full(len(ANGLES), 20000.0))
    write_imod_defocus(folder / "long.defocus", np.append(ANGLES, 60.0), np.full(len(ANGLES) + 1, 20000.0))
    write_pre_exposure(folder / "short.dose", np.arange(len(ANGLES) - 1, dtype=float))
    return folder


def _as_typed(monkeypatch, *args):
    """``icetide ARGS...`` with ``sys.argv`` as the shell sets it (the run log records it)."""
    monkeypatch.setattr(sys, "argv", ["icetide", *map(str, args)])
    return _run(*args)


def test_reconstruct_writes_every_output(series_files, tmp_path, monkeypatch):
    out = tmp_path / "rec"
    f = series_files
    result = _as_typed(monkeypatch, "reconstruct", f / "ts.mrc", "--angles", f / "ts.tlt", "-o", out, "--thickness", 12,
                       "--epochs", 2, "--config", f / "tiny.yaml", "--device", "cpu")
    assert result.exit_code == 0, result.output
    log = (out / LOG_NAME).read_text()
    assert f"icetide {__version__}" in log and f"command: icetide reconstruct {f / 'ts.mrc'} --angles" in log
    assert "fit.epochs: 2 (default: 500)" in log and "volume.log2_table_size: 10 (default: 19)" in log
    assert "fitting\n" in log and "epoch 2/2  loss" in log  # progress
    assert "done: 2 epochs" in log and "alignment: kept the" in log and "timings: " in log
    assert "wrote aligned.mrc, checkpoint.pt, config.yaml, deformations.json, report.json, tomogram.mrc, " \
        "tomograms.star, ts.star, ts.tlt, ts.xf, ts_ali.mrc, ts_fbp.mrc, ts_rec.mrc" in log
    assert not logging.getLogger("icetide").handlers
    tomogram, voxel = read_mrc(out / "ts_rec.mrc")  # named after the stack, as IMOD names its outputs
    assert tomogram.shape == SHAPE and voxel == pytest.approx(8.0) and np.isfinite(tomogram).all()
    assert read_mrc(out / "ts_fbp.mrc")[0].shape == SHAPE
    assert read_mrc(out / "ts_ali.mrc")[0].shape == (len(ANGLES), *SHAPE[1:])
    assert os.readlink(out / "tomogram.mrc") == "ts_rec.mrc" and os.readlink(out / "aligned.mrc") == "ts_ali.mrc"
    est = read_deformations(out / "deformations.json")
    assert est.n_tilts == len(ANGLES) and est.detector_shape == SHAPE[1:]
    xf = read_xf(out / "ts.xf")
    assert xf.shape == (len(ANGLES), 2, 3)
    back = xf_to_deformations(xf, ANGLES, SHAPE[1:])
    np.testing.assert_allclose(back.shifts_px, est.shifts_px, atol=1e-3)
    np.testing.assert_allclose(read_tlt(out / "ts.tlt"), ANGLES)
    relion = read_relion_tilt_series_star(out / "ts.star", 8.0, SHAPE[1:])
    np.testing.assert_allclose(relion.shifts_px, est.shifts_px, atol=1e-4)
    np.testing.assert_allclose(relion.angles_deg, est.angles_deg, atol=1e-6)
    assert "1@" in (out / "ts.star").read_text()
    report = json.loads((out / "report.json").read_text())
    assert report["epochs"] == 2 and len(report["curves"]["train_loss"]) == 2
    assert report["prealigned"] is True  # no starting alignment given: shifts start from the coarse alignment
    config = (out / "config.yaml").read_text()
    assert "log2_table_size: 10" in config and "epochs: 2" in config

    # --resume continues from the checkpoint with the run's own settings, up to the new epoch count
    result = _run("reconstruct", f / "ts.mrc", "--angles", f / "ts.tlt", "-o", out, "--resume", "--epochs", 3)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "report.json").read_text())["epochs"] == 3
    log = (out / LOG_NAME).read_text()
    assert log.count("command: ") == 2 and "epoch 3/3" in log  # appended


def test_a_fit_about_a_wrong_axis_is_followed_by_one_about_the_refined_axis(tmp_path):
    angles = np.arange(-60.0, 61.0, 4.0)
    images, _ = gold_beads_about(1.5, angles, drift_px=0.0)  # no drift: the coarse shifts hold about any axis
    write_mrc(tmp_path / "beads.mrc", images, voxel_size_A=20.0, stack=True)
    write_tlt(tmp_path / "beads.tlt", angles)
    (tmp_path / "tiny.yaml").write_text(TINY_VOLUME_YAML)
    out = tmp_path / "rec"
    args = ["reconstruct", tmp_path / "beads.mrc", "--angles", tmp_path / "beads.tlt", "-o", out, "--thickness", 48,
            "--config", tmp_path / "tiny.yaml"]
    result = _run(*args, "--epochs", 2, "--tilt-axis-search", 0)  # the first fit about 0 degrees
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    refined = report["tilt_axis_refinement"]
    assert refined["used"] and abs(refined["fitted_deg"]) < 0.3 and abs(refined["estimate_deg"] - 1.5) < 0.4
    assert report["input"]["tilt_axis_angle_deg"] == pytest.approx(-np.median(read_deformations(
        out / "refit_start.json").angles_deg))
    assert report["start_check"]["kept"] in ("fit", "start") and report["epochs"] == 2  # the second fit's
    log = (out / LOG_NAME).read_text()
    assert log.count("epoch 2/2") == 2 and "fitting again from the alignment corrected by the tilt axis at" in log
    beads = report["bead_refinement"]  # the beads' direction, when used, comes after the sharpness'
    final = beads["estimate_deg"] if beads["used"] else refined["estimate_deg"]
    assert -np.median(read_deformations(out / "deformations.json").angles_deg) == pytest.approx(final, abs=0.1)
    assert abs(final - 1.5) < 0.25 and report["bead_residual"]["beads"] >= 4

    result = _run("reconstruct", tmp_path / "beads.mrc", "--angles", tmp_path / "beads.tlt", "-o", out, "--resume",
                  "--epochs", 3)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["epochs"] == 3 and "resumed the second fit" in report["tilt_axis_refinement"]["note"]
    assert report["input"]["tilt_axis_angle_deg"] == pytest.approx(final, abs=0.1)

    off = tmp_path / "off"
    (tmp_path / "off.yaml").write_text(TINY_VOLUME_YAML + "deform: {axis_refine_deg: 0, bead_refinement: false}\n")
    result = _run("reconstruct", tmp_path / "beads.mrc", "--angles", tmp_path / "beads.tlt", "-o", off, "--thickness",
                  48, "--config", tmp_path / "off.yaml", "--epochs", 1, "--tilt-axis-search", 0)
    assert result.exit_code == 0, result.output
    report = json.loads((off / "report.json").read_text())
    assert not {"tilt_axis_refinement", "bead_refinement", "bead_residual"} & set(report)
    assert not (off / "refit_start.json").exists()


def test_an_error_in_the_run_is_logged_and_the_log_alone_is_kept(series_files, tmp_path):
    images, _ = read_mrc(series_files / "ts.mrc")
    write_mrc(tmp_path / "no_pixel_size.mrc", images, voxel_size_A=None, stack=True)
    args = ["reconstruct", tmp_path / "no_pixel_size.mrc", "--angles", series_files / "ts.tlt", "-o", tmp_path / "rec",
            "--defocus", series_files / "ts.defocus", "--tilt-axis-search", 0, "--epochs", 1]
    for _ in range(2):  # a folder holding only a log is not refused: the log is appended to
        result = _run(*args)
        assert result.exit_code == 2 and "needs the pixel size" in result.output, result.output
    assert [p.name for p in (tmp_path / "rec").iterdir()] == [LOG_NAME]
    log = (tmp_path / "rec" / LOG_NAME).read_text()
    assert log.count("error: CTF or exposure correction needs the pixel size") == 2
    assert not logging.getLogger("icetide").handlers


@pytest.mark.parametrize(
    "args, message",
    [
        (["--angles", "short.tlt"], "6 tilt angles for 7 images"),
        (["--angles", "missing.tlt"], "missing.tlt"),
        (["--angles", "ts.tlt", "--renderer", "cones"], "--renderer"),
        (["--angles", "ts.tlt", "--device", "cuda:7"], "CUDA"),
        (["--angles", "ts.tlt", "--config", "ts.tlt"], "ts.tlt"),
        (["--angles", "ts.tlt", "--half-maps", "frames"], "--half-maps: Input should be 'none', 'tilts', 'pixels' or 'series'"),
        (["--angles", "ts.tlt", "--half-maps", "series"], "needs the second half series"),
        (["--angles", "ts.tlt", "--half-maps", "tilts", "--half-series", "ts.mrc"], "excludes --half-maps tilts"),
        (["--angles", "ts.tlt", "--loss", "huber"], "--loss: Input should be 'l1', 'l2' or 'poisson'"),
        (["--angles", "ts.tlt", "--defocus", "ts.defocus", "--ctf-correction", "wiener"],
         "--ctf-correction: Input should be 'phaseflip', 'model' or 'none'"),
        (["--angles", "ts.tlt", "--ctf-correction", "none"], "needs the per-view defocus"),
        (["--angles", "ts.tlt", "--defocus", "long.defocus"], "defocus for 8 views, the stack has 7"),
        (["--angles", "ts.tlt", "--defocus", "ts.tlt"], "not a recognised defocus file"),
        (["--angles", "ts.tlt", "--defocus", "ts.defocus", "--defocus-hand", "2"], "--defocus-hand: Input should be 1 or -1"),
        (["--angles", "ts.tlt", "--exposure-weighting"], "--exposure-weighting needs"),
        (["--angles", "ts.tlt", "--pre-exposure", "short.dose"], "pre-exposure for 6 views"),
    ],
)
def test_reconstruct_bad_input_is_one_line_and_writes_nothing(series_files, tmp_path, args, message):
    out = tmp_path / "rec"
    args = [series_files / a if a.endswith((".tlt", ".yaml", ".defocus", ".dose", ".mrc")) else a for a in args]
    result = _run("reconstruct", series_files / "ts.mrc", *args, "-o", out, "--epochs", 1)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_half_maps_write_both_halves_their_fsc_and_the_mean(series_files, tmp_path):
    out = tmp_path / "rec"
    f = series_files
    result = _run("reconstruct", f / "ts.mrc", "--angles", f / "ts.tlt", "-o", out, "--thickness", 12,
                  "--epochs", 3, "--config", f / "tiny.yaml", "--device", "cpu", "--half-maps", "pixels", "--loss", "l2")
    assert result.exit_code == 0, result.output
    assert "half-map FSC 0.143" in result.output
    first, second = read_mrc(out / "ts_half1.mrc")[0], read_mrc(out / "ts_half2.mrc")[0]
    assert first.shape == SHAPE and not np.array_equal(first, second)  # two volumes, fitted apart
    np.testing.assert_allclose(read_mrc(out / "ts_rec.mrc")[0], (first + second) / 2, rtol=1e-5, atol=1e-6)
    half_maps = json.loads((out / "report.json").read_text())["half_maps"]
    assert half_maps["split"] == "pixels" and set(half_maps["resolution"]) == {"0.5", "0.143"}
    assert (out / "fsc_halves.png").is_file() and (out / "fsc_halves.csv").is_file()
    assert "loss: l2" in (out / "config.yaml").read_text()


def test_reconstruct_refuses_a_non_empty_folder(series_files, tmp_path):
    (tmp_path / "rec").mkdir()
    (tmp_path / "rec" / "keep.txt").write_text("x")
    result = _run("reconstruct", series_files / "ts.mrc", "--angles", series_files / "ts.tlt", "-o", tmp_path / "rec")
    assert result.exit_code == 2 and "not empty" in result.output
    assert (tmp_path / "rec" / "keep.txt").read_text() == "x"


def test_slab_specimen_models_a_wider_volume_and_writes_the_detector_sized_tomogram(series_files, tmp_path):
    from icetide.geometry import slab_padding_px

    out = tmp_path / "slab"
    f = series_files
    result = _run("reconstruct", f / "ts.mrc", "--angles", f / "ts.tlt", "-o", out, "--thickness", 12, "--epochs", 1,
                  "--config", f / "tiny.yaml", "--device", "cpu", "--specimen", "slab", "--max-memory", 0.5)
    assert result.exit_code == 0, result.output
    assert read_mrc(out / "tomogram.mrc")[0].shape == SHAPE
    report = json.loads((out / "report.json").read_text())
    pad = slab_padding_px(SHAPE[2], SHAPE[0], 45.0)
    assert report["model_shape_zyx"] == [SHAPE[0], SHAPE[1], SHAPE[2] + 2 * pad] and pad > 0
    assert report["memory_budget_mb"] <= 512
    bad = _run("reconstruct", f / "ts.mrc", "--angles", f / "ts.tlt", "-o", tmp_path / "bad", "--specimen", "ring")
    assert bad.exit_code == 2 and "--specimen: Input should be 'box' or 'slab'" in bad.output and not (tmp_path / "bad").exists()


def test_a_seed_makes_cpu_runs_bit_identical(series_files, tmp_path):
    f = series_files
    outputs = []
    for name in ("a", "b"):
        result = _run("reconstruct", f / "ts.mrc", "--angles", f / "ts.tlt", "-o", tmp_path / name, "--thickness", 12,
                      "--epochs", 3, "--config", f / "tiny.yaml", "--device", "cpu", "--seed", 7)
        assert result.exit_code == 0, result.output
        # the MRC header's label carries the time of writing, so compare the data
        outputs.append((read_mrc(tmp_path / name / "tomogram.mrc")[0], (tmp_path / name / "deformations.json").read_text()))
    np.testing.assert_array_equal(outputs[0][0], outputs[1][0])
    assert outputs[0][1] == outputs[1][1]
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["seed"] == 7 and {"torch", "numpy", "python"} <= set(report["versions"])


def test_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    result = _run("demo", "-o", out, "--size", 32, "--minutes", 0.02, "--device", "cpu")
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["reconstructions"]) == {"icetide", "fbp_aligned", "sirt_aligned", "fbp_raw", "fbp_oracle", "sirt_oracle"}
    assert summary["seconds"]["icetide"] > 0 and summary["seconds"]["sirt_aligned"] > 0
    assert summary["settings"]["n_tilts"] == 41
    for name in ("fsc.png", "orthoslices.png", "local_fields.png", "icetide/tomogram.mrc", "truth/volume.mrc"):
        assert (out / name).is_file(), name
    assert "fbp_oracle" in result.output


def _warmup_only(folder):
    """A config whose 2 epochs stay in the warm-up: the deformations written are the starting ones."""
    path = folder / "warmup.yaml"
    path.write_text("volume: {log2_table_size: 10, n_levels: 3, hidden: 8}\nfit: {tilts_per_step: 4, warmup_epochs: 5}\n")
    return path


def test_starting_alignment_from_xf_and_excluded_views(series_files, tmp_path):
    from icetide.alignment import deformations_to_xf
    from icetide.deform import Deformations, remove_gauge
    from icetide.io import write_xf

    f = series_files
    rng = np.random.default_rng(5)
    start = Deformations(ANGLES, rng.uniform(-3, 3, (len(ANGLES), 2)), rng.uniform(-1, 1, len(ANGLES)),
                         np.zeros((len(ANGLES), 2, 2, 2)), SHAPE[1:])
    write_xf(tmp_path / "start.xf", deformations_to_xf(start))
    out = tmp_path / "rec"
    result = _run("reconstruct", f / "ts.mrc", "--angles", f / "ts.tlt", "-o", out, "--epochs", 2, "--thickness", 12,
                  "--config", _warmup_only(tmp_path), "--xf", tmp_path / "start.xf", "--exclude", "0,6")
    assert result.exit_code == 0, result.output
    est = read_deformations(out / "deformations.json")
    kept = start.subset(np.arange(1, 6))
    np.testing.assert_allclose(est.tilt_angles_deg, ANGLES[1:6])
    np.testing.assert_allclose(est.angles_deg, kept.angles_deg, atol=2e-3)
    # .xf precision; the outputs are centred on the specimen's height, a translation of the gauge
    np.testing.assert_allclose(remove_gauge(est.shifts_px, ANGLES[1:6])[0], remove_gauge(kept.shifts_px, ANGLES[1:6])[0],
                               atol=2e-3)
    assert read_mrc(out / "aligned.mrc")[0].shape == (5, *SHAPE[1:])
    assert "rlnTomoTiltSeriesStarFile" in (out / "tomograms.star").read_text()


def test_excluded_views_keep_their_lines_in_the_imod_files_and_their_place_in_relion_names(series_files, tmp_path):
    import starfile

    from icetide.inputs import read_alignment
    from icetide.errors import IcetideError
    from icetide.io import read_relion_tomograms_star, write_xf

    f = series_files
    out = tmp_path / "rec"
    result = _run("reconstruct", f / "ts.mrc", "--angles", f / "ts.tlt", "-o", out, "--epochs", 1, "--thickness", 12,
                  "--config", f / "tiny.yaml", "--exclude", "0,6")
    assert result.exit_code == 0, result.output
    est = read_deformations(out / "deformations.json")  # the fitted views 1..5
    xf = read_xf(out / "ts.xf")
    assert xf.shape == (len(ANGLES), 2, 3)  # one line per view of the input stack
    np.testing.assert_allclose(-xf[1:6, :, 2], est.shifts_px, atol=1e-3)
    # the first and last views take the transform of their fitted neighbour in tilt
    np.testing.assert_allclose(xf[0], xf[1], atol=1e-6)
    np.testing.assert_allclose(xf[6], xf[5], atol=1e-6)
    np.testing.assert_allclose(read_tlt(out / "ts.tlt"), ANGLES)
    assert (out / "ts.exclude").read_text() == "1,7\n"  # IMOD's EXCLUDELIST, numbered from 1
    report = json.loads((out / "report.json").read_text())
    assert report["excluded_views"] == {"stack_indices": [0, 6], "imod_excludelist": "1,7"}
    assert report["input"]["n_tilts"] == 5 and report["input"]["n_stack_views"] == 7
    names = starfile.read(out / "ts.star")["rlnMicrographName"].tolist()
    assert names == [f"{k}@{(f / 'ts.mrc').resolve()}" for k in range(2, 7)]
    (tomo,) = read_relion_tomograms_star(out / "tomograms.star")
    assert tomo.tomogram_file == str((out / "ts_rec.mrc").resolve()) and tomo.binning == 1.0 and tomo.hand == 1
    assert tomo.size_xyz == (SHAPE[2], SHAPE[1], SHAPE[0])
    # deformations.json (the fitted views) is read back against the same --exclude
    back = read_alignment(ANGLES, SHAPE[1:], out / "deformations.json", None, None, np.arange(1, 6))
    np.testing.assert_allclose(back.shifts_px, est.shifts_px)
    write_xf(tmp_path / "short.xf", xf[:3])
    with pytest.raises(IcetideError, match="short.xf: 3 transforms for a series of 7 views or the 5 it keeps"):
        read_alignment(ANGLES, SHAPE[1:], None, tmp_path / "short.xf", None, np.arange(1, 6))

    # ts.xf feeds back, with the same --exclude or with every view
    for extra in (["--exclude", "0,6"], []):
        again = tmp_path / f"again{len(extra)}"
        result = _run("reconstruct", f / "ts.mrc", "--angles", f / "ts.tlt", "-o", again, "--epochs", 1,
                      "--thickness", 12, "--config", _warmup_only(tmp_path), "--xf", out / "ts.xf", *extra)
        assert result.exit_code == 0, result.output
        started = read_deformations(again / "deformations.json")
        assert started.n_tilts == (5 if extra else 7)
        np.testing.assert_allclose(started.angles_deg[1:6] if not extra else started.angles_deg, est.angles_deg,
                                   atol=2e-3)


def test_angles_and_pixel_size_from_mdoc_and_inverted_contrast(series_files, tmp_path):
    f = series_files
    sections = "".join(f"[ZValue = {i}]\nTiltAngle = {a:.2f}\n\n" for i, a in enumerate(ANGLES))
    (tmp_path / "ts.mdoc").write_text(f"PixelSpacing = 6.5\n\n{sections}")
    images, _ = read_mrc(f / "ts.mrc")
    write_mrc(tmp_path / "dark.mrc", -images, stack=True)
    out = tmp_path / "rec"
    result = _run("reconstruct", tmp_path / "dark.mrc", "--mdoc", tmp_path / "ts.mdoc", "-o", out, "--epochs", 1,
                  "--thickness", 12, "--config", f / "tiny.yaml", "--invert")
    assert result.exit_code == 0, result.output
    assert read_mrc(out / "tomogram.mrc")[1] == pytest.approx(6.5)
    aligned = read_mrc(out / "aligned.mrc")[0]
    assert np.corrcoef(aligned.ravel(), images.ravel())[0, 1] > 0.5  # the contrast was flipped back
    bright = "icetide: density bright (positive = dense), the input images inverted"
    for name in ("dark_rec.mrc", "dark_fbp.mrc", "dark_ali.mrc"):
        assert bright in read_mrc_labels(out / name)

    # --polarity input: the same fit, written as dark as the input images
    dark = tmp_path / "dark"
    result = _run("reconstruct", tmp_path / "dark.mrc", "--mdoc", tmp_path / "ts.mdoc", "-o", dark, "--epochs", 1,
                  "--thickness", 12, "--config", f / "tiny.yaml", "--invert", "--polarity", "input")
    assert result.exit_code == 0, result.output
    for name in ("dark_rec.mrc", "dark_fbp.mrc", "dark_ali.mrc"):
        np.testing.assert_array_equal(read_mrc(dark / name)[0], -read_mrc(out / name)[0])  # CPU fits are repeatable
        assert "icetide: density dark (negative = dense), as in the input images" in read_mrc_labels(dark / name)
    assert "polarity: input" in (dark / "config.yaml").read_text()


def test_tilt_axis_search_is_reported(series_files, tmp_path):
    f = series_files
    out = tmp_path / "rec"
    result = _run("reconstruct", f / "ts.mrc", "--angles", f / "ts.tlt", "-o", out, "--epochs", 1, "--thickness", 12,
                  "--config", f / "tiny.yaml", "--tilt-axis-angle", "1", "--tilt-axis-search", "2")
    assert result.exit_code == 0, result.output
    found = json.loads((out / "report.json").read_text())["tilt_axis_search"]
    assert found["start_deg"] == 1.0 and found["search_deg"] == 2.0 and len(found["sharpness"]) == 9
    assert found["method"] == "sharpness"
    assert "tilt axis:" in result.output
    assert "axis_search_deg: 2.0" in (out / "config.yaml").read_text()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--exclude", "3,9"], "outside 0..6"),
        (["--exclude", "a"], "--exclude"),
        (["--exclude", "a-b"], "'a-b' is neither a view nor a range"),
        (["--exclude", "0-2,2"], "given more than once"),
        (["--polarity", "dark"], "--polarity: Input should be 'bright' or 'input'"),
        (["--exclude", "0,1,2,3,4,5"], "fewer than 2"),
        (["--xf", "ts.tlt", "--aln", "ts.tlt"], "exclude each other"),
        (["--xf", "ts.tlt", "--tilt-axis-search", "3"], "--tilt-axis-search cannot be combined"),
    ],
)
def test_bad_alignment_options(series_files, tmp_path, extra, message):
    extra = [str(series_files / a) if a.endswith(".tlt") else a for a in extra]
    out = tmp_path / "rec"
    result = _run("reconstruct", series_files / "ts.mrc", "--angles", series_files / "ts.tlt", "-o", out, *extra)
    assert result.exit_code == 2 and message in result.output, result.output
    assert not out.exists()


def test_angles_or_mdoc_is_required(series_files, tmp_path):
    result = _run("reconstruct", series_files / "ts.mrc", "-o", tmp_path / "rec")
    assert result.exit_code == 2 and "--angles" in result.output and not (tmp_path / "rec").exists()


@pytest.mark.filterwarnings("ignore:Data array contains NaN values")
def test_nonfinite_pixels_are_refused_or_fixed(series_files, tmp_path):
    images, _ = read_mrc(series_files / "ts.mrc")
    images = images.copy()
    images[2, 3, 4], images[5, 0, 0] = np.nan, np.inf
    write_mrc(tmp_path / "bad.mrc", images, voxel_size_A=8.0, stack=True)
    args = ["reconstruct", tmp_path / "bad.mrc", "--angles", series_files / "ts.tlt", "--thickness", 12,
            "--epochs", 1, "--config", series_files / "tiny.yaml"]
    refused = _run(*args, "-o", tmp_path / "r1")
    assert refused.exit_code == 2 and "NaN/Inf" in refused.output and not (tmp_path / "r1").exists()
    fixed = _run(*args, "-o", tmp_path / "r2", "--fix-nonfinite")
    assert fixed.exit_code == 0, fixed.output
    assert "replaced 2 NaN/Inf" in fixed.output
    assert "warning: replaced 2 NaN/Inf" in (tmp_path / "r2" / LOG_NAME).read_text()
    assert np.isfinite(read_mrc(tmp_path / "r2" / "tomogram.mrc")[0]).all()


def _aln(path, shifts_xy):
    """An AreTomo .aln for the test series (RawSize = its detector), rows in a shuffled order."""
    rows = [f"{k + 1:5d}    0.0000    1.00000  {tx:9.3f}  {ty:9.3f}     1.00     1.00     1.00     0.00  {a:7.2f}"
            for k, (a, (tx, ty)) in enumerate(zip(ANGLES, shifts_xy))]
    order = [3, 0, 6, 1, 5, 2, 4]
    path.write_text(
        f"# AreTomo Alignment / Priims bprmMn\n# RawSize = {SHAPE[2]} {SHAPE[1]} {len(ANGLES)}\n"
        "# NumPatches = 0\n# AlphaOffset =     0.00\n"
        "# SEC     ROT         GMAG       TX          TY      SMEAN     SFIT    SCALE     BASE     TILT\n"
        + "\n".join(rows[i] for i in order) + "\n"
    )
    return path


def test_starting_alignment_from_aretomo_aln(series_files, tmp_path):
    from icetide.alignment import aln_to_deformations
    from icetide.deform import remove_gauge
    from icetide.io import read_aln

    shifts = np.random.default_rng(2).uniform(-3, 3, (len(ANGLES), 2))
    aln = _aln(tmp_path / "ts.aln", shifts)
    expected = aln_to_deformations(read_aln(aln), ANGLES, SHAPE[1:])
    out = tmp_path / "rec"
    result = _run("reconstruct", series_files / "ts.mrc", "--angles", series_files / "ts.tlt", "-o", out,
                  "--epochs", 2, "--thickness", 12, "--config", _warmup_only(tmp_path), "--aln", aln)
    assert result.exit_code == 0, result.output
    est = read_deformations(out / "deformations.json")
    assert np.abs(expected.shifts_px).max() > 1
    np.testing.assert_allclose(est.shifts_px, remove_gauge(expected.shifts_px, ANGLES)[0], atol=1e-4)
    fbp_out = tmp_path / "fbp.mrc"
    result = _run("fbp", series_files / "ts.mrc", "--angles", series_files / "ts.tlt", "-o", fbp_out,
                  "--thickness", 12, "--aln", aln)
    assert result.exit_code == 0, result.output
    assert read_mrc(fbp_out)[0].shape == SHAPE


def test_defocus_and_pre_exposure_correct_the_series_before_the_fit(series_files, tmp_path):
    from icetide.ctf import Microscope, exposure_weight_series, phase_flip_series

    f = series_files
    images = read_mrc(f / "ts.mrc")[0]
    defocus = np.linspace(15000.0, 21000.0, len(ANGLES))
    dose = 3.0 * np.arange(len(ANGLES))
    write_imod_defocus(tmp_path / "ts.defocus", ANGLES, defocus)
    write_pre_exposure(tmp_path / "ts.dose", dose)
    out = tmp_path / "rec"
    result = _run("reconstruct", f / "ts.mrc", "--angles", f / "ts.tlt", "-o", out, "--epochs", 1, "--thickness", 12,
                  "--config", f / "tiny.yaml", "--defocus", tmp_path / "ts.defocus", "--pre-exposure",
                  tmp_path / "ts.dose", "--exposure-weighting", "--amplitude-contrast", 0.1, "--exclude", "3")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    keep = [0, 1, 2, 4, 5, 6]
    assert report["optics"]["correction"] == "phaseflip" and report["optics"]["exposure_weighting"]
    np.testing.assert_allclose(report["optics"]["defocus_A"], np.stack([defocus, defocus, 0 * defocus], 1)[keep],
                               atol=1e-2)
    np.testing.assert_allclose(report["optics"]["pre_exposure_e_per_A2"], dose[keep])
    assert "rlnAmplitudeContrast" in (out / "tomograms.star").read_text()
    assert "0.1" in (out / "config.yaml").read_text().split("amplitude_contrast:")[1].splitlines()[0]
    # The fit saw the corrected images: the first epoch leaves the deformations near zero, so aligned.mrc is
    # close to the phase-flipped, exposure-weighted input and far from the raw one.
    scope = Microscope(amplitude_contrast=0.1)
    flipped = phase_flip_series(torch.from_numpy(images[keep]), ANGLES[keep], 8.0, defocus[keep], scope)
    corrected = exposure_weight_series(flipped, 8.0, dose[keep]).numpy()
    aligned = read_mrc(out / "aligned.mrc")[0].ravel()
    assert np.corrcoef(aligned, corrected.ravel())[0, 1] > 0.9
    assert np.corrcoef(aligned, corrected.ravel())[0, 1] > np.corrcoef(aligned, images[keep].ravel())[0, 1]


def test_two_half_series_from_frame_sums(tmp_path):
    from icetide.classical import align_series
    from icetide.simulate import simulate_tilt_series

    f = tmp_path
    sim = simulate_tilt_series(crowded_phantom(SHAPE, seed=2), ANGLES, snr_db=15, seed=1, samples_per_voxel=1.0,
                               frame_halves=True)
    np.testing.assert_allclose(sim.noisy_halves.mean(axis=0), sim.noisy, atol=1e-5)
    write_mrc(f / "odd.mrc", sim.noisy_halves[0], 8.0, stack=True)
    write_mrc(f / "even.mrc", sim.noisy_halves[1], 8.0, stack=True)
    write_tlt(f / "odd.tlt", ANGLES)
    (f / "tiny.yaml").write_text(TINY_VOLUME_YAML + "fit: {tilts_per_step: 4}\n")
    out = f / "rec"
    result = _run("reconstruct", f / "odd.mrc", "--angles", f / "odd.tlt", "-o", out, "--thickness", 12,
                  "--epochs", 2, "--config", f / "tiny.yaml", "--half-series", f / "even.mrc", "--exclude", "2")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["half_maps"]["split"] == "series"
    first, second = read_mrc(out / "odd_half1.mrc")[0], read_mrc(out / "odd_half2.mrc")[0]
    np.testing.assert_allclose(read_mrc(out / "odd_rec.mrc")[0], (first + second) / 2, atol=1e-5)
    aligned = read_mrc(out / "aligned.mrc")[0]
    keep = [0, 1, 3, 4, 5, 6]
    assert aligned.shape == (6, *SHAPE[1:])
    mean = torch.from_numpy(sim.noisy_halves[:, keep].mean(axis=0))
    expected = align_series(mean, read_deformations(out / "deformations.json")).numpy()  # of the halves' mean
    np.testing.assert_allclose(aligned, expected, atol=1e-4 * float(np.abs(expected).max()))
    bad = _run("reconstruct", f / "odd.mrc", "--angles", f / "odd.tlt", "-o", f / "bad", "--half-series",
               f / "odd.tlt")
    assert bad.exit_code == 2 and "Traceback" not in bad.output
    write_mrc(f / "small.mrc", sim.noisy_halves[1][:3], 8.0, stack=True)
    bad = _run("reconstruct", f / "odd.mrc", "--angles", f / "odd.tlt", "-o", f / "bad", "--half-series",
               f / "small.mrc")
    assert bad.exit_code == 2 and "small.mrc: shape (3, 24, 32), the tilt series has (7, 24, 32)" in bad.output
    assert not (f / "bad").exists()


def test_ctf_correction_model_from_the_command_line(series_files, tmp_path):
    f = series_files
    out = tmp_path / "rec"
    result = _run("reconstruct", f / "ts.mrc", "--angles", f / "ts.tlt", "-o", out, "--epochs", 1, "--thickness", 12,
                  "--config", f / "tiny.yaml", "--defocus", f / "ts.defocus", "--ctf-correction", "model")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "report.json").read_text())["optics"]["correction"] == "model"
    assert "correction: model" in (out / "config.yaml").read_text()


def test_bin_fits_the_binned_stack_and_writes_the_alignment_in_input_pixels(series_files, tmp_path):
    f = series_files
    shape = (12, 40, 36)
    write_series(tmp_path / "big.mrc", crowded_phantom(shape, seed=2), seed=0, voxel_size_A=8.0)
    out = tmp_path / "rec"
    result = _run("reconstruct", tmp_path / "big.mrc", "--angles", tmp_path / "big.tlt", "-o", out, "--bin", 2,
                  "--thickness", 6, "--epochs", 2, "--config", f / "tiny.yaml", "--device", "cpu")
    assert result.exit_code == 0, result.output
    tomogram, voxel = read_mrc(out / "tomogram.mrc")
    assert tomogram.shape == (6, 20, 18) and voxel == pytest.approx(16.0)
    assert read_mrc(out / "aligned.mrc")[0].shape == (len(ANGLES), 20, 18)
    est = read_deformations(out / "deformations.json")
    assert est.detector_shape == shape[1:]  # the input stack's pixels
    report = json.loads((out / "report.json").read_text())
    assert report["bin"] == 2 and report["input"]["fit_detector_shape"] == [20, 18]
    np.testing.assert_allclose(-read_xf(out / "big.xf")[:, :, 2], est.shifts_px, atol=1e-3)
    # the fit started from its coarse alignment and checked itself against it on the even/odd-tilt FSC
    check = report["start_check"]
    assert check["kept"] in ("fit", "start") and np.isfinite(check["start_score"])
    assert (check["kept"] == "fit") == (check["fit_score"] >= check["start_score"])


@pytest.mark.parametrize("bin_by", [1, 2])
def test_an_axis_nearer_the_image_x_axis_gives_a_tomogram_whose_y_runs_along_it(series_files, tmp_path, bin_by):
    f = series_files
    full = SHAPE if bin_by == 1 else (12, 40, 36)
    write_series(tmp_path / "ts.mrc", crowded_phantom(full, seed=2), seed=0, voxel_size_A=8.0)
    stack, _ = read_mrc(tmp_path / "ts.mrc")
    # The views turned by a quarter: nx x ny images whose tilt axis lies at +90 degrees.
    write_mrc(tmp_path / "turned.mrc", np.ascontiguousarray(np.rot90(stack, -1, axes=(1, 2))), 8.0, stack=True)
    out = tmp_path / "rec"
    result = _run("reconstruct", tmp_path / "turned.mrc", "--angles", f / "ts.tlt", "--tilt-axis-angle", 88, "-o", out,
                  "--thickness", 12 // bin_by, "--bin", bin_by, "--epochs", 2, "--config", f / "tiny.yaml",
                  "--device", "cpu")
    assert result.exit_code == 0, result.output
    shape = tuple(n // bin_by for n in full)
    assert read_mrc(out / "tomogram.mrc")[0].shape == shape  # Y along the axis: the whole field in every output
    assert read_mrc(out / "aligned.mrc")[0].shape == (len(ANGLES), *shape[1:])
    assert read_mrc(out / "turned_fbp.mrc")[0].shape == shape
    est = read_deformations(out / "deformations.json")
    assert est.detector_shape == full[2:0:-1]  # the input stack's pixels
    report = json.loads((out / "report.json").read_text())
    assert report["input"]["quarter_turns"] == 1 and report["input"]["fit_detector_shape"] == list(shape[1:])
    assert report["input"]["detector_shape"] == list(full[2:0:-1])
    assert 84 <= report["input"]["tilt_axis_angle_deg"] <= 92
    assert 84 <= report["tilt_axis_search"]["estimate_deg"] <= 92
    xf = read_xf(out / "turned.xf")
    turn = np.rad2deg(np.arctan2(xf[:, 1, 0], xf[:, 0, 0]))
    assert np.all(np.abs(np.abs(turn) - 90) < 6)


def test_progress_is_printed_as_plain_lines_when_the_output_is_not_a_terminal(series_files, tmp_path):
    f = series_files
    result = _run("reconstruct", f / "ts.mrc", "--angles", f / "ts.tlt", "-o", tmp_path / "rec", "--thickness", 12,
                  "--epochs", 3, "--config", f / "tiny.yaml", "--device", "cpu")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("epoch ")]
    assert lines[0].startswith("epoch 1/3") and lines[-1].startswith("epoch 3/3")
    assert "loss" in lines[0] and "s left" in lines[0]


def test_log_lines_are_spaced_by_epochs_or_seconds():
    from icetide.cli.reconstruct_cmd import log_lines

    now = [0.0]
    printed = []
    import icetide.cli.reconstruct_cmd as cmd

    original = cmd.console.print
    cmd.console.print = lambda text, **kw: printed.append(text)
    try:
        on_epoch = log_lines(100, None, every_epochs=10, every_s=30.0, clock=lambda: now[0])
        for epoch in range(1, 26):
            now[0] = epoch * 1.0 if epoch < 15 else 100.0 + epoch
            on_epoch({"epoch": epoch, "train_loss": 0.5, "val_loss": float("nan"), "elapsed_s": now[0]})
    finally:
        cmd.console.print = original
    epochs = [int(t.split()[1].split("/")[0]) for t in printed]
    assert epochs == [1, 11, 15, 25]  # every 10 epochs, and at once after 30 s without a line
