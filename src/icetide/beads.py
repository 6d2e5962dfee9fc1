"""Gold beads as fiducials on an aligned tilt series: find them in its FBP, follow each through the views, and
solve the per-view shifts and the common in-plane rotation (the tilt axis' direction) that make them consistent
with fixed 3-D positions (part of what IMOD's ``tiltalign`` solves). The mean distance between where a bead is
seen and where its fitted 3-D position projects (the *bead residual*) measures an alignment without ground
truth; the solution refines it.

Positions follow docs/CONVENTIONS.md: a bead at ``(x, y, z)`` voxels (the volume's centre at 0) projects at
``(u, v) = (x cos(theta) + z sin(theta), y)`` on the aligned image, whose centre is ``(0, 0)``; ``u`` runs along
columns, ``v`` along rows. Everything is in pixels of the images given.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from .deform import remove_gauge
from .classical import fbp, standardised

__all__ = ["bead_separation_px", "detect_beads", "locate_beads", "project_beads", "rotated", "solve_bead_rotation",
           "solve_bead_shifts", "track_beads", "turn_standard_error", "window_inside"]

# A bead is a local maximum of the standardised FBP at least this many standard deviations above its median.
BEAD_MIN_Z = 6.0
# Gold beads stand out alike; a maximum weaker than this fraction of the third strongest (the beads' level,
# robust to one or two brighter outliers) is a dense feature of the specimen or where two beads' streaks cross.
BEAD_RELATIVE_Z = 0.6
# At most this many of the strongest maxima are followed (enough to average over; the rest add time).
MAX_BEADS = 40
# Maxima closer than this (pixels, at the images' sampling) count as one bead, or closer than the bead's diameter
# less 2 pixels where that is more: the FBP of a bead many pixels wide peaks at points of its rim, about a pixel
# inside it.
BEAD_SEPARATION_PX = 3
# A bead is looked for within this many pixels of its predicted position in each view: first about its position
# in the FBP, then (FINE_WINDOW_PX) about the solved model's prediction, which keeps its neighbours out.
WINDOW_PX = 6
FINE_WINDOW_PX = 3
# A bead kept as a fiducial is found in at least this fraction of the views where it lies inside the image (a
# bead near a side of the field leaves it at high tilt, as IMOD's fiducial models allow), and lies inside the
# image in at least MIN_INSIDE_FRACTION of all views (enough tilts to place it in depth).
MIN_VIEW_FRACTION = 0.7
MIN_INSIDE_FRACTION = 0.5
# Measurements further than this multiple of the median residual (and than OUTLIER_FLOOR_PX) from their
# predicted position are dropped (a neighbouring bead or a dense feature was caught).
OUTLIER_FACTOR = 3.0
OUTLIER_FLOOR_PX = 1.5
# The common in-plane rotation of the views is searched within +-ROTATION_SEARCH_DEG in steps of ROTATION_STEP_DEG.
ROTATION_SEARCH_DEG = 2.0
ROTATION_STEP_DEG = 0.25
# Rounds of locating the beads about the last solution's predictions and solving again.
PASSES = 3


def bead_separation_px(diameter_px: float | None) -> int:
    """How close (pixels) two maxima of the FBP may lie and still be one bead of ``diameter_px`` pixels (None:
    unknown): :data:`BEAD_SEPARATION_PX`, or the diameter less 2 pixels where more."""
    if diameter_px is None:
        return BEAD_SEPARATION_PX
    return max(BEAD_SEPARATION_PX, math.ceil(diameter_px - 2))


def detect_beads(volume: np.ndarray, max_beads: int = MAX_BEADS, min_z: float = BEAD_MIN_Z,
                 margin: float = 0.06, separation_px: int = BEAD_SEPARATION_PX) -> np.ndarray:
    """Bead candidates in a tomogram ``volume (nz, ny, nx)`` (dense = bright): ``(J, 3)`` positions ``(x, y, z)``
    in voxels from the centre, strongest first. Local maxima over ``2 separation_px + 1`` voxels, at least
    ``min_z`` standard deviations above the median of the volume without a ``margin`` of each lateral side, and
    at least :data:`BEAD_RELATIVE_Z` times the third strongest."""
    from scipy import ndimage

    nz, ny, nx = volume.shape
    r, c = int(margin * ny), int(margin * nx)
    core = volume[:, r : ny - r, c : nx - c]
    z = (core - np.median(core)) / max(float(core.std()), 1e-30)
    peaks = np.argwhere((z == ndimage.maximum_filter(z, size=2 * separation_px + 1)) & (z >= min_z))
    strength = z[tuple(peaks.T)]
    order = np.argsort(-strength, kind="stable")
    if order.size:
        order = order[strength[order] >= BEAD_RELATIVE_Z * strength[order[min(2, order.size - 1)]]]
    k, j, i = peaks[order[:max_beads]].T
    return np.stack([i + c - (nx - 1) / 2, j + r - (ny - 1) / 2, k - (nz - 1) / 2], 1).astype(np.float64)


def project_beads(positions: np.ndarray, tilt_angles_deg) -> np.ndarray:
    """Where beads at ``positions (J, 3)`` project on the aligned images: ``(M, J, 2)`` as ``(u, v)`` pixels."""
    t = np.deg2rad(np.asarray(tilt_angles_deg, dtype=np.float64))[:, None]
    x, y, z = positions.T
    return np.stack([x * np.cos(t) + z * np.sin(t), np.broadcast_to(y, (t.shape[0], y.size))], -1)


def locate_beads(images: np.ndarray, predicted: np.ndarray, window: int = WINDOW_PX) -> np.ndarray:
    """Where each bead is seen: ``(M, J, 2)`` ``(u, v)`` pixels, NaN where not found, from ``images (M, ny, nx)``
    (dense = bright) and ``predicted (M, J, 2)``. The brightest pixel of the image, smoothed by a Gaussian of
    1 pixel, within ``window`` pixels of the prediction, refined to a fraction of a pixel by a parabola through it
    and its neighbours; not found when that pixel lies on the window's border or the window leaves the image."""
    from scipy import ndimage

    ny, nx = images.shape[1:]
    found = np.full(predicted.shape, np.nan)
    pad = window + 3
    cols, rows = _pixel_of(predicted, (ny, nx))
    for m, j in zip(*np.nonzero(window_inside(predicted, (ny, nx), window))):
        col, row = int(cols[m, j]), int(rows[m, j])
        patch = ndimage.gaussian_filter(images[m, row - pad : row + pad + 1, col - pad : col + pad + 1], 1.0)
        inner = patch[3:-3, 3:-3]
        a, b = np.unravel_index(int(np.argmax(inner)), inner.shape)
        if a in (0, inner.shape[0] - 1) or b in (0, inner.shape[1] - 1):
            continue
        da = _vertex(inner[a - 1, b], inner[a, b], inner[a + 1, b])
        db = _vertex(inner[a, b - 1], inner[a, b], inner[a, b + 1])
        found[m, j] = col - window + b + db - (nx - 1) / 2, row - window + a + da - (ny - 1) / 2
    return found


