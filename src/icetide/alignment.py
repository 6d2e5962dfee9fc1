"""Conversions between icetide's :class:`~icetide.deform.Deformations` and other tools' global alignments.

Pure math on arrays; file syntax lives in :mod:`icetide.io`. Only the global part of the model travels
(shift ``tau`` and in-plane rotation ``alpha``); local fields are neither exported nor imported.

icetide (docs/CONVENTIONS.md "Deformation model"): an observed pixel at centred coordinates ``x = (u, v)``
(``u = column - (nx-1)/2``, ``v = row - (ny-1)/2``) shows the ideal projection at ``x' = R(alpha) x - tau``,
so the aligned image is ``a(x') = y(R(-alpha)(x' + tau))``.

IMOD ``.xf`` (definition read from IMOD's ``libcfshr/cubinterp.c``, which ``newstack -xform`` calls with the
input centre ``nx/2, ny/2`` and the .xf's ``DX, DY`` as the output translation): with ``X`` running from 0 at
the left edge of the first pixel to ``nx`` at the right edge of the last one, the transform maps a raw
point to an aligned point by ``X' - nx/2 = A (X - nx/2) + D``. Pixel ``i``'s centre sits at ``X = i + 0.5``,
so ``X - nx/2 = i - (nx-1)/2 = u``: IMOD's centred coordinates are exactly ours, in both axes. IMOD's ``Y``
grows with the line index in the MRC file (``newstack`` reads line ``y`` as the ``y``-th line stored, first
line ``y = 0``), and so does our ``v`` (row of the ``mrcfile`` array); no axis is flipped. Hence
``A = R(alpha)`` and ``D = -tau``.

AreTomo ``.aln`` (definition read from AreTomo2's own IMOD export, ``ImodUtil/CSaveXF.cpp``, which writes
``A = R(-ROT)`` and ``D = A (-TX, -TY)`` for each row): the raw image maps to the aligned one by
``x' = R(-ROT)(x - T)``, i.e. ``alpha = -ROT`` and ``tau = R(alpha) T``. ``ROT`` is the tilt-axis angle,
counter-clockwise from the image Y axis; ``TX, TY`` are pixels of the raw stack (``RawSize``).

RELION-5 (definition read from RELION's ``TomoBackprojectProgram::getProjectMatrices``,
``src/jaz/tomography/programs/tomo_backproject.cpp``): a tomogram voxel index ``X`` (``w x h x d``) projects to
the tilt-image pixel index ``p = S(c_img) S(s) Rz(ZRot) Ry(YTilt) Rx(XTilt) S(-c_vol) X`` with
``c_vol = (int(w/2), int(h/2), int(d/2))``, ``c_img = (int(nx/2), int(ny/2))``, ``s`` = the shifts in
Angstrom divided by the tilt-series pixel size, and right-handed rotations in degrees (gravis
``rotation(axis, angle)``), so ``Ry(t)`` gives ``u = x cos t + z sin t`` as in docs/CONVENTIONS.md. With ``XTilt = 0``
and RELION's ``c_vol`` taken as icetide's specimen origin, this equals icetide's
``p = (n-1)/2 + R(-alpha)(P_theta X + tau)`` when ``YTilt = theta``, ``ZRot = -alpha`` and
``s = R(-alpha) tau - delta`` with
``delta = int(n/2) - (n-1)/2`` per axis (0.5 px for even sizes). RELION's specimen centre is voxel
``int(N/2)``, ours ``(N-1)/2``: a RELION tomogram of even size sits half a voxel from ours (a gauge
translation, harmless for averaging).
"""

from __future__ import annotations

import warnings
from typing import Protocol

import numpy as np

from .deform import Deformations
from .errors import IcetideError

__all__ = [
    "deformations_for_stack",
    "deformations_to_xf",
    "xf_to_deformations",
    "aln_to_deformations",
    "deformations_to_relion",
    "relion_to_deformations",
]



class AlnRows(Protocol):
    """What :func:`aln_to_deformations` reads of an AreTomo ``.aln`` (:class:`icetide.io.aretomo.AlnFile`): per-row
    arrays ``(R,)`` in file order, the raw stack's ``(nx, ny, nz)`` or None, the ``AlphaOffset`` (deg) and the
    removed dark frames ``(frame, section, tilt_deg)``."""

    tilt_deg: np.ndarray
    rot_deg: np.ndarray
    gmag: np.ndarray
    tx_px: np.ndarray
    ty_px: np.ndarray
    raw_size: tuple[int, int, int] | None
    alpha_offset_deg: float
    dark_frames: list[tuple[int, int, float]]


