"""An AreTomo3 output folder as input: the finder, ``icetide reconstruct FOLDER`` and ``icetide batch``'s listing.

The files are written by hand after the formats AreTomo3 documents or writes (see :mod:`icetide.io.aretomo`):
a stack with a dark view, its ``_TLT.txt`` (dark view included), an ``.aln`` that leaves the dark view out
and has an ``AlphaOffset``, a CTFFIND-style ``_CTF.txt`` and the ``_ODD``/``_EVN`` half stacks.
"""

import json

import numpy as np
import pytest
from cli_helpers import ANGLES, SHAPE, TINY_VOLUME_YAML
from cli_helpers import run_cli as _run

from icetide.alignment import aln_to_deformations
from icetide.batch import load_item, find_items
from icetide.config import ReconstructConfig
from icetide.errors import IcetideError
from icetide.io import aretomo3_series, read_aln, read_deformations, write_mrc
from icetide.io.aretomo import dark_views, exclude_dark_views
from icetide.simulate import crowded_phantom, simulate_tilt_series

NAME = "Position_1"
DARK_DEG = 60.0
STACK_ANGLES = np.append(ANGLES, DARK_DEG)  # the dark view last, as AreTomo3 sorts by tilt
ALPHA_OFFSET = 2.0
DEFOCUS = np.linspace(18000.0, 22000.0, len(STACK_ANGLES))
SHIFTS = np.random.default_rng(3).uniform(-2, 2, (len(ANGLES), 2))


def _aln_text() -> str:
    rows = [f"{k:5d}    0.0000    1.00000  {tx:9.3f}  {ty:9.3f}     1.00     1.00     1.00     0.00  {a:7.2f}"
            for k, (a, (tx, ty)) in enumerate(zip(ANGLES + ALPHA_OFFSET, SHIFTS))]
    return (f"# AreTomo Alignment / Priims bprmMn\n# RawSize = {SHAPE[2]} {SHAPE[1]} {len(STACK_ANGLES)}\n"
            f"# NumPatches = 0\n# DarkFrame =     {len(ANGLES)}    {len(ANGLES)}   {DARK_DEG:6.2f}\n"
            f"# AlphaOffset =    {ALPHA_OFFSET:5.2f}\n# BetaOffset =     0.00\n"
            "# SEC     ROT         GMAG       TX          TY      SMEAN     SFIT    SCALE     BASE     TILT\n"
            + "\n".join(rows) + "\n")


def _ctf_text() -> str:
    header = ("# Output from CTFFind version 4.1.14\n# Columns: #1 - micrograph number; #2 - defocus 1 [Angstroms]; "
              "#3 - defocus 2; #4 - azimuth of astigmatism; #5 - additional phase shift [radians]; "
              "#6 - cross correlation; #7 - spacing (in Angstroms) up to which CTF rings were fit successfully\n")
    return header + "".join(f"{k + 1:.6f} {d:.2f} {d:.2f} 0.00 0.000000 0.100000 20.0\n" for k, d in enumerate(DEFOCUS))


def write_aretomo3(folder, name=NAME, halves=True):
    """An AreTomo3 output folder for one series: stack, _TLT.txt, .aln, _CTF.txt, _ODD/_EVN and _Vol stacks."""
    folder.mkdir(parents=True, exist_ok=True)
    images = simulate_tilt_series(crowded_phantom(SHAPE, seed=1), STACK_ANGLES, snr_db=20, seed=0,
                                  samples_per_voxel=1.0).noisy.astype(np.float32)
    images[-1] = np.random.default_rng(1).normal(0, 1e-3, images[-1].shape)  # the dark view
    write_mrc(folder / f"{name}.mrc", images, voxel_size_A=8.0, stack=True)
    (folder / f"{name}_TLT.txt").write_text(
        "".join(f"{a:8.2f}  {k + 1:4d}  {3.0:8.2f}\n" for k, a in enumerate(STACK_ANGLES)))
    (folder / f"{name}.aln").write_text(_aln_text())
    (folder / f"{name}_CTF.txt").write_text(_ctf_text())
    write_mrc(folder / f"{name}_Vol.mrc", np.zeros((4, 24, 32), np.float32), voxel_size_A=8.0)
    if halves:
        noise = np.random.default_rng(2).normal(0, 0.05, (2,) + images.shape).astype(np.float32)
        write_mrc(folder / f"{name}_ODD.mrc", images + noise[0], voxel_size_A=8.0, stack=True)
        write_mrc(folder / f"{name}_EVN.mrc", images + noise[1], voxel_size_A=8.0, stack=True)
    return folder


