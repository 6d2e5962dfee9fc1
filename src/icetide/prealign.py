"""Coarse pre-alignment of tilt-series shifts by cross-correlating neighbouring tilts (as IMOD's tiltxcorr).

For drifts too large for the joint fit to pull in, :func:`coarse_shifts` measures each tilt's translation
against its neighbour towards zero tilt and chains the offsets outward from the tilt nearest 0 degrees.

Shifts follow icetide's convention (:mod:`icetide.deform`, docs/CONVENTIONS.md "Deformation model"):
``tau_m = [du, dv]`` pixels, the observed image is the ideal projection translated by ``+tau_m``, so
``Deformations(shifts_px=...)`` with these shifts and :func:`icetide.classical.align_series` undo the drift.

Cosine stretching: a specimen point at ``x`` (thin slab, ``z ~ 0``) projects to ``u = x cos(theta)``. The
image of the higher ``|theta|`` (the "far" tilt) is stretched along ``u`` about the detector centre by
``s = cos(theta_near) / cos(theta_far)``, so its features land where the near tilt sees them. A shift
``tau_far`` is stretched too, so the measured offset of the stretched far image over the near image is
``D = (s tau_far_u - tau_near_u, tau_far_v - tau_near_v)``, which is solved for ``tau_far``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .deform import remove_gauge, sample_images
from .errors import IcetideError
from .geometry import detector_grid
from .metrics import _parabola_peak, edge_taper
from .classical import _as_series, _check_angles

__all__ = [
    "coarse_alignment", "coarse_shifts", "estimate_tilt_axis", "estimate_tilt_axis_by_sharpness", "refine_by_projection_matching",
    "refine_axis_offset_by_sharpness", "refine_tilt_axis_by_sharpness", "sharpness",
]

# High-pass: an inverted Gaussian whose sigma is this many cycles per image (along the shorter side). It
# removes thickness and ice gradients, whose broad correlation peaks would otherwise swamp the sharp one.
LOW_CUT_CYCLES = 2.0
# Low-pass of the profiles along a candidate tilt axis (pixels) before their consistency is scored.
PROFILE_SIGMA_PX = 1.5
# Smallest image side: below it the taper and the high-pass leave too little to correlate.
MIN_SIDE_PX = 16
# A correlation peak less than this many standard deviations above the map's median is not trusted and the
# pair's offset is taken as zero: pure noise peaks at 3.5-4.4 (128 x 128, 41 tilts at -20 dB), while real
# matches score 5.6-8.3 at -10 dB and 8-11 from 0 dB up. Without it, noise offsets chain into a random walk.
MIN_PEAK_Z = 5.0
# Sharpness of a tomogram: this quantile of its standardised voxels (the densest features: gold beads, membranes).
SHARPNESS_QUANTILE = 0.9999
# The sharpness search fits its parabola to the candidates within this many degrees of the best one.
SHARPNESS_FIT_DEG = 1.5
# The sharpness must peak: a parabola over the whole search range explains at least this fraction of its variance
# (0.96-0.99 with gold beads, real or simulated; 0.1-0.75, or an upward parabola, for specimens without them).
SHARPNESS_MIN_R2 = 0.8
# The lateral offset search peaks when both ends of its range score at least this much (relative) below the best.
OFFSET_MIN_DROP = 0.02
# Pixels per chunk of image pairs processed at once, to bound memory on large images.
CHUNK_PIXELS = 1 << 24


def _bandpass(shape: tuple[int, int], sigma_px: float) -> torch.Tensor:
    """``rfft2`` weights ``(ny, nx // 2 + 1)``: Gaussian low-pass of ``sigma_px`` times a low-frequency cut."""
    ny, nx = shape
    fy = torch.fft.fftfreq(ny, dtype=torch.float64)[:, None]
    fx = torch.fft.rfftfreq(nx, dtype=torch.float64)[None, :]
    f2 = fy**2 + fx**2
    low_cut = LOW_CUT_CYCLES / min(ny, nx)
    weights = torch.exp(-2 * math.pi**2 * sigma_px**2 * f2) * (1 - torch.exp(-f2 / (2 * low_cut**2)))
    return weights.to(torch.float32)


def _prepared(images: torch.Tensor, taper: torch.Tensor) -> torch.Tensor:
    """Images ``(P, ny, nx)`` with the mean removed, edges tapered to it, and the mean removed again."""
    centred = images - images.mean(dim=(-2, -1), keepdim=True)
    tapered = centred * taper
    return tapered - tapered.mean(dim=(-2, -1), keepdim=True)


def _stretched(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """``images (P, ny, nx)`` stretched along ``u`` by ``factors (P,)`` about the centre (bilinear).

    The content at ``u`` moves to ``factors * u``; factors ``>= 1`` sample only inside the image.
    """
    u, v = detector_grid(*images.shape[-2:], dtype=images.dtype)
    coords = torch.stack([u[None] / factors[:, None, None], v[None].expand(len(factors), -1, -1)], -1)
    return sample_images(images, coords)


def _peak(correlation: np.ndarray, max_shift_px: float | None) -> np.ndarray:
    """Lag ``[du, dv]`` (pixels) of the maximum of a circular correlation ``(ny, nx)``, sub-pixel.

    Lags are limited to ``|du|, |dv| <= max_shift_px`` when given (and to half the image by the wrap).
    A parabola through the peak and its neighbours along each axis refines it.
    """
    ny, nx = correlation.shape
    lag_v = np.fft.fftfreq(ny, 1 / ny)
    lag_u = np.fft.fftfreq(nx, 1 / nx)
    masked = correlation
    if max_shift_px is not None:
        allowed = (np.abs(lag_v)[:, None] <= max_shift_px) & (np.abs(lag_u)[None, :] <= max_shift_px)
        masked = np.where(allowed, correlation, -np.inf)
    r, c = np.unravel_index(int(np.argmax(masked)), masked.shape)
    # The neighbours wrap around, as the correlation does.
    window = correlation[np.ix_(np.arange(r - 1, r + 2) % ny, np.arange(c - 1, c + 2) % nx)]
    dv, du = _parabola_peak(window, (1, 1), 1.0)
    lag = np.array([lag_u[c] + du, lag_v[r] + dv])
    if max_shift_px is not None:
        lag = np.clip(lag, -max_shift_px, max_shift_px)
    return lag


def _taper(shape: tuple[int, int], fraction: float, device) -> torch.Tensor:
    """Raised-cosine edge weights ``(ny, nx)`` over ``fraction`` of each side."""
    ny, nx = shape
    weights = edge_taper((ny,), fraction * ny)[:, None] * edge_taper((nx,), fraction * nx)[None, :]
    return torch.from_numpy(weights).to(device)


def _offsets(moving: torch.Tensor, reference: torch.Tensor, taper: torch.Tensor, bandpass: torch.Tensor,
             max_shift_px: float | None) -> np.ndarray:
    """Offsets ``(P, 2)`` ``[du, dv]`` of each of ``moving (P, ny, nx)`` over its ``reference``: the peak of
    their band-passed correlation (:func:`_peak`), or 0 where the peak is less than :data:`MIN_PEAK_Z` standard
    deviations above the map's median."""
    ny, nx = moving.shape[-2:]
    spec_moving = torch.fft.rfft2(_prepared(moving, taper))
    spec_reference = torch.fft.rfft2(_prepared(reference, taper))
    correlation = torch.fft.irfft2(spec_moving * spec_reference.conj() * bandpass, s=(ny, nx)).cpu().numpy()
    offsets = np.zeros((len(correlation), 2))
    for k, corr in enumerate(correlation):
        z = (corr.max() - np.median(corr)) / max(float(corr.std()), 1e-30)
        if z >= MIN_PEAK_Z:
            offsets[k] = _peak(corr, max_shift_px)
    return offsets


def _checked_series(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """The series as float32 ``(M, ny, nx)``, refused when it cannot be correlated."""
    series = _as_series(images.detach() if isinstance(images, torch.Tensor) else images)
    n_tilts, ny, nx = series.shape
    if n_tilts < 2:
        raise IcetideError(f"coarse alignment needs at least 2 tilts, got {n_tilts}")
    if min(ny, nx) < MIN_SIDE_PX:
        raise IcetideError(f"images of {ny} x {nx} pixels are too small to correlate (need {MIN_SIDE_PX} per side)")
    if not bool(torch.isfinite(series).all()):
        raise IcetideError("tilt series contains NaN or infinite values")
    flat = (series.amax(dim=(-2, -1)) == series.amin(dim=(-2, -1))).nonzero()
    if len(flat):
        raise IcetideError(f"tilt {int(flat[0])} is a constant image: nothing to correlate")
    return series


def coarse_shifts(
    images: np.ndarray | torch.Tensor,
    tilt_angles_deg,
    max_shift_px: float | None = None,
    filter_sigma_px: float = 1.0,
    taper_fraction: float = 0.1,
) -> np.ndarray:
    """Per-tilt shifts ``(M, 2)`` ``[du, dv]`` in pixels in icetide's convention (the ``shifts_px`` of
    :mod:`icetide.deform`: observed image y_m(x) = P[rho](x - tau_m) when there is no rotation/local field),
    gauge-free.

    ``images``: tilt series ``(M, ny, nx)`` in stack order (any intensity scale and offset);
    ``tilt_angles_deg``: ``(M,)``, each within +-90 degrees. Tilts are sorted by angle; starting from the one
    nearest 0 degrees, each tilt is cross-correlated with its neighbour towards zero tilt, its image
    cosine-stretched along ``u`` onto the neighbour's (module docstring). Both images get their mean
    removed, their edges tapered to it by a raised cosine over ``taper_fraction`` of each side, and the
    correlation is band-passed (Gaussian low-pass of ``filter_sigma_px`` pixels, applied once, and an
    inverted-Gaussian cut of the lowest few cycles per image). The peak is searched over offsets of at most
    ``max_shift_px`` per component between neighbours (``None``: up to half the image) and refined by a
    parabola; a peak less than :data:`MIN_PEAK_Z` standard deviations above the map's median (noise) gives
    a zero offset. The offsets are chained outward with the reference tilt at zero, then the best-fitting volume
    translation is removed (:func:`icetide.deform.remove_gauge`); the residual shifts are returned.

    Runs on the device of ``images`` (a tensor) or the CPU, in chunks of tilt pairs to bound memory.
    """
    series = _checked_series(images)
    n_tilts, ny, nx = series.shape
    angles = _check_angles(tilt_angles_deg, n_tilts)
    if not np.all(np.abs(angles) < 90):
        raise IcetideError("tilt angles must be finite and strictly within +-90 degrees")
    if max_shift_px is not None and not max_shift_px >= 0:
        raise IcetideError(f"max_shift_px must be non-negative, got {max_shift_px}")
    if not filter_sigma_px >= 0:
        raise IcetideError(f"filter_sigma_px must be non-negative, got {filter_sigma_px}")
    if not 0 <= taper_fraction < 0.5:
        raise IcetideError(f"taper_fraction must be in [0, 0.5), got {taper_fraction}")

    order = np.argsort(angles, kind="stable")
    ref = int(np.argmin(np.abs(angles[order])))
    # Pairs (far, near) in stack indices, in the order the chain visits them.
    far = np.concatenate([order[ref + 1 :], order[:ref][::-1]])
    near = np.concatenate([order[ref:-1], order[1 : ref + 1][::-1]])
    cos = np.cos(np.deg2rad(angles))
    factors = cos[near] / cos[far]

    device = series.device
    taper = _taper((ny, nx), taper_fraction, device)
    bandpass = _bandpass((ny, nx), filter_sigma_px).to(device)
    offsets = np.empty((len(far), 2))
    chunk = max(1, CHUNK_PIXELS // (ny * nx))
    for start in range(0, len(far), chunk):
        idx = slice(start, start + chunk)
        f_idx, n_idx = torch.as_tensor(far[idx], device=device), torch.as_tensor(near[idx], device=device)
        stretched = _stretched(series[f_idx], torch.as_tensor(factors[idx], dtype=torch.float32, device=device))
        offsets[idx] = _offsets(stretched, series[n_idx], taper, bandpass, max_shift_px)

    shifts = np.zeros((n_tilts, 2))
    for (f, n), s, d in zip(zip(far, near), factors, offsets):
        shifts[f, 0] = (d[0] + shifts[n, 0]) / s
        shifts[f, 1] = d[1] + shifts[n, 1]
    residual, _ = remove_gauge(shifts, angles)
    return residual


def coarse_alignment(images: np.ndarray | torch.Tensor, tilt_angles_deg, tilt_axis_angle_deg: float = 0.0):
    """Deformations ``(M,)`` of a series whose tilt axis lies ``tilt_axis_angle_deg`` from the image Y axis: the
    rotation ``alpha = -psi`` of every view and the shifts of :func:`coarse_shifts`, measured on the images turned
    by it (the axis along Y, as the correlation needs). In that frame a remaining translation is exactly the
    model's ``tau`` (``x' = R(alpha) x - tau``), so the shifts carry over unchanged."""
    from .deform import Deformations
    from .classical import align_series

    series = _checked_series(images)
    d = Deformations.identity(tilt_angles_deg, series.shape[1:])
    d.angles_deg = np.full(d.n_tilts, -float(tilt_axis_angle_deg))
    turned = align_series(series, d) if tilt_axis_angle_deg != 0 else series
    d.shifts_px = coarse_shifts(turned, tilt_angles_deg)
    return d


def _axis_profiles(series: torch.Tensor, psi_deg: float, margin: float) -> np.ndarray:
    """Profiles along a tilt axis at ``psi_deg``: the images turned so that the axis is vertical
    (``alpha = -psi``), summed across it (over columns) in the central part (``margin`` of each side left out,
    where turning brings in empty corners), each divided by its sum. Returns ``(M, rows)``."""
    from .deform import Deformations
    from .classical import align_series

    n_tilts, ny, nx = series.shape
    turn = Deformations.identity(np.zeros(n_tilts), (ny, nx))
    turn.angles_deg = np.full(n_tilts, -psi_deg)
    turned = align_series(series, turn)
    r, c = int(margin * ny), int(margin * nx)
    profiles = turned[:, r : ny - r, c : nx - c].sum(dim=2).double().cpu().numpy()
    return profiles / np.abs(profiles.sum(axis=1, keepdims=True)).clip(min=1e-30)


def _profile_misfit(profiles: np.ndarray, iterations: int = 2) -> float:
    """Residual of ``profiles (M, L)`` from their mean after each is translated onto it (1-D cross-correlation,
    sub-pixel by a parabola, Fourier shift), relative to the profiles' own variance."""
    n, length = profiles.shape
    freq = np.fft.rfftfreq(length)
    # A Gaussian low-pass (sigma PROFILE_SIGMA_PX): the profiles' finest detail is mostly noise.
    smooth = np.exp(-2 * (np.pi * PROFILE_SIGMA_PX * freq) ** 2)
    spectra = np.fft.rfft(profiles - profiles.mean(axis=1, keepdims=True), axis=1) * smooth
    aligned = np.fft.irfft(spectra, n=length, axis=1)
    for _ in range(iterations):
        reference = np.fft.rfft(aligned.mean(axis=0))
        correlation = np.fft.irfft(spectra * reference.conj(), n=length, axis=1)
        peaks = np.argmax(correlation, axis=1)
        middle = length // 2  # the correlation is circular: refine each peak rolled into the middle
        lag = np.array([
            p + _parabola_peak(np.roll(corr, middle - p), (middle,), 1.0)[0] for p, corr in zip(peaks, correlation)
        ])
        lag = (lag + length / 2) % length - length / 2
        aligned = np.fft.irfft(spectra * np.exp(2j * np.pi * freq[None, :] * lag[:, None]), n=length, axis=1)
    residual = aligned - aligned.mean(axis=0)
    return float((residual**2).sum() / max(float((aligned**2).sum()), 1e-300))


def _axis_candidates(start_deg: float, search_deg: float, step_deg: float) -> np.ndarray:
    """Candidate axes ``start_deg + k step_deg`` within ``+-search_deg``, degrees."""
    n_steps = int(math.floor(search_deg / step_deg + 1e-9))
    return start_deg + step_deg * np.arange(-n_steps, n_steps + 1)


def estimate_tilt_axis(
    images: np.ndarray | torch.Tensor,
    tilt_angles_deg,
    start_deg: float = 0.0,
    search_deg: float = 5.0,
    step_deg: float = 0.5,
    max_tilt_deg: float = 60.0,
    margin: float = 0.1,
) -> dict:
    """The tilt axis' direction on the images (degrees counter-clockwise from the image Y axis, as in
    docs/CONVENTIONS.md "Deformation model") by the consistency of the profiles along it ("common lines").

    Every projection about an axis has the same profile along the axis, the integral across it
    (``int P_theta(u, v) du = int int rho(x, v, z) dx dz``), up to a translation along the axis (drift) and a
    scale (a slab wider than the view); across a wrong axis the profiles smear differently at every tilt. For
    candidate directions ``start_deg + k step_deg`` within ``+-search_deg``, the tilts within
    ``+-max_tilt_deg`` are turned so that the candidate is vertical, profiled (:func:`_axis_profiles`),
    translated onto their mean and scored by the relative residual; the estimate is the vertex of the parabola
    through the best candidate and its neighbours. Shifts across the axis do not matter; the images need no
    pre-alignment. Returns ``{"tilt_axis_angle_deg", "candidates_deg", "misfit"}``.
    """
    series = _checked_series(images)
    angles = _check_angles(tilt_angles_deg, series.shape[0])
    use = np.abs(angles) <= max_tilt_deg
    if use.sum() < 3:
        raise IcetideError(f"the tilt-axis search needs at least 3 tilts within +-{max_tilt_deg:g} degrees")
    if not (search_deg > 0 and step_deg > 0 and 0 <= margin < 0.5):
        raise IcetideError("the tilt-axis search needs a positive range and step and a margin in [0, 0.5)")
    subset = series[torch.as_tensor(np.flatnonzero(use), device=series.device)]
    candidates = _axis_candidates(start_deg, search_deg, step_deg)
    misfit = np.array([_profile_misfit(_axis_profiles(subset, float(c), margin)) for c in candidates])
    best = int(np.argmin(misfit))
    estimate = float(candidates[best] + _parabola_peak(-misfit, (best,), step_deg)[0])
    return {"tilt_axis_angle_deg": estimate, "candidates_deg": candidates.tolist(), "misfit": misfit.tolist()}


def sharpness(images: torch.Tensor, tilt_angles_deg, deformations, thickness: int, margin: float = 0.06) -> float:
    """How sharp the densest features of the FBP of ``images (M, ny, nx)`` aligned by ``deformations`` are: the
    :data:`SHARPNESS_QUANTILE` quantile of the tomogram's voxels after standardising it (mean 0, standard
    deviation 1; each aligned image standardised first), a ``margin`` of each side left out (the turned images'
    empty corners). A misaligned view spreads a gold bead or a membrane over more voxels and lowers it."""
    from .classical import align_series, fbp, standardised

    volume = fbp(standardised(align_series(images, deformations)), tilt_angles_deg, thickness)
    ny, nx = volume.shape[1:]
    r, c = int(margin * ny), int(margin * nx)
    core = volume[:, r : ny - r, c : nx - c].reshape(-1).double()
    core = (core - core.mean()) / core.std().clamp(min=1e-30)
    return float(torch.quantile(core[:: max(1, core.numel() // 8_000_000)], SHARPNESS_QUANTILE))


def estimate_tilt_axis_by_sharpness(
    images: np.ndarray | torch.Tensor,
    tilt_angles_deg,
    start_deg: float = 0.0,
    search_deg: float = 4.0,
    step_deg: float = 0.5,
    thickness: int | None = None,
) -> dict:
    """The tilt axis' direction on the images (degrees counter-clockwise from the image Y axis) that gives the
    sharpest tomogram (:func:`sharpness`).

    A common in-plane rotation of every view is not a rotation of the specimen: a feature at height ``z``
    moves by ``z sin(theta)`` across the true axis, so with the axis off by ``delta`` it wanders by
    ``z sin(theta) sin(delta)`` along the assumed one at every tilt, which no shift can undo, and the features
    off the centre plane (gold beads on the surfaces of a thick specimen) blur in the FBP. For candidates
    ``start_deg + k step_deg`` within ``+-search_deg`` the images are turned to put the candidate axis along Y,
    pre-aligned by :func:`coarse_shifts`, and reconstructed by FBP (``thickness`` voxels, default half the
    smaller side); a parabola fitted by least squares to the sharpness of the candidates within
    :data:`SHARPNESS_FIT_DEG` of the best gives the estimate (kept within the range). Unlike
    :func:`estimate_tilt_axis` it needs no specimen inside the field of view, but features dense enough to
    stand out: ``peaked`` says whether the sharpness peaks over the range (a parabola through all candidates
    curves down and explains at least :data:`SHARPNESS_MIN_R2` of their variance, ``parabola_r2``). Returns
    ``{"tilt_axis_angle_deg", "candidates_deg", "sharpness", "peaked", "parabola_r2"}``.
    """
    series = _checked_series(images)
    angles = _check_angles(tilt_angles_deg, series.shape[0])
    if not (search_deg > 0 and step_deg > 0):
        raise IcetideError("the tilt-axis search needs a positive range and step")
    thickness = thickness or max(8, min(series.shape[1:]) // 2)
    candidates = _axis_candidates(start_deg, search_deg, step_deg)
    scores = [sharpness(series, angles, coarse_alignment(series, angles, float(psi)), thickness) for psi in candidates]
    return _sharpest(candidates, np.asarray(scores), start_deg)


def refine_tilt_axis_by_sharpness(
    images: np.ndarray | torch.Tensor,
    deformations,
    search_deg: float = 2.0,
    step_deg: float = 0.5,
    thickness: int | None = None,
) -> dict:
    """The tilt axis' direction on the images (degrees counter-clockwise from Y) that gives the sharpest
    tomogram (:func:`sharpness`) with the shifts and per-tilt rotations of a fitted alignment.

    ``deformations`` (:class:`icetide.deform.Deformations` for ``images (M, ny, nx)``) hold the axis in their
    rotations, ``alpha_m = -psi + delta_m``; their axis is ``psi = -median(alpha)``. Each candidate ``psi'``
    within ``+-search_deg`` of it (steps of ``step_deg``) replaces ``psi`` and keeps the ``delta_m`` and the
    shifts; the local fields are left out. Once the shifts are right to a fraction of a pixel, the blur that a
    wrong axis leaves on features off the centre plane (see :func:`estimate_tilt_axis_by_sharpness`) is no
    longer hidden under the coarse alignment's own errors, so the measure resolves the axis more finely than
    before the fit. Returns :func:`estimate_tilt_axis_by_sharpness`'s dict plus ``"fitted_axis_deg"``.
    """
    series = _checked_series(images)
    angles = _check_angles(deformations.tilt_angles_deg, series.shape[0])
    if not (search_deg > 0 and step_deg > 0):
        raise IcetideError("the tilt-axis refinement needs a positive range and step")
    thickness = thickness or max(8, min(series.shape[1:]) // 2)
    fitted = -float(np.median(deformations.angles_deg))
    candidates = _axis_candidates(fitted, search_deg, step_deg)
    scores = [_rigid_sharpness(series, angles, deformations, thickness, angles_deg=deformations.angles_deg + fitted - p)
              for p in candidates]
    return {**_sharpest(candidates, np.asarray(scores), fitted), "fitted_axis_deg": fitted}


def refine_axis_offset_by_sharpness(
    images: np.ndarray | torch.Tensor,
    deformations,
    search_px: float,
    step_px: float = 1.0,
    thickness: int | None = None,
) -> dict:
    """The lateral position of the tilt axis, as a shift across it common to every view (pixels of ``images``),
    that gives the sharpest tomogram (:func:`sharpness`) with the shifts and rotations of a fitted alignment.

    A shift ``c`` across the axis in every view (added to each ``tau_m``'s first component, in the frame the
    rotations turn the axis into) is not a translation of the specimen: the gauge is ``dx cos(theta) + dz
    sin(theta)``, so what is left, ``c (1 - cos(theta))`` up to the gauge, moves every feature by up to
    ``c / 2`` at 60 degrees. Its signal in the images is that small difference, against a translation of the
    whole volume that nearly mimics it, so a fit moves it slowly, while the blur it leaves on dense features
    (gold beads) is plain. Candidates ``k step_px`` within ``+-search_px``; the local fields are left out.
    Returns ``{"offset_px", "candidates_px", "sharpness", "peaked", "parabola_r2"}``; ``peaked``: a parabola
    through all candidates curves down, the best candidate lies inside the range and both ends score at least
    :data:`OFFSET_MIN_DROP` (relative) below it.
    """
    series = _checked_series(images)
    angles = _check_angles(deformations.tilt_angles_deg, series.shape[0])
    if not (search_px > 0 and step_px > 0):
        raise IcetideError("the tilt-axis offset search needs a positive range and step")
    thickness = thickness or max(8, min(series.shape[1:]) // 2)
    candidates = _axis_candidates(0.0, search_px, step_px)
    scores = np.asarray([
        _rigid_sharpness(series, angles, deformations, thickness, shifts_px=deformations.shifts_px + [offset, 0.0])
        for offset in candidates
    ])
    found = _sharpest(candidates, scores, 0.0, 1.5 * step_px)
    # A lateral error blurs every bead, so the curve falls steeply on both sides of its peak and then flattens:
    # a parabola need not explain much of it, but must curve down. Without beads the most extreme voxels are
    # the streaks a misalignment makes, and the curve has its minimum near the fitted position instead.
    best = int(np.argmax(scores))
    drop = (scores[best] - max(scores[0], scores[-1])) / max(abs(float(scores[best])), 1e-300)
    curves_down = np.polyfit(candidates, scores, 2)[0] < 0
    found["peaked"] = bool(curves_down and 0 < best < len(scores) - 1 and drop >= OFFSET_MIN_DROP)
    return {"offset_px": found.pop("tilt_axis_angle_deg"), "candidates_px": found.pop("candidates_deg"), **found}


def _rigid_sharpness(series: torch.Tensor, angles, deformations, thickness: int, angles_deg=None,
                     shifts_px=None) -> float:
    """:func:`sharpness` of ``series`` aligned by ``deformations`` with its rotations ``angles_deg`` and shifts
    ``shifts_px`` in place of their own where given, and without its local fields."""
    import copy

    trial = copy.deepcopy(deformations)
    if angles_deg is not None:
        trial.angles_deg = angles_deg
    if shifts_px is not None:
        trial.shifts_px = shifts_px
    trial.local_px = np.zeros_like(deformations.local_px)
    return sharpness(series, angles, trial, thickness)


def _sharpest(candidates: np.ndarray, scores: np.ndarray, start: float, fit_halfwidth: float = SHARPNESS_FIT_DEG) -> dict:
    """The estimate from the sharpness ``scores`` of ``candidates`` (evenly spaced about ``start``): a
    least-squares parabola through the candidates within ``fit_halfwidth`` of the best, kept within the range;
    ``peaked`` and ``parabola_r2`` as :func:`estimate_tilt_axis_by_sharpness` describes them."""
    best = int(np.argmax(scores))
    near = np.abs(candidates - candidates[best]) <= fit_halfwidth + 1e-9
    estimate = float(candidates[best])
    if near.sum() >= 3:
        a, b, _ = np.polyfit(candidates[near] - candidates[best], scores[near], 2)
        if a < 0:
            estimate += float(np.clip(-b / (2 * a), -fit_halfwidth, fit_halfwidth))
    estimate = float(np.clip(estimate, candidates[0], candidates[-1]))
    # How clearly the sharpness peaks: a parabola over the whole range, its curvature and explained variance.
    whole = np.polyfit(candidates - start, scores, 2)
    explained = 1 - float(np.var(scores - np.polyval(whole, candidates - start))) / max(float(np.var(scores)), 1e-300)
    return {"tilt_axis_angle_deg": estimate, "candidates_deg": candidates.tolist(), "sharpness": scores.tolist(),
            "peaked": bool(whole[0] < 0 and explained >= SHARPNESS_MIN_R2), "parabola_r2": explained}


def refine_by_projection_matching(
    images: np.ndarray | torch.Tensor,
    deformations,
    thickness: int,
    iterations: int = 3,
    filter_sigma_px: float = 1.5,
    max_step_px: float | None = None,
):
    """Shifts refined by projection matching (as AreTomo does after its coarse alignment).

    Each round: the series aligned by the current deformations (each view standardised) is split into its even
    and odd views; each half is reconstructed by FBP over ``thickness`` voxels and reprojected at the other
    half's tilts (so that a view's own noise is not in its reference); each view is cross-correlated with its
    reprojection as :func:`coarse_shifts` does (band-passed, tapered, a peak of at least :data:`MIN_PEAK_Z`) and
    its shift moved by the offset (at most ``max_step_px`` per component; None: a quarter of the smaller side).
    Unlike neighbour correlation this compares every view with the whole specimen at its own depth, so a thick
    specimen off the tilt axis' height does not bias it. ``deformations``' rotations and local fields are kept;
    returns new :class:`icetide.deform.Deformations`.
    """
    import copy

    from .geometry import deg2rad
    from .classical import align_series, fbp, project, standardised

    series = _checked_series(images)
    n_tilts, ny, nx = series.shape
    if iterations < 0:
        raise IcetideError(f"projection matching needs a non-negative number of rounds, got {iterations}")
    if n_tilts < 4:
        return copy.deepcopy(deformations)
    limit = 0.25 * min(ny, nx) if max_step_px is None else max_step_px
    taper = _taper((ny, nx), 0.1, series.device)
    bandpass = _bandpass((ny, nx), filter_sigma_px).to(series.device)
    angles = np.asarray(deformations.tilt_angles_deg, dtype=np.float64)
    theta = deg2rad(angles).to(series.device)
    order = np.argsort(angles, kind="stable")
    halves = (order[0::2], order[1::2])
    d = copy.deepcopy(deformations)
    for _ in range(iterations):
        aligned = standardised(align_series(series, d))
        reference = torch.empty_like(aligned)
        for own, other in (halves, halves[::-1]):
            volume = fbp(aligned[other], angles[other], thickness)
            reference[own] = project(volume, theta[own], nx)
        d.shifts_px = d.shifts_px + _offsets(aligned, reference, taper, bandpass, limit)
    return d
