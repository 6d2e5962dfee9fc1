"""Experiment ``noise`` (paper Fig. 8): CC of each method for a range of SNRs."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..plots import plot_curves
from .case import METHODS, run_case
from .report import markdown_table, write_report
from .settings import machine_info, phantoms


def run(
    settings, out_dir: Path, phase: Callable[[str], None], on_epoch: Callable[[dict], None] | None = None
) -> dict:

    phantom = phantoms(settings, first_only=True)[0]
    nz = phantom.volume.shape[0]
    config = settings.reconstruction_config(phantom)
    cases = {}
    for snr in settings.snrs_db:
        phase(f"SNR {snr:g} dB")
        folder = out_dir / f"snr_{snr:+g}dB"
        folder.mkdir(exist_ok=True)
        cases[snr] = run_case(phantom.volume, phantom.voxel_size_A, settings.acquisition(snr_db=snr), config,
                              folder, phase, on_epoch)
    snrs = list(cases)
    curves = {m: (snrs, [cases[s]["reconstructions"][m]["cc"] for s in snrs]) for m in METHODS}
    plot_curves(curves, out_dir / "cc_vs_snr.png", "SNR (dB)", "CC with the truth")
    rows = [(f"{s:g}", *(cases[s]["reconstructions"][m]["cc"] for m in METHODS),
             cases[s]["deformations"]["shift_rms_px"]) for s in snrs]
    table = markdown_table(("SNR (dB)", *METHODS, "icetide shift RMS (px)"), rows)
    body = (
        f"Phantom: {phantom.source}, {phantom.volume.shape[2]} x {phantom.volume.shape[1]} x {nz} voxels; "
        f"{cases[snrs[0]]['acquisition']['n_tilts']} tilts, paper deformation profile, seed {settings.seed}; "
        "one simulation and one fit per SNR.\n\nCC with the truth:\n\n"
        + table + "\n\n![CC against SNR (Fig. 8)](cc_vs_snr.png)\n"
    )
    results = {"phantom": phantom.source, "cases": {f"{s:g}": cases[s] for s in snrs}}
    return write_report(out_dir, "noise", settings, machine_info(settings.device), results, body)