# IMOD prints A to 7 decimals, AreTomo to 3: a rotation read back from a file deviates by up to ~1e-3.
ROTATION_TOLERANCE = 2e-3


def _rot(alpha_rad: np.ndarray) -> np.ndarray:
    """``R(alpha)`` for every angle, shape ``alpha.shape + (2, 2)`` (float64)."""
    c, s = np.cos(alpha_rad), np.sin(alpha_rad)
    return np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)


def _global_deformations(
    tilt_angles_deg, shifts_px, angles_deg, detector_shape, grid, local_interpolation
) -> Deformations:
    d = Deformations.identity(tilt_angles_deg, detector_shape, grid, local_interpolation)
    d.shifts_px = np.asarray(shifts_px, dtype=np.float64).reshape(d.n_tilts, 2)
    d.angles_deg = np.asarray(angles_deg, dtype=np.float64).reshape(d.n_tilts)
    return d


def deformations_to_xf(d: Deformations) -> np.ndarray:
    """IMOD transforms ``(M, 2, 3)`` = ``[[A11, A12, DX], [A21, A22, DY]]`` with ``A = R(alpha)``, ``D = -tau``.

    Applying them with ``newstack -xform`` gives the aligned series icetide's model defines (the local
    field, if any, is not representable in a .xf and is left out).
    """
    xf = np.zeros((d.n_tilts, 2, 3))
    xf[:, :, :2] = _rot(np.deg2rad(d.angles_deg))
    xf[:, :, 2] = -d.shifts_px
    return xf


def deformations_for_stack(d: Deformations, kept, stack_tilt_angles_deg) -> Deformations:
    """``d`` (global part) for every view of the stack it was fitted on, e.g. for a ``.xf`` with one line per view.

    ``kept`` ``(M,)``: the 0-based stack index of each of ``d``'s tilts; ``stack_tilt_angles_deg`` ``(N,)``: the
    tilt angle of every view of the stack (the result's angles). A view left out of the fit gets the shift and
    rotation interpolated linearly in tilt angle between its nearest fitted neighbours (beyond the fitted
    range, those of the nearest fitted tilt): what its image most likely needs, should another program use
    it. Local fields are zero everywhere (a ``.xf`` carries none).
    """
    angles = np.asarray(stack_tilt_angles_deg, dtype=np.float64).reshape(-1)
    kept = np.asarray(kept, dtype=int).reshape(-1)
    if kept.size != d.n_tilts:
        raise IcetideError(f"{kept.size} stack indices for {d.n_tilts} tilts")
    order = np.argsort(d.tilt_angles_deg)
    at = d.tilt_angles_deg[order]
    # Unwrapped, so that rotations either side of +-180 degrees interpolate across it, not through 0.
    rotation = np.unwrap(d.angles_deg[order], period=360.0)
    out = Deformations.identity(angles, d.detector_shape, d.local_px.shape[2:4], d.local_interpolation)
    out.shifts_px = np.stack([np.interp(angles, at, d.shifts_px[order, i]) for i in range(2)], -1)
    out.angles_deg = np.interp(angles, at, rotation)
    out.shifts_px[kept], out.angles_deg[kept] = d.shifts_px, d.angles_deg
    return out


