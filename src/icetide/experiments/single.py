"""Experiment ``single`` (paper Figs. 4-7): every method on one volume, scored against the truth."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from .case import run_case
from .report import cc_table, fmt, write_report
from .settings import machine_info, phantoms

FIGURES = {
    "fsc.png": "FSC of every method against the truth (Fig. 4)",
    "orthoslices.png": "central orthoslices, registered to the truth (Fig. 5)",
    "local_fields.png": "true and estimated local fields (Fig. 6)",
    "fourier_slices.png": "log-amplitude of the central XZ Fourier slice, missing wedge (Fig. 7)",
    "deformation_errors.png": "per-tilt shift, rotation and local-field errors",
}


def run(
    settings, out_dir: Path, phase: Callable[[str], None], on_epoch: Callable[[dict], None] | None = None
) -> dict:

    phantom = phantoms(settings, first_only=True)[0]
    config = settings.reconstruction_config(phantom)
    case = run_case(phantom.volume, phantom.voxel_size_A, settings.acquisition(), config, out_dir, phase, on_epoch)
    d, fit = case["deformations"], case["fit"]
    a = case["acquisition"]
    nz, ny, nx = case["volume_shape_zyx"]
    body = (
        f"Phantom: {phantom.source}; {nx} x {ny} x {nz} voxels of {phantom.voxel_size_A:g} Å; {a['n_tilts']} tilts "
        f"from {a['tilt_min_deg']:g} to {a['tilt_max_deg']:g} degrees, {a['profile']} deformation profile, "
        f"{a['snr_db']:g} dB (measured {case['snr_db_measured']:.2f} dB), seed {a['seed']}.\n\n"
        + cc_table(case)
        + f"\n\nDeformations estimated by icetide (after removing the gauge): shift RMS error "
        f"{fmt(d['shift_rms_px'])} px, rotation MAE {fmt(d['rotation_mae_deg'], 4)} degrees, local-field error "
        f"{fmt(d['local_mean_error_px'])} px against a true mean field of {fmt(d['local_true_mean_px'])} px.\n\n"
        f"icetide fit: {fit['epochs']} epochs, {fit['fit_seconds']:.0f} s on {fit['device']} ({fit['stop_reason']}); "
        f"SIRT: {case['sirt_iterations']} iterations.\n\n"
        + "\n".join(f"![{text}]({name})\n" for name, text in FIGURES.items())
    )
    return write_report(out_dir, "single", settings, machine_info(settings.device),
                        {"phantom": phantom.source, "case": case}, body)
