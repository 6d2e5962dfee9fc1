"""Plots: every function writes a PNG and the numbers behind it."""

import csv
import json

import numpy as np
import pytest

from icetide.deform import Deformations
from icetide.metrics import deformation_errors, fsc
from icetide.plots import (
    plot_curves,
    plot_deformation_errors,
    plot_fourier_slices,
    plot_fsc,
    plot_local_fields,
    plot_orthoslices,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
    data = path.read_bytes()
    return data.startswith(PNG_SIGNATURE) and len(data) > 2000


def _rows(path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture
def volumes():
    rng = np.random.default_rng(0)
    truth = rng.normal(size=(8, 12, 16)).astype(np.float32)
    return {"truth": truth, "noisy": truth + rng.normal(size=truth.shape).astype(np.float32)}


@pytest.fixture
def deformations():
    rng = np.random.default_rng(1)
    angles = np.arange(-40.0, 41.0, 20.0)
    local = np.zeros((5, 2, 5, 5))
    local[:, :, 1:-1, 1:-1] = rng.uniform(-2, 2, (5, 2, 3, 3))
    true = Deformations(angles, rng.uniform(-6, 6, (5, 2)), rng.uniform(-0.01, 0.01, 5), local, (24, 32))
    est = Deformations(angles, true.shifts_px + 0.3, true.angles_deg + 0.01,
                       rng.uniform(-2, 2, (5, 2, 10, 10)), (24, 32))
    return true, est


def test_plot_fsc_writes_png_and_csv(tmp_path, volumes):
    curves = {name: fsc(v, volumes["truth"]) for name, v in volumes.items()}
    png, data = plot_fsc(curves, tmp_path / "fsc.png", voxel_size_A=10.0)
    assert _is_png(png) and data == tmp_path / "fsc.csv"
    rows = _rows(data)
    assert len(rows) == 2 * 8 and {r["name"] for r in rows} == {"truth", "noisy"}
    assert float(rows[0]["fsc"]) == pytest.approx(1.0, abs=1e-5)
    png, _ = plot_fsc(curves, tmp_path / "fsc_no_voxel.png")  # without a voxel size: no 1/A axis
    assert _is_png(png)


def test_plot_orthoslices_and_fourier_slices(tmp_path, volumes):
    png, data = plot_orthoslices(volumes, tmp_path / "ortho.png")
    assert _is_png(png)
    info = json.loads(data.read_text())
    assert info["slice_index_zyx"] == [4, 6, 8] and list(info["rows"]) == ["truth", "noisy"]
    lo, hi = info["rows"]["truth"]["display_range"]
    assert lo < 0 < hi
    png, data = plot_fourier_slices(volumes, tmp_path / "fourier.png")
    assert _is_png(png) and set(json.loads(data.read_text())["panels"]) == {"truth", "noisy"}
    with pytest.raises(ValueError, match="3-D"):
        plot_orthoslices({"flat": np.zeros((4, 4))}, tmp_path / "bad.png")


def test_plot_local_fields_and_deformation_errors(tmp_path, deformations):
    true, est = deformations
    png, data = plot_local_fields(true, est, [0, 2, 4], tmp_path / "local.png", mesh=6)
    assert _is_png(png)
    info = json.loads(data.read_text())
    assert np.asarray(info["true_px"]).shape == (3, 6, 6, 2) and info["tilt_angles_deg"] == [-40.0, 0.0, 40.0]
    with pytest.raises(ValueError, match="tilt indices"):
        plot_local_fields(true, est, [5], tmp_path / "bad.png")

    errors = deformation_errors(true, est)
    png, data = plot_deformation_errors(errors, true.tilt_angles_deg, tmp_path / "errors.png")
    assert _is_png(png)
    rows = _rows(data)
    assert len(rows) == 5
    assert float(rows[0]["rotation_error_deg"]) == pytest.approx(0.01)


def test_plot_curves(tmp_path):
    x = np.arange(10)
    png, data = plot_curves(
        {"train": (x, 1 / (x + 1)), "validation": (x, 1.2 / (x + 1))},
        tmp_path / "curves.png", "epoch", "loss", hlines={"target": 0.2}, logy=True, vlines={"stop": 6},
        spans={"warm-up": (0, 3)},
    )
    assert _is_png(png) and len(_rows(data)) == 20
    with pytest.raises(ValueError, match="shape"):
        plot_curves({"bad": (x, x[:3])}, tmp_path / "bad.png", "x", "y")


def test_plot_bars(tmp_path):
    from icetide.plots import plot_bars

    png, data = plot_bars(["a", "b", "c"], {"m1": [0.1, 0.2, 0.3], "m2": [0.3, 0.2, 0.1]}, tmp_path / "bars.png", "CC")
    assert _is_png(png)
    rows = _rows(data)
    assert len(rows) == 6 and rows[0] == {"group": "a", "name": "m1", "value": "0.1"}
    with pytest.raises(ValueError, match="2 values for 3 groups"):
        plot_bars(["a", "b", "c"], {"m1": [0.1, 0.2]}, tmp_path / "bad.png", "CC")