def _nearest_rotation(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest rotations (polar decomposition) of ``(M, 2, 2)`` matrices and their singular values ``(M, 2)``."""
    u, sv, vt = np.linalg.svd(a)
    return u @ vt, sv


def xf_to_deformations(
    xf,
    tilt_angles_deg,
    detector_shape: tuple[int, int],
    grid: tuple[int, int] = (2, 2),
    *,
    non_rotation: str = "error",
    local_interpolation: str = "bicubic",
) -> Deformations:
    """Global deformations from IMOD transforms ``(M, 2, 3)`` (inverse of :func:`deformations_to_xf`).

    A pure rotation (within :data:`ROTATION_TOLERANCE`, the printing precision of IMOD and AreTomo)
    becomes ``alpha``; ``tau = -D``. A transform with magnification, stretch or skew beyond that raises
    :class:`IcetideError` when ``non_rotation="error"`` (default), or with ``non_rotation="nearest"`` is
    replaced by its nearest rotation (polar decomposition, the shift kept) with a warning giving the
    largest scale deviation. A mirror (negative determinant) always raises. The local field is zero on a
    ``grid`` of control points.
    """
    if non_rotation not in ("error", "nearest"):
        raise ValueError(f"non_rotation must be 'error' or 'nearest', got {non_rotation!r}")
    xf = np.asarray(xf, dtype=np.float64)
    angles = np.asarray(tilt_angles_deg, dtype=np.float64).reshape(-1)
    if xf.ndim != 3 or xf.shape[1:] != (2, 3):
        raise IcetideError(f"transforms must have shape (M, 2, 3), got {xf.shape}")
    if xf.shape[0] != angles.shape[0]:
        raise IcetideError(f"{xf.shape[0]} transforms for {angles.shape[0]} tilt angles")
    a = xf[:, :, :2]
    det = np.linalg.det(a)
    if np.any(det <= 0):
        raise IcetideError(f"transform(s) {_index_list(det <= 0)} mirror or collapse the image (det <= 0)")
    rot, sv = _nearest_rotation(a)
    deviation = np.abs(sv - 1).max(axis=1)
    bad = deviation > ROTATION_TOLERANCE
    if bad.any():
        worst = float(deviation.max())
        if non_rotation == "error":
            raise IcetideError(
                f"transform(s) {_index_list(bad)} are not rotations (scale off by up to {worst:.4g}); "
                "icetide models rotation and shift only"
            )
        warnings.warn(
            f"transform(s) {_index_list(bad)} scale by up to {worst:.4g} besides rotating; "
            "using the nearest rotation and keeping the shifts",
            stacklevel=2,
        )
    alpha_deg = np.rad2deg(np.arctan2(rot[:, 1, 0], rot[:, 0, 0]))
    return _global_deformations(angles, -xf[:, :, 2], alpha_deg, detector_shape, grid, local_interpolation)


def _index_list(mask: np.ndarray, limit: int = 8) -> str:
    idx = np.flatnonzero(mask)
    text = ", ".join(map(str, idx[:limit]))
    return text + (f" (+{idx.size - limit} more)" if idx.size > limit else "")


def _raw_to_detector_scale(raw_size, detector_shape: tuple[int, int]) -> float:
    """Pixel-size ratio from AreTomo's ``RawSize (nx, ny, nz)`` to the detector ``(ny, nx)`` (binning)."""
    if raw_size is None:
        return 1.0
    ny, nx = detector_shape
    sx, sy = nx / raw_size[0], ny / raw_size[1]
    if abs(sx - sy) > 0.01 * max(sx, sy):
        raise IcetideError(
            f"detector {nx} x {ny} is not a uniform binning of the .aln RawSize {raw_size[0]} x {raw_size[1]}"
        )
    return sx


def aln_to_deformations(
    aln: AlnRows,
    tilt_angles_deg,
    detector_shape: tuple[int, int],
    grid: tuple[int, int] = (2, 2),
    *,
    max_angle_difference_deg: float = 0.5,
    local_interpolation: str = "bicubic",
) -> Deformations:
    """Global deformations of a tilt series from AreTomo's alignment, rows matched by tilt angle.

    Each of ``tilt_angles_deg`` (the stack's nominal angles, stack order) takes the ``.aln`` row whose nominal
    tilt ``TILT - AlphaOffset`` is nearest, within ``max_angle_difference_deg``; otherwise
    :class:`IcetideError` names the unmatched angles. ``alpha = -ROT``, ``tau = R(alpha) (TX, TY)`` (see the
    module docstring), the shifts scaled from ``RawSize`` pixels to ``detector_shape`` pixels when the images
    are binned. A constant tilt offset only turns the volume about Y, so the nominal angles are kept and the
    offset is recorded in ``extra["aretomo_alpha_offset_deg"]``. Local patch shifts are not imported.
    """
    angles = np.asarray(tilt_angles_deg, dtype=np.float64).reshape(-1)
    if np.any(np.abs(aln.gmag - 1) > 1e-3):
        raise IcetideError("the .aln has magnification changes (GMAG != 1); icetide models rotation and shift only")
    diff = np.abs(angles[:, None] - (aln.tilt_deg - aln.alpha_offset_deg)[None, :])
    rows = diff.argmin(axis=1)
    unmatched = diff[np.arange(angles.size), rows] > max_angle_difference_deg
    if unmatched.any():
        missing = ", ".join(f"{a:g}" for a in angles[unmatched])
        dark = [t for _, _, t in aln.dark_frames if np.any(np.abs(angles[unmatched] - t) <= max_angle_difference_deg)]
        hint = f" (AreTomo dropped dark frames at {', '.join(f'{t:g}' for t in dark)})" if dark else ""
        raise IcetideError(f"no .aln row within {max_angle_difference_deg:g} deg of tilt angle(s) {missing}{hint}")
    if np.unique(rows).size != rows.size:
        raise IcetideError("two tilt angles match the same .aln row; tilt angles are too close together")
    alpha_rad = -np.deg2rad(aln.rot_deg[rows])
    shifts_raw = np.stack([aln.tx_px[rows], aln.ty_px[rows]], -1)
    tau = np.einsum("mij,mj->mi", _rot(alpha_rad), shifts_raw)
    tau *= _raw_to_detector_scale(aln.raw_size, detector_shape)
    d = _global_deformations(angles, tau, np.rad2deg(alpha_rad), detector_shape, grid, local_interpolation)
    d.extra["aretomo_alpha_offset_deg"] = float(aln.alpha_offset_deg)
    return d


def _relion_centre_offset(detector_shape: tuple[int, int]) -> np.ndarray:
    """``delta = int(n/2) - (n-1)/2`` for ``(nx, ny)``: RELION's image centre minus icetide's, pixels."""
    ny, nx = detector_shape
    return np.array([nx // 2 - (nx - 1) / 2, ny // 2 - (ny - 1) / 2])


def deformations_to_relion(d: Deformations, pixel_size_A: float) -> dict[str, np.ndarray]:
    """RELION-5 per-tilt alignment columns of ``d`` (global part), each an array of length M.

    Keys: ``rlnTomoXTilt`` (0), ``rlnTomoYTilt`` (theta), ``rlnTomoZRot`` (``-alpha``, degrees; the tilt-axis
    angle is part of alpha), ``rlnTomoXShiftAngst`` / ``rlnTomoYShiftAngst`` (``R(-alpha) tau - delta`` times
    ``pixel_size_A``; see the module docstring for ``delta``).
    """
    if not pixel_size_A > 0:
        raise IcetideError(f"pixel size must be positive, got {pixel_size_A}")
    alpha = np.deg2rad(d.angles_deg)
    s = np.einsum("mij,mj->mi", _rot(-alpha), d.shifts_px) - _relion_centre_offset(d.detector_shape)
    return {
        "rlnTomoXTilt": np.zeros(d.n_tilts),
        "rlnTomoYTilt": d.tilt_angles_deg.copy(),
        "rlnTomoZRot": -d.angles_deg,
        "rlnTomoXShiftAngst": s[:, 0] * pixel_size_A,
        "rlnTomoYShiftAngst": s[:, 1] * pixel_size_A,
    }


def relion_to_deformations(
    columns: dict,
    pixel_size_A: float,
    detector_shape: tuple[int, int],
    grid: tuple[int, int] = (2, 2),
    *,
    local_interpolation: str = "bicubic",
) -> Deformations:
    """Inverse of :func:`deformations_to_relion`: ``theta = YTilt``, ``alpha = -ZRot``, ``tau = R(alpha)(s + delta)``.

    ``columns`` maps the five RELION-5 labels to length-M arrays. icetide has no X tilt: any
    ``|rlnTomoXTilt| > 1e-3`` degrees raises :class:`IcetideError`.
    """
    if not pixel_size_A > 0:
        raise IcetideError(f"pixel size must be positive, got {pixel_size_A}")
    xtilt = np.asarray(columns["rlnTomoXTilt"], dtype=np.float64)
    if np.any(np.abs(xtilt) > 1e-3):
        raise IcetideError(
            f"rlnTomoXTilt is up to {np.abs(xtilt).max():.4g} deg; icetide's geometry has no X tilt"
        )
    alpha_deg = -np.asarray(columns["rlnTomoZRot"], dtype=np.float64)
    s = np.stack(
        [np.asarray(columns["rlnTomoXShiftAngst"], float), np.asarray(columns["rlnTomoYShiftAngst"], float)], -1
    ) / pixel_size_A
    tau = np.einsum("mij,mj->mi", _rot(np.deg2rad(alpha_deg)), s + _relion_centre_offset(detector_shape))
    return _global_deformations(
        columns["rlnTomoYTilt"], tau, alpha_deg, detector_shape, grid, local_interpolation
    )