def test_the_finder_returns_every_piece_of_one_series(tmp_path):
    folder = write_aretomo3(tmp_path / "at3")
    found = aretomo3_series(folder)
    assert found.name == NAME and found.stack == folder / f"{NAME}.mrc"
    assert (found.angles, found.aln, found.ctf) == (folder / f"{NAME}_TLT.txt", folder / f"{NAME}.aln",
                                                    folder / f"{NAME}_CTF.txt")
    assert (found.odd, found.even) == (folder / f"{NAME}_ODD.mrc", folder / f"{NAME}_EVN.mrc")
    assert found.angles_deg() is None  # the _TLT.txt gives them
    (folder / f"{NAME}_EVN.mrc").unlink()
    assert aretomo3_series(folder).odd is None  # one half alone is no pair
    (folder / f"{NAME}_TLT.txt").unlink()
    np.testing.assert_allclose(aretomo3_series(folder).angles_deg(), ANGLES)  # the .aln's, less the offset


def test_the_finder_names_the_series_of_a_shared_folder_and_what_is_missing(tmp_path):
    folder = write_aretomo3(tmp_path / "at3", halves=False)
    write_aretomo3(folder, name="Position_2", halves=False)
    with pytest.raises(IcetideError, match="holds 2 AreTomo3 tilt series \\(Position_1, Position_2\\); name one"):
        aretomo3_series(folder)
    assert aretomo3_series(folder, "Position_2").stack == folder / "Position_2.mrc"
    with pytest.raises(IcetideError, match="'Position_3' \\(it holds Position_1, Position_2\\)"):
        aretomo3_series(folder, "Position_3")
    (folder / "Position_2.mrc").unlink()
    with pytest.raises(IcetideError, match="tilt series Position_2: missing the stack Position_2.mrc"):
        aretomo3_series(folder, "Position_2")
    with pytest.raises(IcetideError, match="no AreTomo3 tilt series in it"):
        aretomo3_series(tmp_path)
    with pytest.raises(IcetideError, match="not a folder"):
        aretomo3_series(folder / "Position_1.mrc")


def test_dark_views_are_matched_by_nominal_tilt(tmp_path):
    aln = read_aln(write_aretomo3(tmp_path / "at3", halves=False) / f"{NAME}.aln")
    assert aln.dark_frames == [(len(ANGLES), len(ANGLES), DARK_DEG)] and aln.alpha_offset_deg == ALPHA_OFFSET
    assert aln.header["BetaOffset"] == "0.00"
    assert dark_views(aln, STACK_ANGLES) == [len(ANGLES)] and dark_views(aln, ANGLES) == []
    assert exclude_dark_views("0-1", aln, STACK_ANGLES) == ("0,1,7", [7])
    assert exclude_dark_views("7", aln, STACK_ANGLES) == ("7", [7])  # given already: once
    assert exclude_dark_views(None, aln, ANGLES) == (None, [])


