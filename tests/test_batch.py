"""``icetide batch``: many series on a local Dask cluster; one bad input never stops the others; re-runs skip."""

import csv
import json
import shutil
import sys

import numpy as np
import pytest
from cli_helpers import ANGLES, SHAPE, TINY_VOLUME_YAML, write_series
from cli_helpers import run_cli as _run

from icetide.batch import QC_COLUMNS, find_items, run_item
from icetide.config import ReconstructConfig
from icetide.errors import IcetideError
from icetide.io import write_mdoc, write_mrc, write_tlt, write_xf
from icetide.simulate import crowded_phantom


@pytest.fixture(scope="module")
def series_dir(tmp_path_factory):
    """Two simulated series laid out as ``icetide simulate`` does, and a corrupt stack with its angles."""
    root = tmp_path_factory.mktemp("batch")
    truth = crowded_phantom(SHAPE, seed=1)
    for seed in (1, 2):
        folder = root / f"sim{seed}"
        (folder / "truth").mkdir(parents=True)
        write_series(folder / "tilt_series.mrc", truth, seed=seed, voxel_size_A=10.0)
        write_mrc(folder / "truth" / "volume.mrc", truth, 10.0)
    (root / "bad").mkdir()
    (root / "bad" / "broken.mrc").write_bytes(b"not an MRC file")
    write_tlt(root / "bad" / "broken.tlt", ANGLES)
    (root / "tiny.yaml").write_text(TINY_VOLUME_YAML)
    return root


def test_batch_runs_every_series_reports_the_bad_one_and_skips_finished_ones(series_dir, tmp_path):
    out = tmp_path / "out"
    r = series_dir
    args = ("batch", r / "sim1" / "tilt_series.mrc", r / "sim2" / "tilt_series.mrc", r / "bad", "-o", out,
            "--workers", 2, "--retries", 1, "--epochs", 2, "--thickness", 12, "--config", r / "tiny.yaml",
            "--device", "cpu")
    result = _run(*args)
    assert result.exit_code == 1, result.output  # one series failed
    rows = {row["name"]: row for row in json.loads((out / "batch_summary.json").read_text())}
    assert set(rows) == {"sim1_tilt_series", "sim2_tilt_series", "broken"}
    for name in ("sim1_tilt_series", "sim2_tilt_series"):
        assert rows[name]["status"] == "done" and rows[name]["epochs"] == 2 and -1 <= rows[name]["cc"] <= 1
        assert (out / name / f"{name}_rec.mrc").is_file() and (out / name / "report.json").is_file()
    assert rows["broken"]["status"].startswith("failed: ") and "not a readable MRC file" in rows["broken"]["status"]
    assert not (out / "broken").exists() and not list(out.glob(".*partial"))
    assert "broken" in (out / "batch_summary.csv").read_text()

    again = _run(*args)
    rows = {row["name"]: row["status"] for row in json.loads((out / "batch_summary.json").read_text())}
    assert again.exit_code == 1 and rows["sim1_tilt_series"] == rows["sim2_tilt_series"] == "skipped (already done)"


def test_inputs_from_a_list_and_a_relion_tomograms_star(series_dir, tmp_path):
    r = series_dir
    listing = tmp_path / "list.txt"
    listing.write_text(f"# two series\n{r / 'sim1' / 'tilt_series.mrc'}\n{r / 'sim2' / 'tilt_series.mrc'}\n")
    items = find_items([str(listing)])
    assert [i.name for i in items] == ["sim1_tilt_series", "sim2_tilt_series"]
    assert items[0].angles.endswith("tilt_series.tlt") and items[0].truth.endswith("volume.mrc")

    rec = tmp_path / "rec"  # a reconstruction writes tilt_series.star (k@stack) and tomograms.star
    result = _run("reconstruct", r / "sim1" / "tilt_series.mrc", "--angles", r / "sim1" / "tilt_series.tlt", "-o", rec,
                  "--thickness", 12, "--epochs", 1, "--config", r / "tiny.yaml", "--device", "cpu")
    assert result.exit_code == 0, result.output
    (item,) = find_items([str(rec / "tomograms.star")])
    assert item.name == "tilt_series" and item.stack == str((r / "sim1" / "tilt_series.mrc").resolve())
    np.testing.assert_allclose(item.angles_deg, ANGLES)


