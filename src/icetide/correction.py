"""The optical corrections of a tilt series: phase flipping by the CTF and exposure weighting, applied to the
images the fit sees or to those the outputs (the aligned stack, its FBP) are made of. ``icetide reconstruct``,
``icetide fbp`` and the experiments share them."""

from __future__ import annotations

import math

import numpy as np
import torch

from .config import ReconstructConfig
from .ctf import exposure_weight_series, phase_flip_series
from .data import TiltSeries
from .errors import IcetideError

__all__ = ["correct_optics"]


def correct_optics(
    series: TiltSeries, config: ReconstructConfig, for_fit: bool = True, tilt_axis_angle_deg: float | None = None
) -> tuple[TiltSeries, dict]:
    """The series the fit sees (``for_fit``) or the one the outputs (the aligned stack, FBP) are made of:
    phase-flipped when its defocus is known and ``config.ctf.correction`` is phaseflip (for the outputs also
    when it is model: the fit then sees the raw images and applies the CTF itself), exposure-weighted when its
    pre-exposure is known and ``config.ctf.exposure_weighting`` is on (:mod:`icetide.ctf`). The defocus
    gradient follows ``tilt_axis_angle_deg`` (default: the series'; see
    :func:`icetide.ctf.tilt_axis_on_images_deg` when a starting alignment holds the axis). Returns
    ``(series, report entry)``; the series is the input when nothing applies."""
    settings = config.ctf
    flip = series.defocus_A is not None and (
        settings.correction == "phaseflip" or (settings.correction == "model" and not for_fit)
    )
    weight = series.pre_exposure_e_per_A2 is not None and settings.exposure_weighting
    info: dict = {
        "correction": settings.correction if series.defocus_A is not None else "none",
        "exposure_weighting": weight,
    }
    if series.defocus_A is not None:
        info["defocus_A"] = series.defocus_A.tolist()
    if series.pre_exposure_e_per_A2 is not None:
        info["pre_exposure_e_per_A2"] = series.pre_exposure_e_per_A2.tolist()
    if settings.exposure_weighting and series.pre_exposure_e_per_A2 is None:
        info["note"] = "exposure weighting asked for, but no pre-exposure per tilt is known: not applied"
    if (flip or weight or info["correction"] == "model") and series.pixel_size_A is None:
        raise IcetideError("CTF or exposure correction needs the pixel size (--pixel-size or the MRC header)")
    if not (flip or weight):
        return series, info
    axis = series.tilt_axis_angle_deg if tilt_axis_angle_deg is None else tilt_axis_angle_deg

    def corrected(stack: np.ndarray) -> np.ndarray:
        images = torch.tensor(stack)  # a copy: the input may be a read-only memory map
        if flip:
            images = phase_flip_series(
                images, series.tilt_angles_deg, series.pixel_size_A, series.defocus_A, settings.microscope(),
                axis, settings.defocus_hand, math.radians(settings.phase_tolerance_deg),
            )
        if weight:
            images = exposure_weight_series(images, series.pixel_size_A, series.pre_exposure_e_per_A2,
                                            settings.voltage_kV)
        return images.numpy()

    halves = None if series.half_images is None else corrected(series.half_images)
    out = TiltSeries(corrected(series.images), series.tilt_angles_deg, series.pixel_size_A,
                     series.tilt_axis_angle_deg, series.defocus_A, series.pre_exposure_e_per_A2, halves)
    return out, info
