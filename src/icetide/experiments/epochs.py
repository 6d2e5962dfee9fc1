"""Experiment ``epochs`` (paper Fig. 9): CC with the truth along the fit, against the FBP oracle.

The fit runs without early stopping (``patience`` beyond the epoch limit) so that the whole curve is seen; every
``every`` epochs the current volume is sampled and scored like a final one (registration to the truth, CC).
Scoring time is excluded from the fit time. The epoch that early stopping on the held-out pixels would return
(the best validation loss) is marked.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Collection

import numpy as np
import torch

from ..config import ReconstructConfig
from ..data import TiltSeries
from ..fit import Fitter, run_fit
from ..metrics import evaluate_reconstruction
from ..plots import plot_curves
from ..classical import fbp
from ..tomogram import sample_tomogram
from ..start import coarse_start
from ..simulate import SimulatedTiltSeries
from .case import simulate_case
from .report import fmt, write_report
from .settings import machine_info, phantoms

DEFAULT_EPOCHS = 250
# What of the fit's report.json the result keeps: how the fit ran.
FIT_REPORT_KEYS = ("epochs", "steps", "stop_reason", "fit_seconds", "lattice_rows", "binned_epochs",
                   "field_evaluations_per_step", "encoding_kernel", "mixed_precision", "device")


def cc_along_fit(
    truth: np.ndarray,
    sim: SimulatedTiltSeries,
    voxel_size_A: float,
    config: ReconstructConfig,
    every: int | Collection[int],
    on_epoch: Callable[[dict], None] | None = None,
    on_score: Callable[[dict], None] | None = None,
) -> dict:
    """Fit ``sim.noisy`` with ``config`` (its ``patience`` should exceed its ``epochs``) from the coarse
    pre-alignment as ``reconstruct`` does, scoring the volume every ``every`` epochs, or at the epochs listed
    in ``every`` (``on_score`` gets each point of the curve as it is scored).

    Returns ``oracle_cc`` (FBP of the undeformed noisy series), ``raw_cc`` (FBP of the raw series),
    ``curve`` (epoch, fit seconds, CC), ``time_to_oracle_s`` / ``epoch_to_oracle`` (first scored epoch whose CC
    reaches the oracle's; None if none), ``early_stopping_epoch`` and ``cc_near_early_stopping``, ``max_cc`` and
    ``max_cc_epoch``, and ``fit`` (``FIT_REPORT_KEYS`` of the fit's report).
    """
    angles = sim.tilt_angles_deg
    nz = truth.shape[0]
    oracle_cc = evaluate_reconstruction(fbp(torch.from_numpy(sim.noisy_undeformed), angles, nz).numpy(), truth)["cc"]
    raw_cc = evaluate_reconstruction(fbp(torch.from_numpy(sim.noisy), angles, nz).numpy(), truth)["cc"]
    series = TiltSeries(sim.noisy, angles, voxel_size_A)
    fitter = Fitter(series, config, coarse_start(series, config))
    curve: list[dict] = []
    scoring_s = [0.0]

    def score(info: dict) -> None:
        if on_epoch is not None:
            on_epoch(info)
        if info["epoch"] % every if isinstance(every, int) else info["epoch"] not in every:
            return
        t0 = time.monotonic()
        tomogram = sample_tomogram(fitter.volume, np.zeros(3), fitter.density_scale, fitter.shape_zyx[2])
        cc = evaluate_reconstruction(tomogram, truth)["cc"]
        curve.append({"epoch": info["epoch"], "fit_s": info["elapsed_s"] - scoring_s[0], "cc": cc})
        scoring_s[0] += time.monotonic() - t0
        if on_score is not None:
            on_score(curve[-1])

    report = run_fit(fitter, on_epoch=score).report
    best_epoch = int(fitter.curves["epoch"][int(np.nanargmin(fitter.curves["val_loss"]))])
    reached = next((c for c in curve if c["cc"] >= oracle_cc), None)
    nearest = min(curve, key=lambda c: abs(c["epoch"] - best_epoch))
    peak = max(curve, key=lambda c: c["cc"])
    return {
        "oracle_cc": oracle_cc,
        "raw_cc": raw_cc,
        "time_to_oracle_s": None if reached is None else reached["fit_s"],
        "epoch_to_oracle": None if reached is None else reached["epoch"],
        "early_stopping_epoch": best_epoch,
        "cc_near_early_stopping": nearest["cc"],
        "max_cc": peak["cc"],
        "max_cc_epoch": peak["epoch"],
        "curve": curve,
        "fit": {key: report[key] for key in FIT_REPORT_KEYS},
    }


def plot_cc_along_fit(result: dict, path: Path, n_tilts: int) -> None:
    """CC against epochs with the oracle and raw-FBP lines, the early-stopping epoch (Fig. 9) and the binned
    epochs, shaded."""
    curve = result["curve"]
    binned = result["fit"].get("binned_epochs") or 0
    plot_curves(
        {"icetide (current state)": ([c["epoch"] for c in curve], [c["cc"] for c in curve])},
        path, f"epoch (one pass over all {n_tilts} tilts)", "CC with the truth",
        hlines={f"FBP oracle ({result['oracle_cc']:.3f})": result["oracle_cc"],
                f"FBP raw ({result['raw_cc']:.3f})": result["raw_cc"]},
        vlines={f"early stopping (epoch {result['early_stopping_epoch']})": result["early_stopping_epoch"]},
        markers=True,
        spans={f"binned by 2 (epochs 1-{binned})": (0, binned)} if binned else None,
    )


def run(
    settings, out_dir: Path, phase: Callable[[str], None], on_epoch: Callable[[dict], None] | None = None
) -> dict:

    phantom = phantoms(settings, first_only=True)[0]
    nz = phantom.volume.shape[0]
    epochs = settings.epochs or DEFAULT_EPOCHS
    acquisition = settings.acquisition()
    sim = simulate_case(phantom.volume, phantom.voxel_size_A, acquisition, out_dir, phase)
    config = settings.reconstruction_config(phantom, epochs=epochs, patience=epochs + 1)
    phase(f"fitting {epochs} epochs without early stopping, scoring every {settings.every}")
    result = cc_along_fit(phantom.volume, sim, phantom.voxel_size_A, config, settings.every, on_epoch)
    plot_cc_along_fit(result, out_dir / "cc_vs_epoch.png", len(sim.tilt_angles_deg))
    r = result
    reached = ("never reaches it" if r["epoch_to_oracle"] is None else
               f"reaches it at epoch {r['epoch_to_oracle']} after {r['time_to_oracle_s']:.1f} s of fitting")
    body = (
        f"Phantom: {phantom.source}, {phantom.volume.shape[2]} x {phantom.volume.shape[1]} x {nz} voxels; "
        f"{len(sim.tilt_angles_deg)} tilts, paper profile, {acquisition.snr_db:g} dB, seed {settings.seed}; "
        f"{epochs} epochs without early stopping, scored every {settings.every}.\n\n"
        f"FBP oracle CC {fmt(r['oracle_cc'])} (FBP of the raw series {fmt(r['raw_cc'])}); icetide {reached}. "
        f"Highest CC {fmt(r['max_cc'])} at epoch {r['max_cc_epoch']}; early stopping on the held-out pixels "
        f"would return epoch {r['early_stopping_epoch']} (CC {fmt(r['cc_near_early_stopping'])} at the nearest "
        f"scored epoch); CC at the last epoch {fmt(r['curve'][-1]['cc'])}.\n\n"
        "![CC against epochs (Fig. 9)](cc_vs_epoch.png)\n"
    )
    return write_report(out_dir, "epochs", settings, machine_info(settings.device), {"phantom": phantom.source, **r},
                        body)
