"""From recorded intensities to the contrast the model explains: per-tilt levels and a high-pass.

A raw tilt series holds counts: every image sits on a level (the dose times the fraction of electrons that
cross the specimen unscattered; it falls with the path length, roughly ``1 / cos(theta)``) and the specimen's
contrast is a small modulation of that level, proportional to it. The smooth part of each image (the beam's
illumination profile, thickness and ice gradients across the field, the specimen parts outside the modelled
box) is fixed to the detector or to the tilt, not to the specimen, so no density explains it; fitted as it is,
the deformations move the images to explain it instead (on EMPIAR-10499 the shifts drift along the tilt axis,
docs/REAL_DATA.md). So the fit sees

    c_m = d_m - G_sigma * d_m,    d_m = (I_m - L_m) / |L_m|

the relative contrast ``d_m`` of each image (``L_m`` its mean level; only for data on a level, see
:func:`has_levels`) with everything broader than ``sigma`` removed (its Gaussian blur ``G_sigma * d_m``
subtracted, mirrored edges).
Both are linear per image, so they keep the model ``c = g P[rho] + b`` of :mod:`icetide.fit` for the high-passed
density.

Neither changes the sign: the volumes come out with the polarity of the images fitted, those of the input
unless ``--invert`` flipped them. :func:`output_polarity` turns that into the polarity asked for the outputs
and the header label that states it.
"""

from __future__ import annotations

from typing import get_args

import numpy as np
import torch

from .config import Polarity
from .errors import IcetideError

__all__ = ["has_levels", "image_levels", "highpass", "fit_contrast", "output_polarity", "POLARITIES"]

# Output polarities, the settings schema's (config.Polarity): bright (dense = bright, positive; the input images are
# taken to show it so unless inverted) or input (as the input images: dense = dark when they were inverted).
POLARITIES = get_args(Polarity)

# Data whose every image's mean lies this many standard deviations of its pixels away from zero are taken as
# recorded on a level (counts, or any positive intensity): a zero-mean or already normalised series does not.
LEVEL_TO_SPREAD = 2.0


def image_levels(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of each image ``(M, ny, nx)``: two ``(M,)`` float64 arrays (accumulated in
    float64, without a float64 copy of the stack)."""
    images = np.asarray(images)
    return images.mean(axis=(1, 2), dtype=np.float64), images.std(axis=(1, 2), dtype=np.float64)


def has_levels(images: np.ndarray) -> bool:
    """Whether every image of ``images (M, ny, nx)`` sits on a level of one sign at least
    :data:`LEVEL_TO_SPREAD` of its own standard deviations from zero (raw counts, inverted or not)."""
    levels, spreads = image_levels(images)
    same_sign = bool(np.all(levels > 0) or np.all(levels < 0))
    return same_sign and bool(np.all(np.abs(levels) >= LEVEL_TO_SPREAD * np.maximum(spreads, 1e-30)))


def highpass(images: torch.Tensor, sigma_px: float) -> torch.Tensor:
    """``images (M, ny, nx)`` minus their Gaussian blur of ``sigma_px`` pixels (separable, edges mirrored):
    features much broader than ``sigma_px`` go, finer ones stay. ``sigma_px`` <= 0 returns the input."""
    if sigma_px <= 0:
        return images
    radius = int(min(3 * sigma_px, (min(images.shape[-2:]) - 1)))
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (taps / sigma_px) ** 2)
    kernel = (kernel / kernel.sum()).to(images.dtype)
    blurred = images[:, None]
    for dim in (2, 3):  # along y, then along x
        pad = [0, 0, radius, radius] if dim == 2 else [radius, radius, 0, 0]
        blurred = torch.nn.functional.pad(blurred, pad, mode="reflect")
        weights = kernel.view(1, 1, -1, 1) if dim == 2 else kernel.view(1, 1, 1, -1)
        blurred = torch.nn.functional.conv2d(blurred, weights)
    return images - blurred[:, 0]


def fit_contrast(images: np.ndarray, levels: str, highpass_px: float) -> tuple[np.ndarray, dict]:
    """The images the fit explains, float32 ``(M, ny, nx)``, and the report entry.

    ``levels``: ``"auto"`` (divide by the levels when :func:`has_levels`), ``"per_tilt"`` (always; the levels
    must be non-zero) or ``"none"``. The relative contrast ``(I - L) / |L|`` keeps the sign of the input (so
    ``--invert`` still decides whether density is bright). ``highpass_px``: Gaussian sigma of
    :func:`highpass`, pixels (0: none).
    """
    data = torch.tensor(np.asarray(images), dtype=torch.float32)
    on_level = has_levels(images)
    info: dict = {"levels": "none", "on_level": on_level, "highpass_sigma_px": float(highpass_px)}
    divide = levels == "per_tilt" or (levels == "auto" and on_level)
    if divide:
        means, spreads = image_levels(images)
        level = torch.as_tensor(means, dtype=torch.float32)[:, None, None]
        if not bool((level.abs().flatten() > 1e-3 * torch.as_tensor(spreads, dtype=torch.float32)).all()):
            raise IcetideError("intensity.levels: per_tilt needs images on a non-zero level (raw counts)")
        data = (data - level) / level.abs()
        info["levels"] = "per_tilt"
        info["image_levels"] = level.flatten().tolist()
    return highpass(data, highpass_px).numpy(), info


def output_polarity(polarity: str, inverted: bool) -> tuple[float, str]:
    """The sign by which to multiply a volume (or images) of the fitted images, and the MRC label stating the
    result's polarity (:func:`icetide.io.write_mrc`).

    ``polarity``: ``"bright"`` (dense = bright, positive) or ``"input"`` (as the input images); ``inverted``:
    whether the fitted images are the input's negative (``--invert``: the input showed density dark). Without
    ``inverted`` the two agree: the input is taken to show density bright.
    """
    if polarity not in POLARITIES:
        raise IcetideError(f"polarity must be bright or input, got {polarity!r}")
    if polarity == "input" and inverted:
        return -1.0, "icetide: density dark (negative = dense), as in the input images"
    if inverted:
        return 1.0, "icetide: density bright (positive = dense), the input images inverted"
    return 1.0, "icetide: density bright (positive = dense), as in the input images"
