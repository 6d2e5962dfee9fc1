"""A tilt series from its files: the MRC stack (or one MRC per tilt), its angles (IMOD ``.tlt`` or SerialEM
``.mdoc``), views left out."""

from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import numpy as np

from ..data import TiltSeries, replace_nonfinite
from ..errors import IcetideError
from .ctf_files import read_defocus, read_pre_exposure
from .imod import read_tlt
from .mdoc import read_mdoc
from .mrc import read_mrc, read_mrc_images

__all__ = ["load_series", "parse_exclude"]


def parse_exclude(text: Optional[str], n_tilts: int) -> np.ndarray:
    """``"0-2,40"`` -> the sorted 0-based stack indices to drop (single views and inclusive ranges, comma-separated),
    checked against ``n_tilts``. Not a number or range, a view given twice, a view outside the stack or fewer
    than 2 views left raise a one-line :class:`IcetideError`."""
    if not text:
        return np.zeros(0, dtype=int)
    indices: list[int] = []
    outside: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        first, dash, last = part.partition("-")
        try:
            start, stop = int(first), int(last if dash else first)
        except ValueError:
            raise IcetideError(f"--exclude: {part!r} is neither a view nor a range of views (0-based, e.g. 0-2,40)") from None
        if stop < start:
            raise IcetideError(f"--exclude: range {part!r} runs backwards")
        if stop >= n_tilts:  # checked before the range is expanded: a typo must not allocate millions of views
            outside.append(part)
            continue
        indices.extend(range(start, stop + 1))
    if outside:
        raise IcetideError(f"--exclude: view(s) {', '.join(outside)} outside 0..{n_tilts - 1}")
    twice = sorted(i for i, n in Counter(indices).items() if n > 1)
    if twice:
        raise IcetideError(f"--exclude: view(s) {', '.join(map(str, twice))} given more than once")
    if n_tilts - len(indices) < 2:
        raise IcetideError("--exclude leaves fewer than 2 views")
    return np.asarray(sorted(indices), dtype=int)


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
