"""``icetide batch``: many series on a local Dask cluster; one bad input never stops the others; re-runs skip."""

import json
import sys

import numpy as np
import pytest
from cli_helpers import ANGLES, SHAPE, TINY_VOLUME_YAML, write_series
from cli_helpers import run_cli as _run

from icetide.batch import find_items
from icetide.errors import IcetideError
from icetide.io import write_mrc, write_tlt
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
        assert (out / name / "tomogram.mrc").is_file() and (out / name / "report.json").is_file()
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

    rec = tmp_path / "rec"  # a reconstruction writes alignment.star (k@stack) and tomograms.star
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


def test_batch_without_dask_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)  # as if the batch extra were not installed
    result = _run("batch", tmp_path, "-o", tmp_path / "out")
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "needs dask's distributed" in lines[0] and "pip install 'icetide[batch]'" in lines[0]
    assert not (tmp_path / "out").exists()