def test_bad_inputs(tmp_path):
    with pytest.raises(IcetideError, match="no such file, folder or matching path"):
        find_items([str(tmp_path / "nothing*.mrc")])
    with pytest.raises(IcetideError, match="no tilt series found"):
        find_items([str(tmp_path)])
    result = _run("batch", tmp_path / "none.mrc", "-o", tmp_path / "out", "--retries", -1)
    assert result.exit_code == 2 and "--retries must be 0 or more" in result.output
    assert not (tmp_path / "out").exists()
    result = _run("batch", tmp_path / "none.mrc", "-o", tmp_path / "out", "--polarity", "dark")
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and "--polarity" in lines[0] and "'bright'" in lines[0]
    assert not (tmp_path / "out").exists()


def test_batch_without_dask_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)  # as if the batch extra were not installed
    result = _run("batch", tmp_path, "-o", tmp_path / "out")
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "needs dask's distributed" in lines[0] and "pip install 'icetide[batch]'" in lines[0]
    assert not (tmp_path / "out").exists()


def _mdoc_series(folder, name="TS_01"):
    """A series as SerialEM leaves it: ``NAME.mrc`` and ``NAME.mrc.mdoc`` (angles, pixel size, tilt axis)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_series(folder / f"{name}.mrc", crowded_phantom(SHAPE, seed=1), seed=1, voxel_size_A=10.0)
    (folder / f"{name}.tlt").unlink()
    write_mdoc(folder / f"{name}.mrc.mdoc", ANGLES, 10.0, f"{name}.mrc", (32, 24), tilt_axis_angle_deg=0.0)
    return folder / f"{name}.mrc.mdoc"


def test_mdoc_inputs_find_their_stack_and_the_side_files(tmp_path):
    for name in ("A.mrc", "B.st", "C_renamed.mrc", "A.xf", "A.aln", "A_CTF.txt", "B.aln", "B.defocus", "frame.tif"):
        (tmp_path / name).write_text("")  # listing looks at names only
    write_mdoc(tmp_path / "A.mrc.mdoc", ANGLES, 10.0, "A.mrc", (32, 24))
    write_mdoc(tmp_path / "B.mdoc", ANGLES, 10.0, "B.st", (32, 24))
    write_mdoc(tmp_path / "C.mdoc", ANGLES, 10.0, "D:\\scope\\C_renamed.mrc", (32, 24))  # renamed: ImageFile
    write_mdoc(tmp_path / "E.mrc.mdoc", ANGLES, 10.0, "E.mrc", (32, 24))  # its stack is missing
    write_mdoc(tmp_path / "frame.tif.mdoc", ANGLES[:1], 10.0, "frame.tif", (32, 24))  # a movie's, not a series'

    mdocs = [str(tmp_path / name) for name in ("A.mrc.mdoc", "B.mdoc", "C.mdoc", "E.mrc.mdoc")]
    items = {i.name: i for i in find_items(mdocs)}
    assert items["A"].stack == str(tmp_path / "A.mrc") and items["A"].mdoc.endswith("A.mrc.mdoc")
    assert items["A"].angles is None and items["A"].problem is None
    assert items["A"].xf.endswith("A.xf") and items["A"].aln is None  # one start: the .xf
    assert items["A"].defocus.endswith("A_CTF.txt") and items["A"].side_files() == "A.xf, A_CTF.txt"
    assert items["B"].stack.endswith("B.st") and items["B"].side_files() == "B.aln, B.defocus"
    assert items["C_renamed"].stack.endswith("C_renamed.mrc") and items["C_renamed"].mdoc.endswith("C.mdoc")
    assert items["E"].problem == f"{tmp_path / 'E.mrc.mdoc'}: no stack beside it (looked for E.mrc)"

    folder = {i.name: i for i in find_items([str(tmp_path)], side_files=False)}
    assert sorted(folder) == ["A", "B", "C_renamed", "E"]  # frame.tif.mdoc is a movie's: not a series
    assert folder["A"].mdoc.endswith("A.mrc.mdoc") and folder["A"].xf is None and folder["A"].defocus is None


def test_run_item_applies_the_options_and_a_side_xf(tmp_path):
    mdoc = _mdoc_series(tmp_path / "data")
    xf = np.zeros((len(ANGLES), 2, 3))
    xf[:, 0, 0] = xf[:, 1, 1] = 1.0
    xf[:, 1, 2] = 2.0 * (-1) ** np.arange(len(ANGLES))  # along the axis: no part of it is a shift of the volume
    write_xf(tmp_path / "data" / "TS_01.xf", xf)
    (item,) = find_items([str(mdoc)])
    config = ReconstructConfig.model_validate({"thickness": 6, "bin": 2, "volume": {"log2_table_size": 10,
                                               "n_levels": 3, "hidden": 8}, "fit": {"epochs": 1, "device": "cpu"}})
    row = run_item(item, str(tmp_path / "out"), config.model_dump(mode="json"), invert=True, exclude="0-1")

    folder = tmp_path / "out" / "TS_01"
    report = json.loads((folder / "report.json").read_text())
    assert report["batch"]["xf"] == str(tmp_path / "data" / "TS_01.xf") and report["batch"]["mdoc"] == str(mdoc)
    assert report["batch"]["invert"] is True and report["batch"]["exclude"] == "0-1"
    assert report["polarity"]["input_inverted"] is True
    assert report["prealigned"] is False and "start_check" in report  # the .xf was the start
    assert report["bin"] == 2 and "bin: 2" in (folder / "config.yaml").read_text()
    assert report["input"]["n_tilts"] == len(ANGLES) - 2 and report["input"]["pixel_size_A"] == 20.0
    assert row["status"] == "done" and row["n_views"] == len(ANGLES) - 2 and row["bin"] == 2
    assert row["shift_range_px"] >= 2.0 and row["tilt_axis_deg"] == pytest.approx(0.0, abs=1.0)
    assert row["epochs"] == 1 and row["val_loss"] > 0 and 0 < row["even_odd_fsc"] <= 1
    assert row["half_map_fsc143_A"] is None  # no half maps asked for
    assert row["beads"] == report["bead_residual"]["beads"]  # the tiny phantom has no beads: 0 or a few
    skipped = run_item(item, str(tmp_path / "out"), config.model_dump(mode="json"))
    assert skipped["status"] == "skipped (already done)" and skipped["n_views"] == row["n_views"]


def test_batch_of_mdocs_fails_the_one_without_its_stack_and_writes_the_metrics(series_dir, tmp_path):
    good = _mdoc_series(tmp_path / "data")
    write_mdoc(tmp_path / "data" / "TS_02.mrc.mdoc", ANGLES, 10.0, "TS_02.mrc", (32, 24))
    shutil.copy(series_dir / "tiny.yaml", tmp_path / "tiny.yaml")
    out = tmp_path / "out"
    result = _run("batch", tmp_path / "data" / "*.mdoc", "-o", out, "--workers", 1, "--retries", 0, "--epochs", 1,
                  "--thickness", 12, "--config", tmp_path / "tiny.yaml", "--device", "cpu")
    assert result.exit_code == 1, result.output
    rows = {row["name"]: row for row in json.loads((out / "batch_summary.json").read_text())}
    assert rows["TS_01"]["status"] == "done" and rows["TS_01"]["stack"] == str(good.parent / "TS_01.mrc")
    missing = good.parent / "TS_02.mrc.mdoc"
    assert rows["TS_02"]["status"] == f"failed: {missing}: no stack beside it (looked for TS_02.mrc)"
    with open(out / "batch_metrics.csv", newline="") as fh:
        metrics = list(csv.DictReader(fh))
    assert list(metrics[0]) == ["name", "status", *QC_COLUMNS, "side_files"]
    assert [m["name"] for m in metrics] == ["TS_01", "TS_02"]
    assert metrics[0]["n_views"] == str(len(ANGLES)) and float(metrics[0]["val_loss"]) > 0
    assert metrics[0]["pixel_size_A"] == "10.0" and metrics[1]["val_loss"] == ""
    assert "quality" in result.output
