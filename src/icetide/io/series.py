"""A tilt series from its files: the MRC stack (or one MRC per tilt), its angles (IMOD ``.tlt`` or SerialEM
``.mdoc``), views left out."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import numpy as np

from ..data import TiltSeries, replace_nonfinite
from ..errors import IcetideError
from .ctf_files import read_defocus, read_pre_exposure
from .imod import parse_exclude, read_tlt
from .mdoc import read_mdoc
from .mrc import read_mrc, read_mrc_images

__all__ = ["load_series", "read_series"]


def _read_images(source: Path | Sequence[Path]) -> tuple[np.ndarray, float | None]:
    """The images of a stack file, or of one file per tilt stacked in order, and the header's pixel size (A)."""
    return read_mrc(source) if isinstance(source, (str, os.PathLike)) else read_mrc_images(source)


def load_series(
    stack: Path | Sequence[Path],
    angles: Optional[Path | np.ndarray],
    mdoc: Optional[Path],
    pixel_size_A: Optional[float],
    tilt_axis_angle_deg: Optional[float],
    exclude: Optional[str],
    invert: bool,
    fix_nonfinite: bool = False,
    defocus: Optional[Path | np.ndarray] = None,
    pre_exposure: Optional[Path | np.ndarray] = None,
    half_series: Optional[Path | Sequence[Path]] = None,
) -> tuple[TiltSeries, np.ndarray, np.ndarray]:
    """The tilt series to fit, the stack indices it keeps and the tilt angles of every view of the stack.

    ``stack``: an MRC stack, or one 2-D MRC per view in stack order (a RELION-5 project's micrographs).
    Angles from ``angles`` (a .tlt, or the angles themselves in stack order) or else ``mdoc`` (SerialEM), which
    also gives the pixel size and the tilt-axis angle when they are not given otherwise. Excluded views are
    dropped before validation, so a blank view can be excluded; ``invert`` flips the contrast (dark density on a
    light background, as in raw cryo-EM images);
    ``fix_nonfinite`` replaces NaN/Inf pixels by their image's median (with a ``UserWarning``) instead of refusing them.
    ``defocus`` (CTFFIND4, IMOD .defocus, RELION STAR or .mdoc) and ``pre_exposure`` (.mdoc, RELION STAR or one
    number per line) describe every view of the stack, like the angles (:mod:`icetide.io.ctf_files`); or they are
    the values themselves, ``(N, 3)`` rows ``(defocus_u_A, defocus_v_A, astigmatism_angle_deg)`` and ``(N,)`` e/A^2.
    ``half_series``: the second of two half series (e.g. the even frame sums; ``stack`` the odd ones), the same
    views in the same order, given and treated alike.
    """
    if (angles is None) == (mdoc is None):
        raise IcetideError("give the tilt angles with exactly one of --angles (.tlt) or --mdoc (SerialEM)")
    images, header_px = _read_images(stack)
    if angles is not None:
        tilt_angles = read_tlt(angles) if isinstance(angles, (str, Path)) else angles
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
        table = read_defocus(defocus, n_tilts).rows() if isinstance(defocus, (str, Path)) else np.asarray(defocus)
        defocus_A = table[keep]
    if pre_exposure is not None:
        values = read_pre_exposure(pre_exposure, n_tilts) if isinstance(pre_exposure, (str, Path)) else pre_exposure
        dose = np.asarray(values)[keep]
    second = None
    if half_series is not None:
        second = _read_images(half_series)[0]
        if second.shape != images.shape:
            where = half_series if isinstance(half_series, (str, os.PathLike)) else "the second half series"
            raise IcetideError(f"{where}: shape {second.shape}, the tilt series has {images.shape}")
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


def read_series(
    stack_path: str | os.PathLike,
    angles_path: str | os.PathLike,
    pixel_size_A: float | None = None,
    tilt_axis_angle_deg: float = 0.0,
) -> TiltSeries:
    """A tilt series from an MRC stack and an IMOD angle file, as they are (no view left out, no inversion);
    ``pixel_size_A`` overrides the header's value. :func:`load_series` reads everything the CLI accepts."""
    images, header_px = read_mrc(stack_path)
    return TiltSeries(images, read_tlt(angles_path), pixel_size_A if pixel_size_A is not None else header_px,
                      tilt_axis_angle_deg)