def window_inside(predicted: np.ndarray, shape: tuple[int, int], window: int = WINDOW_PX) -> np.ndarray:
    """Whether :func:`locate_beads` can look for each bead: ``(M, J)`` True where the window about its
    predicted position ``predicted (M, J, 2)`` (``(u, v)`` pixels from the centre), with the smoothing's margin,
    lies inside images of ``shape (ny, nx)``."""
    ny, nx = shape
    pad = window + 3
    col, row = _pixel_of(predicted, shape)
    return (pad <= row) & (row < ny - pad) & (pad <= col) & (col < nx - pad)


def _pixel_of(predicted: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Column and row indices ``(M, J)`` of the pixels nearest to ``predicted (M, J, 2)`` (``(u, v)`` pixels
    from the centre of images of ``shape (ny, nx)``)."""
    ny, nx = shape
    return np.rint(predicted[..., 0] + (nx - 1) / 2), np.rint(predicted[..., 1] + (ny - 1) / 2)


def _vertex(low: float, mid: float, high: float) -> float:
    """Offset (within +-0.5) of the vertex of the parabola through three equally spaced values peaking at ``mid``."""
    curvature = low - 2 * mid + high
    return 0.0 if curvature >= 0 else float(np.clip(0.5 * (low - high) / curvature, -0.5, 0.5))


def _designs(seen: np.ndarray, tilt_angles_deg) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The linear model of the beads seen at ``seen (M, J, 2)`` (NaN: not seen): for each measurement (view
    ``views[k]``, bead ``beads[k]``) a row of ``across`` (columns ``x_j, z_j`` interleaved, then the shifts' first
    components: ``u = x cos(theta) + z sin(theta) + s_u``) and of ``along`` (``y_j``, then the shifts' second
    components: ``v = y + s_v``)."""
    t = np.deg2rad(np.asarray(tilt_angles_deg, dtype=np.float64))
    m_count, j_count = seen.shape[:2]
    views, beads = np.nonzero(np.isfinite(seen[..., 0]))
    rows = np.arange(views.size)
    across = np.zeros((views.size, 2 * j_count + m_count))
    across[rows, 2 * beads], across[rows, 2 * beads + 1] = np.cos(t[views]), np.sin(t[views])
    across[rows, 2 * j_count + views] = 1.0
    along = np.zeros((views.size, j_count + m_count))
    along[rows, beads], along[rows, j_count + views] = 1.0, 1.0
    return across, along, views, beads


def _too_far(distance: np.ndarray, floor_px: float) -> np.ndarray:
    """Which ``distance`` values (NaN: none) exceed :data:`OUTLIER_FACTOR` times their median and ``floor_px``."""
    return distance > max(OUTLIER_FACTOR * float(np.nanmedian(distance)), floor_px)


def _solve(seen: np.ndarray, tilt_angles_deg) -> tuple[np.ndarray, np.ndarray]:
    """Bead positions ``(J, 3)`` and per-view shifts ``(M, 2)`` that best explain ``seen (M, J, 2)`` (NaN: not
    seen) by ``seen[m, j] = project(position_j)[m] + shift_m``, jointly by least squares (the model is linear:
    ``u`` in ``x_j, z_j`` and the shifts' first components, ``v`` in ``y_j`` and their second); the common 3-D
    translation, which the data cannot tell from the shifts, is moved into the positions."""
    j_count = seen.shape[1]
    across, along, views, beads = _designs(seen, tilt_angles_deg)
    # lstsq's minimum-norm answer picks one member of the gauge family; remove_gauge below fixes the convention
    xz = np.linalg.lstsq(across, seen[views, beads, 0], rcond=None)[0]
    y = np.linalg.lstsq(along, seen[views, beads, 1], rcond=None)[0]
    shifts, translation = remove_gauge(np.stack([xz[2 * j_count :], y[j_count:]], 1),
                                       np.asarray(tilt_angles_deg, dtype=np.float64))
    positions = np.stack([xz[0 : 2 * j_count : 2], y[:j_count], xz[1 : 2 * j_count : 2]], 1) + translation
    return positions, shifts


def solve_bead_shifts(seen: np.ndarray, tilt_angles_deg) -> dict:
    """Per-view shifts that make beads seen at ``seen (M, J, 2)`` (pixels on aligned images, NaN: not seen)
    consistent with fixed 3-D positions (:func:`_solve`), solved twice: measurements further than
    :data:`OUTLIER_FACTOR` times the median residual (and :data:`OUTLIER_FLOOR_PX`) from the first solution's
    prediction are left out of the second, and so are beads whose median residual is that far above the others'
    (half the floor).

    Returns ``shifts_px (M, 2)``: where each view's beads lie relative to the fitted model, so adding them to an
    alignment's shifts (``tau_m`` of docs/CONVENTIONS.md) moves its aligned image onto the model (the common 3-D
    translation removed); ``residual_start_px`` and ``residual_px``: the mean bead residual (pixels) of the
    positions alone (no shifts, the alignment as it is) and with ``shifts_px``; ``positions (J, 3)``;
    ``measurements``: how many the second solution used."""
    seen = seen.copy()
    positions, shifts = _solve(seen, tilt_angles_deg)
    distance = np.linalg.norm(seen - project_beads(positions, tilt_angles_deg) - shifts[:, None], axis=-1)
    seen[_too_far(distance, OUTLIER_FLOOR_PX)] = np.nan
    # Where the streaks of two beads cross, the FBP has a maximum that follows neither: off as a whole.
    with warnings.catch_warnings():  # a bead left with no measurement has no median: NaN, never dropped twice
        warnings.simplefilter("ignore", RuntimeWarning)
        per_bead = np.nanmedian(distance, axis=0)
    seen[:, _too_far(per_bead, OUTLIER_FLOOR_PX / 2)] = np.nan
    positions, shifts = _solve(seen, tilt_angles_deg)
    distance = np.linalg.norm(seen - project_beads(positions, tilt_angles_deg) - shifts[:, None], axis=-1)
    used = np.isfinite(distance).any(axis=0)
    return {"shifts_px": shifts, "residual_start_px": _residual_without_shifts(seen, tilt_angles_deg),
            "residual_px": float(np.nanmean(distance)), "positions": positions[used],
            "measurements": int(np.isfinite(distance).sum()), "beads": int(used.sum())}


def rotated(points: np.ndarray, angle_deg: float) -> np.ndarray:
    """``points (..., 2)`` as ``(u, v)`` turned counter-clockwise by ``angle_deg`` about ``(0, 0)``
    (``R(a)`` of docs/CONVENTIONS.md)."""
    a = np.deg2rad(angle_deg)
    u, v = points[..., 0], points[..., 1]
    return np.stack([np.cos(a) * u - np.sin(a) * v, np.sin(a) * u + np.cos(a) * v], -1)


def solve_bead_rotation(seen: np.ndarray, tilt_angles_deg, search_deg: float = ROTATION_SEARCH_DEG,
                        step_deg: float = ROTATION_STEP_DEG) -> dict:
    """The rotation ``delta`` (degrees, counter-clockwise) of every aligned image about its centre that lets the
    beads seen at ``seen (M, J, 2)`` fit fixed 3-D positions and per-view shifts best.

    Turning every view alike is turning the tilt axis: a bead at ``(x, z)`` moves along the axis by
    ``delta (x cos(theta) + z sin(theta))``, which differs between beads and so no per-view shift absorbs
    (IMOD's tiltalign solves the same rotation). For candidates ``k step_deg`` within ``+-search_deg`` the
    beads are turned (:func:`rotated`) and solved (:func:`solve_bead_shifts`); a parabola through the smallest
    mean residual and its two neighbours gives the estimate. The same on the two halves of the beads (alternate
    beads, 3 at least in each, so from 6 beads on) tells how far a few beads can be trusted: two disjoint sets
    give independent estimates, where subsets that share most of their beads (each of 4 or 5 left out in turn)
    agree whatever the shared beads say. Returns ``rotation_deg``, ``candidates_deg``, ``residual_px`` (per
    candidate), ``inside`` (the smallest residual is not at an end of the range), ``standard_error_deg``
    (:func:`turn_standard_error` about the estimate), ``subsets`` (``"halves"``, or ``"none"`` with fewer than 6
    beads), ``subsets_deg`` (their estimates), ``subsets_inside`` (whether each half's smallest residual lies
    inside the range: a half whose beads do not determine the turn, e.g. lying along one line, finds its smallest
    residual at an end) and ``subsets_spread_deg`` (the difference of the halves' estimates; ``None`` unless both
    determine the turn)."""
    candidates = np.arange(-search_deg, search_deg + step_deg / 2, step_deg)
    estimate, residuals, inside = _best_turn(seen, tilt_angles_deg, candidates)
    count = seen.shape[1]
    kind, subsets = ("halves", [np.arange(k, count, 2) for k in (0, 1)]) if count >= 6 else ("none", [])
    found = [_best_turn(seen[:, subset], tilt_angles_deg, candidates) for subset in subsets]
    determined = [f[0] for f in found if f[2]]
    spread = float(max(determined) - min(determined)) if found and len(determined) == len(found) else None
    return {"rotation_deg": estimate, "candidates_deg": candidates.tolist(), "residual_px": residuals.tolist(),
            "inside": inside, "standard_error_deg": turn_standard_error(rotated(seen, estimate), tilt_angles_deg),
            "subsets": kind, "subsets_deg": [float(f[0]) for f in found],
            "subsets_inside": [bool(f[2]) for f in found], "subsets_spread_deg": spread}


def turn_standard_error(seen: np.ndarray, tilt_angles_deg) -> float:
    """Standard error (degrees) of a common turn of the views estimated from beads seen at ``seen (M, J, 2)``
    (pixels, NaN: not seen), the turn solved jointly with the positions and per-view shifts.

    Linearised about no turn, turning the views by ``delta`` (radians) adds ``delta (-v, u)`` to each seen
    point, so ``u = x cos(theta) + z sin(theta) + s_u - delta v`` and ``v = y + s_v + delta u`` are one linear
    least-squares problem (:func:`_designs` and a column for ``delta``); the error is
    ``sigma sqrt((A^T A)^+_dd)`` with ``sigma`` the residual scatter, once the measurements further than
    :data:`OUTLIER_FACTOR` times the median residual (and :data:`OUTLIER_FLOOR_PX`) are left out. It measures how
    well the beads' lever arm pins a turn: a few beads near the centre of a small field leave it loose however
    consistent they are; ``inf`` without enough measurements."""
    across, along, views, beads = _designs(seen, tilt_angles_deg)
    n = views.size
    if n == 0:
        return float("inf")
    u, v = seen[views, beads, 0], seen[views, beads, 1]
    design = np.block([[across, np.zeros((n, along.shape[1])), -v[:, None]],
                       [np.zeros((n, across.shape[1])), along, u[:, None]]])
    observed = np.concatenate([u, v])
    distance = np.hypot(*(observed - design @ np.linalg.lstsq(design, observed, rcond=None)[0]).reshape(2, n))
    keep = np.tile(~_too_far(distance, OUTLIER_FLOOR_PX), 2)
    a, b = design[keep], observed[keep]
    residual = b - a @ np.linalg.lstsq(a, b, rcond=None)[0]
    freedom = a.shape[0] - np.linalg.matrix_rank(a)
    if freedom <= 0:
        return float("inf")
    variance = float(residual @ residual) / freedom * np.linalg.pinv(a.T @ a)[-1, -1]
    return float(np.degrees(np.sqrt(max(variance, 0.0))))


def _best_turn(seen: np.ndarray, tilt_angles_deg, candidates: np.ndarray) -> tuple[float, np.ndarray, bool]:
    """:func:`solve_bead_rotation`'s estimate over ``candidates``, the residual of each, and whether the
    smallest lies inside the range."""
    residuals = np.array([solve_bead_shifts(rotated(seen, c), tilt_angles_deg)["residual_px"] for c in candidates])
    best = int(np.argmin(residuals))
    inside = 0 < best < candidates.size - 1
    estimate = float(candidates[best])
    if inside:
        step = float(candidates[1] - candidates[0])
        estimate += step * _vertex(-residuals[best - 1], -residuals[best], -residuals[best + 1])
    return estimate, residuals, bool(inside)


def _residual_without_shifts(seen: np.ndarray, tilt_angles_deg) -> float:
    """Mean bead residual (pixels) of the best positions with every view's shift held at 0."""
    t = np.deg2rad(np.asarray(tilt_angles_deg, dtype=np.float64))
    distances = []
    for j in range(seen.shape[1]):
        ok = np.isfinite(seen[:, j, 0])
        if ok.sum() < 3:
            continue
        a = np.stack([np.cos(t[ok]), np.sin(t[ok])], 1)
        (x, z), *_ = np.linalg.lstsq(a, seen[ok, j, 0], rcond=None)
        du = seen[ok, j, 0] - a @ [x, z]
        dv = seen[ok, j, 1] - seen[ok, j, 1].mean()
        distances.append(np.hypot(du, dv))
    return float(np.concatenate(distances).mean())


def track_beads(aligned: torch.Tensor, tilt_angles_deg, thickness: int, max_beads: int = MAX_BEADS,
                passes: int = PASSES, bead_diameter_px: float | None = None) -> dict:
    """Beads of an aligned series ``aligned (M, ny, nx)`` (dense = bright), followed and solved.

    Candidates from the FBP (``thickness`` voxels) of the standardised images (:func:`detect_beads`, maxima
    :func:`bead_separation_px` apart for beads of ``bead_diameter_px`` pixels, None: unknown); each located in every
    view (:func:`locate_beads`); those found in at least :data:`MIN_VIEW_FRACTION` of the views where they lie
    inside the image (:func:`window_inside`), and inside it in at least :data:`MIN_INSIDE_FRACTION` of all views,
    are kept and solved (:func:`solve_bead_shifts`). Then ``passes - 1`` times: located again within
    :data:`FINE_WINDOW_PX` of the solved model's predictions (a view misaligned by more than :data:`WINDOW_PX` loses
    its beads on the first pass; a neighbouring bead pulls less on a smaller window) and solved again. Returns the
    last solution's dict, ``residual_start_px`` from the first pass (the alignment as given) and ``seen (M, J, 2)``,
    the last pass's measurements of the beads kept (for :func:`solve_bead_rotation`); only ``beads`` (fewer than 3)
    when too few beads are followed."""
    images = standardised(torch.as_tensor(aligned, dtype=torch.float32))
    positions = detect_beads(fbp(images, tilt_angles_deg, thickness).cpu().numpy(), max_beads,
                             separation_px=bead_separation_px(bead_diameter_px))
    images = images.cpu().numpy()
    predicted = project_beads(positions, tilt_angles_deg)
    start = None
    for k in range(passes):
        window = WINDOW_PX if k == 0 else FINE_WINDOW_PX
        seen = locate_beads(images, predicted, window)
        inside = window_inside(predicted, images.shape[1:], window)
        kept = ((np.isfinite(seen[..., 0]).sum(axis=0) >= MIN_VIEW_FRACTION * inside.sum(axis=0))
                & (inside.mean(axis=0) >= MIN_INSIDE_FRACTION))
        if kept.sum() < 3:
            return {"beads": int(kept.sum())}
        solution = solve_bead_shifts(seen[:, kept], tilt_angles_deg)
        start = solution["residual_start_px"] if start is None else start
        predicted = project_beads(solution["positions"], tilt_angles_deg) + solution["shifts_px"][:, None]
    return {**solution, "residual_start_px": start, "seen": seen[:, kept]}
