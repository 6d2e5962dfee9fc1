"""A tilt series from its files: the MRC stack, its angles (IMOD ``.tlt`` or SerialEM ``.mdoc``), views left out."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import numpy as np

from ..data import TiltSeries, replace_nonfinite
from ..errors import IcetideError
from .ctf_files import read_defocus, read_pre_exposure
from .imod import read_tlt
from .mdoc import read_mdoc
from .mrc import read_mrc

__all__ = ["load_series", "parse_exclude"]


def parse_exclude(text: Optional[str], n_tilts: int) -> np.ndarray:
    """``"0,1,76"`` -> the sorted, distinct 0-based stack indices to drop; checked against ``n_tilts``."""
    if not text:
        return np.zeros(0, dtype=int)
    try:
        indices = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise IcetideError(f"--exclude must be comma-separated view indices (0-based), got {text!r}") from None
    bad = [i for i in indices if not 0 <= i < n_tilts]
    if bad:
        raise IcetideError(f"--exclude: view(s) {', '.join(map(str, bad))} outside 0..{n_tilts - 1}")
    if n_tilts - len(indices) < 2:
        raise IcetideError("--exclude leaves fewer than 2 views")
    return np.asarray(indices, dtype=int)


def load_series(
    stack: Path,
    angles: Optional[Path],
    mdoc: Optional[Path],
    pixel_size_A: Optional[float],
    tilt_axis_angle_deg: Optional[float],
    exclude: Optional[str],
    invert: bool,
    fix_nonfinite: bool = False,
    defocus: Optional[Path] = None,
    pre_exposure: Optional[Path] = None,
    half_series: Optional[Path] = None,
) -> tuple[TiltSeries, np.ndarray, np.ndarray]:
    """The tilt series to fit, the stack indices it keeps and the tilt angles of every view of the stack.

    Angles from ``angles`` (.tlt) or else ``mdoc`` (SerialEM), which also gives the pixel size and the tilt-axis
    angle when they are not given otherwise. Excluded views are dropped before validation, so a blank view can
    be excluded; ``invert`` flips the contrast (dark density on a light background, as in raw cryo-EM images);
    ``fix_nonfinite`` replaces NaN/Inf pixels by their image's median (with a ``UserWarning``) instead of refusing them.
    ``defocus`` (CTFFIND4, IMOD .defocus, RELION STAR or .mdoc) and ``pre_exposure`` (.mdoc, RELION STAR or one
    number per line) describe every view of the stack, like the angles (:mod:`icetide.io.ctf_files`).
    ``half_series``: the second of two half series (e.g. the even frame sums; ``stack`` the odd ones), the same
    views in the same order, treated alike.
    """
    if (angles is None) == (mdoc is None):
        raise IcetideError("give the tilt angles with exactly one of --angles (.tlt) or --mdoc (SerialEM)")
    images, header_px = read_mrc(stack)
    if angles is not None:
        tilt_angles = read_tlt(angles)
    else:
        meta = read_mdoc(mdoc)
        tilt_angles = meta["tilt_angles_deg"]
        header_px = meta["pixel_size_A"] or header_px
        if tilt_axis_angle_deg is None and meta["tilt_axis_angle_deg"] is not None:
            tilt_axis_angle_deg = meta["tilt_axis_angle_deg"]
    all_angles = np.asarray(tilt_angles, dtype=np.float64).reshape(-1)
    if images.ndim == 3 and len(all_angles) != images.shape[0]:
        raise IcetideError(f"{len(all_angles)} tilt angles for {images.shape[0]} images")
    n_tilts = images.shape[0] if images.ndim == 3 else 1
    keep = np.setdiff1d(np.arange(n_tilts), parse_exclude(exclude, n_tilts))
    defocus_A = dose = None
    if defocus is not None:
        defocus_A = read_defocus(defocus, n_tilts).rows()[keep]
    if pre_exposure is not None:
        dose = read_pre_exposure(pre_exposure, n_tilts)[keep]
    second = None
    if half_series is not None:
        second = read_mrc(half_series)[0]
        if second.shape != images.shape:
            raise IcetideError(f"{half_series}: shape {second.shape}, the tilt series has {images.shape}")
    if images.ndim == 3:
        images, tilt_angles = images[keep], all_angles[keep]
        second = None if second is None else second[keep]
    if invert:
        images = -images
        second = None if second is None else -second
    if fix_nonfinite and images.ndim == 3:
        images, n_bad = replace_nonfinite(images)
        if second is not None:
            second, n_second = replace_nonfinite(second)
            n_bad += n_second
        if n_bad:
            warnings.warn(f"replaced {n_bad} NaN/Inf pixel(s) by their image's median", stacklevel=2)
    series = TiltSeries(images, tilt_angles, pixel_size_A if pixel_size_A is not None else header_px,
                        tilt_axis_angle_deg or 0.0, defocus_A, dose, second)
    return series, keep, all_angles
