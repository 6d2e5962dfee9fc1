"""What a finished fit hands on: the best state, the estimated deformations and the report."""

from __future__ import annotations

import math
import platform
from dataclasses import dataclass, field

import numpy as np
import torch

from ..deform import Deformations
from ..volume import ImplicitVolume
from .fitter import Fitter
from .memory import peak_memory_mb

__all__ = ["FitResult", "fit_result"]


@dataclass
class FitResult:
    """What a finished fit hands to the outputs.

    ``volume``: the implicit volume in its best state (with ``fit.half_maps``, the first half's; ``half_volume``
    is the second's, else None); ``deformations``: estimated deformations with the gauge
    removed (see ``translation_xyz``); ``translation_xyz``: the volume translation (voxels) that replaces the
    removed common shift, i.e. the tomogram is ``rho(p - translation)``; ``density_scale``: multiply the field
    by it to get density in the units of the input (line integral per voxel length); ``report``: timings,
    curves, why it stopped.
    """

    volume: ImplicitVolume
    deformations: Deformations
    translation_xyz: np.ndarray
    density_scale: float
    report: dict = field(default_factory=dict)
    half_volume: ImplicitVolume | None = None


def best_epoch(curves: dict[str, list]) -> int | None:
    """The epoch (counted from 1) of the lowest validation loss in ``curves``, None without one."""
    if not curves["val_loss"]:
        return None
    vals = np.asarray(curves["val_loss"], dtype=float)
    if not np.isfinite(vals).any():
        return None
    return int(curves["epoch"][int(np.nanargmin(vals))])


def fit_result(fitter: Fitter, stop_reason: str) -> FitResult:
    """``fitter`` put back in its best state (the best unbinned one; a fit that ended within its binned stage,
    that stage's best), with the estimated deformations and the report."""
    best = fitter.stopping.best_state
    if best is None:
        best = fitter.binned_stopping.best_state
    if best is not None:
        fitter.restore(best)
    deformations, translation = fitter.deformations.estimate(fitter.problem.tilt_angles_deg)
    epoch = best_epoch(fitter.curves)
    if epoch is not None and fitter.stopping.best_state is not None:
        fitter.set_level_weights(epoch - 1)  # the weights the best state was trained with
    return FitResult(fitter.volume, deformations, translation, fitter.density_scale,
                     fit_report(fitter, stop_reason, epoch), fitter.half_volume)


def fit_report(fitter: Fitter, stop_reason: str, epoch: int | None) -> dict:
    """The fit's part of ``report.json``: why it stopped, the estimated global parameters, timings, curves, the
    memory plan and what ran where."""
    fit = fitter.config.fit
    scale = fitter.scales[0]
    deform = fitter.deformations
    best_val = fitter.stopping.best
    largest_tilt = float(fitter.problem.theta.abs().max())
    return {
        "stop_reason": stop_reason,
        "rollbacks": fitter.rollbacks,
        "tilt_axis_offset_deg": math.degrees(float(deform.axis_offset.detach())),
        "tilt_gains": deform.gains().detach().cpu().tolist(),
        "intensity_offset": (deform.offset.detach().cpu() * fitter.density_scale).tolist(),
        "epochs": fitter.epoch,
        "steps": fitter.step,
        "best_epoch": epoch,
        "best_validation_loss": None if not math.isfinite(best_val) else best_val,
        "fit_seconds": fitter.elapsed_s,
        "pixels_per_s": fitter.samples / max(fitter.elapsed_s, 1e-9),
        "field_evaluations_per_step": scale.renderer.evaluations_per_step(
            scale.lattice_rows, fit.tilts_per_step, fit.rays_per_tilt, largest_tilt),
        "curves": fitter.curves,
        "device": str(fitter.device),
        "encoding_kernel": fitter.volume.encoding.kernel_for(fitter.device),
        "mixed_precision": fitter.volume.mixed_precision,
        "data_scale": fitter.density_scale,
        "volume_shape_zyx": list(fitter.shape_zyx),
        "model_shape_zyx": list(fitter.model_shape_zyx),
        "lattice_rows": scale.lattice_rows if scale.renderer.predicts_whole_rows else None,
        "binned_epochs": fitter.binned_epochs,
        "coarse_to_fine_epochs": fitter.level_epochs,
        "step_chunks": fitter.step_chunks,
        "memory_budget_mb": None if fitter.memory.budget_bytes is None else fitter.memory.budget_bytes / 2**20,
        "memory_events": fitter.memory_events,
        "versions": {"torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version()},
        "seed": fit.seed,
        **peak_memory_mb(fitter.device),
    }
