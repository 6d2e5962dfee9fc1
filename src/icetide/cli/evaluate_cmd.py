"""``icetide evaluate``: score reconstructions (and estimated deformations) against the truth."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from .. import __version__
from ..errors import IcetideError
from ..runlog import run_log
from .common import check_output_dir, console, one_line_errors, output_dir, say


def _method_names(names: Optional[str], recons: List[Path]) -> list[str]:
    """``--names`` split on commas, or the file names without extension (made unique)."""
    if names is None:
        stems = [p.name.removesuffix(".gz").removesuffix(".mrc") for p in recons]
        return stems if len(set(stems)) == len(stems) else [f"{i + 1}:{s}" for i, s in enumerate(stems)]
    parsed = [n.strip() for n in names.split(",")]
    if len(parsed) != len(recons):
        raise IcetideError(f"--names gives {len(parsed)} names for {len(recons)} reconstructions")
    if any(not n for n in parsed) or len(set(parsed)) != len(parsed) or "truth" in parsed:
        raise IcetideError(f"--names must be distinct, non-empty and not 'truth', got {names!r}")
    return parsed


def _load_deformations(truth_path: Optional[Path], est_path: Optional[Path]):
    """Both deformation files, checked against each other, or ``None`` when neither is given."""
    from ..io import read_deformations
    from ..metrics import check_same_tilts

    if truth_path is None and est_path is None:
        return None
    if truth_path is None or est_path is None:
        given, missing = ("--deformations", "--truth-deformations") if truth_path is None else (
            "--truth-deformations", "--deformations")
        raise IcetideError(f"{given} needs {missing} too")
    true, est = read_deformations(truth_path), read_deformations(est_path)
    check_same_tilts(true, est)
    return true, est


def _resolution_text(entry: dict) -> str:
    """``voxels/Angstrom`` of one FSC threshold; ``Nyq`` when the curve never drops below it."""
    if entry["nyquist_limited"]:
        return "Nyq"
    text = f"{entry['voxels']:.2f}"
    return text if entry["angstrom"] is None else f"{text}/{entry['angstrom']:.1f}"


def results_table(results: dict[str, dict], voxel_A: Optional[float]) -> Table:
    unit = "voxels" if voxel_A is None else "voxels/Å"
    table = Table(
        title="scores against the truth after registration",
        caption=f"FSC: resolution in {unit} (Nyq: never below); shift: voxels",
    )
    for column in ("name", "CC", "FSC 0.5", "FSC 0.143", "shift z,y,x"):
        table.add_column(column, justify="left" if column == "name" else "right", no_wrap=column != "name")
    for name, r in results.items():
        res = r["fsc"]["resolution"]
        table.add_row(
            name, f"{r['cc']:.4f}", _resolution_text(res["0.5"]), _resolution_text(res["0.143"]),
            ",".join(f"{s:+.2f}" for s in r["shift_zyx_vox"]),
        )
    return table


def deformation_summary(errors: dict) -> str:
    """One line of deformation errors for the terminal."""
    return (
        f"deformations: shift RMS {errors['shift_rms_px']:.3f} px (gauge removed), rotation MAE "
        f"{errors['rotation_mae_deg']:.4f} deg, local error {errors['local_mean_error_px']:.3f} px "
        f"(true field mean {errors['local_true_mean_px']:.3f} px)"
    )


@one_line_errors
def evaluate(
    recons: List[Path] = typer.Argument(
        ..., metavar="RECON.mrc", help="Reconstructions to score, MRC volumes of the truth's shape."
    ),
    truth: Path = typer.Option(
        ..., "--truth", help="Ground-truth volume, MRC (nz, ny, nx); its header gives the voxel size."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (created; must be empty unless --force)."),
    names: Optional[str] = typer.Option(
        None, help="Comma-separated names of the reconstructions, in order. Default: their file names."
    ),
    truth_deformations: Optional[Path] = typer.Option(
        None, help="True deformations.json (from simulate); needs --deformations."
    ),
    deformations: Optional[Path] = typer.Option(
        None, help="Estimated deformations.json (from reconstruct) to score against --truth-deformations."
    ),
    mask_thickness: Optional[float] = typer.Option(
        None, help="Score only the centred slab |z| <= N/2 voxels (CC over it, FSC of the masked volumes). "
        "Default: the whole volume."
    ),
    taper: float = typer.Option(
        0.0, help="FSC only: multiply both volumes by a raised-cosine taper this many voxels wide at the box faces "
        "(removes the spectral lines of the cut faces, which inflate high frequencies). Default 0: none."
    ),
    no_register: bool = typer.Option(
        False, "--no-register", help="Score as is, without the sub-voxel translation that best aligns each "
        "reconstruction to the truth."
    ),
    force: bool = typer.Option(False, "--force", help="Replace the contents of a non-empty output folder."),
) -> None:
    """Score reconstructions against the ground truth, all by the same procedure.

    Each reconstruction is registered to the truth by the sub-voxel
    translation maximising their cross-correlation (no scaling; moved by a
    periodic Fourier shift), then scored by Pearson correlation (CC) and
    Fourier shell correlation (FSC; shells in cycles/voxel of each axis;
    resolution where it drops below 0.5 and 0.143, in voxels and in Angstrom
    from the truth's voxel size). With --truth-deformations and
    --deformations the estimated deformations are scored too: shift RMS after
    removing the gauge translation, rotation mean absolute error, mean
    local-field error.

    Writes in OUT: metrics.json; fsc.png/.csv; orthoslices.png/.json;
    fourier_slices.png/.json; with deformations also deformation_errors.png/.csv
    and local_fields.png/.json. Prints a summary table.
    """
    from ..io import read_volume, write_json
    from ..evaluation import REGISTRATION_NOTE, evaluate_volumes
    from ..metrics import slab_mask

    labels = _method_names(names, recons)
    check_output_dir(out, force)
    truth_volume, voxel_A = read_volume(truth)
    volumes = {}
    for label, path in zip(labels, recons):
        volume, _ = read_volume(path)
        if volume.shape != truth_volume.shape:
            raise IcetideError(
                f"{path} has shape {volume.shape} but the truth {truth} has shape {truth_volume.shape}"
            )
        volumes[label] = volume
    mask = None
    if mask_thickness is not None:
        if not 0 < mask_thickness <= truth_volume.shape[0]:
            raise IcetideError(
                f"--mask-thickness must lie in (0, {truth_volume.shape[0]}] voxels, got {mask_thickness:g}"
            )
        mask = slab_mask(truth_volume.shape, mask_thickness)
    if not 0 <= taper < min(truth_volume.shape) / 2:
        raise IcetideError(f"--taper must lie in [0, {min(truth_volume.shape) / 2:g}) voxels, got {taper:g}")
    pair = _load_deformations(truth_deformations, deformations)

    console.print(f"scoring {len(volumes)} reconstruction(s) of shape {truth_volume.shape} against {truth}")
    with output_dir(out, force) as folder, run_log(folder):
        scores = evaluate_volumes(volumes, truth_volume, folder, voxel_A, mask, not no_register, taper, pair)
        results = scores["reconstructions"]
        report = {
            "command": "evaluate",
            "icetide_version": __version__,
            "truth": str(truth),
            "shape_zyx": list(truth_volume.shape),
            "voxel_size_A": voxel_A,
            "registration": "none" if no_register else REGISTRATION_NOTE,
            "mask": None if mask is None else {"slab_thickness_vox": mask_thickness},
            "fsc_taper_vox": taper,
            "reconstructions": {label: {"path": str(p), **results[label]} for label, p in zip(labels, recons)},
        }
        if pair is not None:
            report["deformations"] = {
                "truth": str(truth_deformations), "estimate": str(deformations), **scores["deformations"]
            }
        write_json(folder / "metrics.json", report)
        console.print(results_table(results, voxel_A))
        if pair is not None:
            say(deformation_summary(report["deformations"]))
        say(f"done: {out}/metrics.json and figures")