def test_reconstruct_an_aretomo3_folder_uses_all_its_pieces(tmp_path):
    folder = write_aretomo3(tmp_path / "at3")
    config = tmp_path / "warmup.yaml"  # 2 epochs in the warm-up: the deformations written are the starting ones
    config.write_text(TINY_VOLUME_YAML + "fit: {tilts_per_step: 4, warmup_epochs: 5}\n")
    out = tmp_path / "rec"
    result = _run("reconstruct", folder, "-o", out, "--epochs", 2, "--thickness", 12, "--config", config,
                  "--device", "cpu")
    assert result.exit_code == 0, result.output
    line = (f"AreTomo3 series {NAME}: half series {NAME}_ODD.mrc and {NAME}_EVN.mrc, angles {NAME}_TLT.txt, "
            f"start alignment {NAME}.aln, defocus {NAME}_CTF.txt, dark views 7 excluded")
    assert line in " ".join(result.output.split()) and line in (out / "icetide.log").read_text()
    report = json.loads((out / "report.json").read_text())
    np.testing.assert_allclose(np.asarray(report["optics"]["defocus_A"])[:, 0], DEFOCUS[:-1], atol=1e-2)
    assert "half_maps" in report and (out / f"{NAME}_half2.mrc").is_file()  # named after the series
    assert "half_maps: series" in (out / "config.yaml").read_text()
    assert (out / f"{NAME}.exclude").read_text().split() == ["8"]
    est = read_deformations(out / "deformations.json")
    expected = aln_to_deformations(read_aln(folder / f"{NAME}.aln"), ANGLES, SHAPE[1:])
    np.testing.assert_allclose(est.tilt_angles_deg, ANGLES)
    # The start is re-centred on the volume (a common shift per view's projection): compare shift differences.
    np.testing.assert_allclose(np.diff(est.shifts_px, axis=0), np.diff(expected.shifts_px, axis=0), atol=0.5)


def test_options_win_over_the_folder(tmp_path):
    folder = write_aretomo3(tmp_path / "at3")
    write_aretomo3(folder, name="Position_2", halves=False)
    result = _run("reconstruct", folder, "-o", tmp_path / "rec", "--epochs", 1)
    assert result.exit_code == 2 and "Position_1, Position_2" in result.output and not (tmp_path / "rec").exists()
    result = _run("reconstruct", folder / f"{NAME}.mrc", "--aretomo-name", NAME, "-o", tmp_path / "rec")
    assert result.exit_code == 2 and "--aretomo-name needs an AreTomo3 output folder" in result.output
    # --half-maps tilts: the full stack; --defocus, --angles and --xf: theirs (a bad --renderer stops the run).
    result = _run("reconstruct", folder, "--aretomo-name", NAME, "--half-maps", "tilts", "--defocus", "my.defocus",
                  "--angles", folder / f"{NAME}_TLT.txt", "--xf", "my.xf", "--renderer", "bad", "-o", tmp_path / "rec")
    assert result.exit_code == 2 and "--renderer: Input should be" in result.output
    assert f"AreTomo3 series {NAME}: stack {NAME}.mrc, dark views 7 excluded" in " ".join(result.output.split())
    # --exclude is checked against the folder's 8 views.
    result = _run("reconstruct", folder, "--aretomo-name", NAME, "--exclude", "10", "-o", tmp_path / "rec")
    assert result.exit_code == 2 and "outside 0..7" in result.output


def test_batch_lists_one_series_per_aln_and_excludes_its_dark_views(tmp_path):
    folder = write_aretomo3(tmp_path / "at3")
    (item,) = find_items([str(folder)])
    assert item.name == NAME and item.stack == str(folder / f"{NAME}.mrc")
    assert item.angles == str(folder / f"{NAME}_TLT.txt") and item.side_files() == f"{NAME}.aln, {NAME}_CTF.txt"
    series, init, stack = load_item(item, ReconstructConfig(), tmp_path, False, None)
    np.testing.assert_allclose(series.tilt_angles_deg, ANGLES)
    assert init.n_tilts == len(ANGLES) and list(stack.kept) == list(range(len(ANGLES)))
