"""``icetide experiment``: each experiment end to end on a tiny phantom, its outputs, and bad input."""

import csv
import json

import numpy as np
import pytest
from cli_helpers import run_cli as _run

from icetide.experiments.case import METHODS, load_phantom
from icetide.io import write_mrc
from icetide.simulate import crowded_phantom

SHAPE = (12, 32, 32)


@pytest.fixture(scope="module")
def phantom_files(tmp_path_factory):
    """Two phantoms with the same file name in different folders (as polnet's are)."""
    root = tmp_path_factory.mktemp("phantoms")
    paths = []
    for seed in (1, 2):
        (root / f"p{seed}").mkdir()
        path = root / f"p{seed}" / "den.mrc"
        write_mrc(path, crowded_phantom(SHAPE, seed=seed), voxel_size_A=10.0)
        paths.append(path)
    return paths


def _csv(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_single_writes_every_method_and_figure(phantom_files, tmp_path):
    out = tmp_path / "single"
    result = _run("experiment", "single", "-o", out, "--phantom", phantom_files[0], "--epochs", 2, "--device", "cpu")
    assert result.exit_code == 0, result.output
    data = json.loads((out / "results.json").read_text())
    assert set(data["case"]["reconstructions"]) == set(METHODS)
    assert data["case"]["fit"]["epochs"] == 2 and data["machine"]["device"] == "cpu"
    assert "epoch 1: loss" in result.output  # progress of the fit
    summary = (out / "summary.md").read_text()
    assert "icetide experiment single" in summary and "| sirt_oracle |" in summary
    for name in ("fsc.png", "orthoslices.png", "fourier_slices.png", "local_fields.png", "deformation_errors.png"):
        assert (out / name).is_file() and f"]({name})" in summary, name
    for name in ("icetide/tomogram.mrc", "sirt_aligned.mrc", "sirt_oracle.mrc", "truth/deformations.json"):
        assert (out / name).is_file(), name


def test_noise_sweeps_the_snrs(phantom_files, tmp_path):
    out = tmp_path / "noise"
    result = _run("experiment", "noise", "-o", out, "--phantom", phantom_files[0], "--snrs", "-10,20",
                  "--epochs", 2, "--device", "cpu")
    assert result.exit_code == 0, result.output
    rows = _csv(out / "cc_vs_snr.csv")
    assert len(rows) == 2 * len(METHODS) and {r["x"] for r in rows} == {"-10", "20"}
    cc = {(r["name"], r["x"]): float(r["y"]) for r in rows}
    assert cc[("fbp_oracle", "20")] > cc[("fbp_oracle", "-10")]  # less noise, better oracle
    assert (out / "snr_-10dB" / "fsc.png").is_file() and (out / "snr_+20dB" / "icetide" / "tomogram.mrc").is_file()


def test_epochs_scores_along_the_fit(phantom_files, tmp_path):
    out = tmp_path / "epochs"
    result = _run("experiment", "epochs", "-o", out, "--phantom", phantom_files[0], "--epochs", 6, "--every", 2,
                  "--device", "cpu")
    assert result.exit_code == 0, result.output
    data = json.loads((out / "results.json").read_text())
    assert [c["epoch"] for c in data["curve"]] == [2, 4, 6]
    # the default plan bins the first half of so short a fit, which is not validated
    assert data["fit"]["binned_epochs"] == 3 and 4 <= data["early_stopping_epoch"] <= 6
    assert -1 <= data["oracle_cc"] <= 1 and (out / "cc_vs_epoch.png").is_file()


def test_volumes_over_phantoms_and_seeds(phantom_files, tmp_path):
    out = tmp_path / "volumes"
    result = _run("experiment", "volumes", "-o", out, "--phantom", phantom_files[0], "--phantom", phantom_files[1],
                  "--seeds", "0,3", "--epochs", 1, "--device", "cpu")
    assert result.exit_code == 0, result.output
    data = json.loads((out / "results.json").read_text())
    assert sorted(data["cases"]) == ["p1_seed0", "p1_seed3", "p2_seed0", "p2_seed3"]
    assert data["cases"]["p1_seed3"]["acquisition"]["seed"] == 3
    assert len(_csv(out / "cc_by_volume.csv")) == 4 * len(METHODS)


def test_timing_measures_each_method_in_its_own_process(phantom_files, tmp_path):
    out = tmp_path / "timing"
    result = _run("experiment", "timing", "-o", out, "--phantom", phantom_files[0], "--epochs", 1, "--device", "cpu")
    assert result.exit_code == 0, result.output
    methods = json.loads((out / "results.json").read_text())["methods"]
    assert list(methods) == ["icetide_lattice", "icetide_rays", "fbp", "sirt", "prealign"]
    for name, row in methods.items():
        assert row["seconds"] > 0 and row["cpu_peak_mb"] >= 0 and row["gpu_peak_mb"] is None, name
    assert methods["prealign"]["cc"] is None and -1 <= methods["fbp"]["cc"] <= 1
    assert (out / "icetide_rays" / "tomogram.mrc").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (("nonsense",), "unknown experiment 'nonsense'"),
        (("single", "--phantom", "missing.mrc"), "missing.mrc: no such file"),
        (("noise", "--snrs", "1,x"), "--snrs: expected comma-separated numbers"),
        (("volumes", "--seeds", "1,1"), "--seeds: repeated value"),
        (("epochs", "--every", "0"), "--every must be at least 1"),
        (("single", "--minutes", "-1"), "--minutes must be positive"),
    ],
)
def test_bad_input_is_one_line_and_leaves_nothing(tmp_path, args, message):
    out = tmp_path / "out"
    result = _run("experiment", *args, "-o", out)
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_a_2d_phantom_is_refused(tmp_path):
    write_mrc(tmp_path / "flat.mrc", np.ones((8, 8), np.float32))
    result = _run("experiment", "single", "-o", tmp_path / "out", "--phantom", tmp_path / "flat.mrc")
    assert result.exit_code == 2 and "expected a 3-D volume" in result.output
    assert not (tmp_path / "out").exists()


def test_load_phantom_bins_to_the_size_limit(tmp_path):
    volume = np.random.default_rng(0).random((9, 300, 290), dtype=np.float32)
    write_mrc(tmp_path / "big.mrc", volume, voxel_size_A=7.0)
    binned, voxel_A, factor = load_phantom(tmp_path / "big.mrc", max_size=128)
    assert factor == 3 and binned.shape == (3, 100, 96) and voxel_A == pytest.approx(21.0)
    assert binned[0, 0, 0] == pytest.approx(volume[:3, :3, :3].mean(), rel=1e-5)
    same, voxel_A, factor = load_phantom(tmp_path / "big.mrc", max_size=None)
    assert factor == 1 and same.shape == volume.shape and voxel_A == 7.0
