"""Scoring reconstructions and deformations against the truth (docs/CONVENTIONS.md "Evaluation").

Volumes are numpy arrays ``(nz, ny, nx)``. Every reconstruction is scored the same way: it is registered to
the truth by the sub-voxel translation that maximises their cross-correlation (no scaling, no other
post-processing), moved by that translation with a Fourier shift (periodic wrap: what leaves one face
re-enters at the opposite one; no interpolation blur, so every method keeps its high frequencies), then
compared by Pearson correlation (CC) and Fourier shell correlation (FSC).

FSC shells live in physical frequency: each axis uses its own ``np.fft.fftfreq(n)`` (cycles per voxel), so a
shell is a sphere also in a non-cubic volume. Shells have width ``0.5 / n_shells`` (``n_shells`` defaults to
``max(shape) // 2``, i.e. width ``1 / max(shape)`` for an even largest side) and are centred on ``k * width``,
``k = 1..n_shells``; the DC term is left out.

Deformation errors compare two :class:`~icetide.deform.Deformations` of the same tilts after removing the
gauge (the best-fitting volume translation, :func:`icetide.deform.remove_gauge`) from the shift difference.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.fft
import torch
from scipy.ndimage import fourier_shift

from .deform import Deformations, local_displacement, remove_gauge
from .errors import IcetideError

__all__ = [
    "FSC_THRESHOLDS",
    "cc",
    "register_translation",
    "apply_translation",
    "fsc",
    "evaluate_reconstruction",
    "deformation_errors",
    "check_same_tilts",
    "detector_mesh",
    "local_field",
    "edge_taper",
    "slab_mask",
    "FSC_TAPER_VOX",
]

FSC_THRESHOLDS = (0.5, 0.143)
# A shell of fewer Fourier voxels than this says nothing about the resolution and is passed over when looking
# for the crossing: the lowest shells of a volume much longer along one axis hold a few coefficients (the first
# shell of a 96 x 160 x 240 volume holds 2).
FSC_MIN_SHELL_VOXELS = 10
# Soft edge (voxels) applied before the FSC of volumes cut by a box: hard edges shared by both volumes
# correlate at high frequency.
FSC_TAPER_VOX = 4.0


def _check_same_shape(a: np.ndarray, b: np.ndarray, what: str = "volumes") -> None:
    if a.shape != b.shape:
        raise IcetideError(f"{what} differ in shape: {a.shape} vs {b.shape}")


def cc(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Pearson correlation of ``a`` and ``b`` (means removed), over the voxels where ``mask`` is true."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    _check_same_shape(a, b)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        _check_same_shape(a, mask, "volume and mask")
        a, b = a[mask], b[mask]
    a, b = a - a.mean(), b - b.mean()
    denom = math.sqrt(float(np.sum(a * a)) * float(np.sum(b * b)))
    return float(np.sum(a * b) / denom) if denom > 0 else 0.0


def _half_spectrum_weights(nx: int) -> np.ndarray:
    """Multiplicity ``(nx // 2 + 1,)`` of each ``rfft`` column in the full spectrum (1 or 2)."""
    w = np.full(nx // 2 + 1, 2.0)
    w[0] = 1.0
    if nx % 2 == 0:
        w[-1] = 1.0
    return w


def _correlation_at(cross_power: np.ndarray, shape: tuple[int, ...], positions: list[np.ndarray]) -> np.ndarray:
    """Circular cross-correlation at arbitrary (sub-voxel) lags, by a direct DFT on a small grid.

    ``cross_power``: the ``rfftn`` half spectrum of the correlation; ``positions[d]``: lags (voxels) along
    axis ``d``. Returns the real correlation on the grid ``positions[0] x positions[1] x ...``.
    """
    out = cross_power
    for axis in reversed(range(len(shape))):
        n = shape[axis]
        last = axis == len(shape) - 1
        freq = np.arange(n // 2 + 1) / n if last else np.fft.fftfreq(n)
        kernel = np.exp(2j * np.pi * positions[axis][:, None] * freq[None, :])
        if last:
            # Hermitian symmetry: each rfft column stands for itself and its conjugate partner.
            kernel = kernel * _half_spectrum_weights(n)[None, :]
        out = np.moveaxis(np.tensordot(out, kernel, axes=([axis], [1])), -1, axis)
    return out.real / math.prod(shape)


def _parabola_peak(values: np.ndarray, index: tuple[int, ...], step: float) -> np.ndarray:
    """Per-axis parabolic refinement of a grid maximum, as an offset in voxels (0 at a grid edge)."""
    offsets = np.zeros(len(index))
    for axis, i in enumerate(index):
        if 0 < i < values.shape[axis] - 1:
            lo, hi = list(index), list(index)
            lo[axis], hi[axis] = i - 1, i + 1
            y0, y1, y2 = values[tuple(lo)], values[index], values[tuple(hi)]
            curvature = y0 - 2 * y1 + y2
            if curvature < 0:
                offsets[axis] = 0.5 * (y0 - y2) / curvature * step
    return offsets


def register_translation(moving: np.ndarray, reference: np.ndarray, upsample: int = 10) -> np.ndarray:
    """Sub-voxel translation that best aligns ``moving`` onto ``reference`` (maximum cross-correlation).

    The integer peak of the circular cross-correlation (means removed) is refined by evaluating the correlation's
    Fourier interpolant on a grid of step ``1 / upsample`` voxel over ``ceil(0.75 upsample)`` steps either side of it
    (+-0.8 voxel at the default 10), then by a parabola through the best grid point. Returns ``shift_zyx`` ``(ndim,)``
    in voxels such that ``apply_translation(moving, shift_zyx)`` matches ``reference``.
    """
    moving, reference = np.asarray(moving, dtype=np.float32), np.asarray(reference, dtype=np.float32)
    _check_same_shape(moving, reference)
    if upsample < 1:
        raise IcetideError(f"upsample must be at least 1, got {upsample}")
    shape = moving.shape
    cross_power = scipy.fft.rfftn(reference - reference.mean()) * np.conj(scipy.fft.rfftn(moving - moving.mean()))
    correlation = scipy.fft.irfftn(cross_power, s=shape)
    peak = np.array(np.unravel_index(int(np.argmax(correlation)), shape), dtype=np.float64)
    sizes = np.asarray(shape)
    coarse = np.where(peak > sizes // 2, peak - sizes, peak)
    if upsample == 1:
        return coarse
    step = 1.0 / upsample
    half = math.ceil(0.75 * upsample)
    grid = (np.arange(2 * half + 1) - half) * step
    local = _correlation_at(cross_power, shape, [c + grid for c in coarse])
    best = np.unravel_index(int(np.argmax(local)), local.shape)
    refined = coarse + grid[list(best)] + _parabola_peak(local, best, step)
    return refined


def apply_translation(volume: np.ndarray, shift_zyx) -> np.ndarray:
    """``volume`` translated by ``shift_zyx`` voxels (Fourier shift, periodic wrap); same shape and dtype.

    The content at voxel ``p`` moves to ``p + shift_zyx``.
    """
    volume = np.asarray(volume)
    shift = np.asarray(shift_zyx, dtype=np.float64).reshape(-1)
    if shift.shape[0] != volume.ndim:
        raise IcetideError(f"shift has {shift.shape[0]} components for a {volume.ndim}-D volume")
    if not np.any(shift):
        return volume.copy()
    dtype = volume.dtype if np.issubdtype(volume.dtype, np.floating) else np.float32
    spectrum = scipy.fft.rfftn(volume.astype(dtype, copy=False))
    shifted = fourier_shift(spectrum, shift, n=volume.shape[-1], axis=volume.ndim - 1)
    return scipy.fft.irfftn(shifted, s=volume.shape).astype(dtype, copy=False)


def _shell_index(shape: tuple[int, ...], width: float) -> np.ndarray:
    """Shell number ``round(|f| / width)`` of every ``rfftn`` coefficient; ``|f|`` in cycles per voxel."""
    *outer, nx = shape
    radius_sq = np.zeros((1,) * len(shape), dtype=np.float64)
    for axis, n in enumerate(outer):
        f = np.fft.fftfreq(n).reshape([-1 if d == axis else 1 for d in range(len(shape))])
        radius_sq = radius_sq + f**2
    radius_sq = radius_sq + (np.arange(nx // 2 + 1) / nx) ** 2
    return np.rint(np.sqrt(radius_sq) / width).astype(np.int64)


def _crossing(frequency: np.ndarray, curve: np.ndarray, threshold: float) -> float | None:
    """Frequency of the first drop of ``curve`` below ``threshold`` (linear interpolation), or ``None``."""
    below = np.flatnonzero(curve < threshold)
    if below.size == 0:
        return None
    i = int(below[0])
    if i == 0:
        return float(frequency[0])
    f0, f1, c0, c1 = frequency[i - 1], frequency[i], curve[i - 1], curve[i]
    return float(f0 + (c0 - threshold) / (c0 - c1) * (f1 - f0))


def _resolution(frequency: np.ndarray, curve: np.ndarray, voxel_size_A: float | None,
                counts: np.ndarray | None = None) -> dict[str, dict]:
    """Resolution at each of :data:`FSC_THRESHOLDS`: crossing frequency, ``1/f`` in voxels and Angstrom, over
    the shells of at least :data:`FSC_MIN_SHELL_VOXELS` Fourier voxels (``counts``; None: every shell)."""
    if counts is not None:
        enough = counts >= FSC_MIN_SHELL_VOXELS
        frequency, curve = frequency[enough], curve[enough]
    result = {}
    for threshold in FSC_THRESHOLDS:
        f = _crossing(frequency, curve, threshold)
        voxels = None if f is None or f <= 0 else 1.0 / f
        result[str(threshold)] = {
            "threshold": threshold,
            "frequency": f,
            "voxels": voxels,
            "angstrom": None if voxels is None or voxel_size_A is None else voxels * voxel_size_A,
            # The curve stays above the threshold up to the last shell: the resolution is at least Nyquist.
            "nyquist_limited": f is None,
        }
    return result


def fsc(
    a: np.ndarray,
    b: np.ndarray,
    voxel_size_A: float | None = None,
    n_shells: int | None = None,
    mask: np.ndarray | None = None,
) -> dict:
    """Fourier shell correlation of two volumes of the same shape.

    ``mask`` (boolean or weights in [0, 1], the volume's shape) multiplies both volumes first; a soft edge
    avoids the correlation a hard edge shared by both volumes adds at high frequency. Returns
    ``frequency`` (shell centres, cycles/voxel), ``fsc`` and ``n_voxels`` (Fourier voxels per shell), each
    ``(n_shells,)``; ``shell_width``; ``resolution``: per threshold ("0.5", "0.143") the crossing
    ``frequency``, ``voxels`` = 1/f, ``angstrom`` (when ``voxel_size_A`` is given) and ``nyquist_limited``
    (true, with the values ``None``, when the curve never drops below the threshold), over the shells of at least
    :data:`FSC_MIN_SHELL_VOXELS` Fourier voxels. A shell where either volume has no power gets FSC 0.
    """
    a, b = np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)
    _check_same_shape(a, b)
    if mask is not None:
        weights = np.asarray(mask, dtype=np.float32)
        _check_same_shape(a, weights, "volume and mask")
        a, b = a * weights, b * weights
    shells = max(a.shape) // 2 if n_shells is None else int(n_shells)
    if shells < 1:
        raise IcetideError(f"need at least one FSC shell, got n_shells={shells} for shape {a.shape}")
    width = 0.5 / shells
    fa, fb = scipy.fft.rfftn(a), scipy.fft.rfftn(b)
    index = _shell_index(a.shape, width)
    multiplicity = np.broadcast_to(_half_spectrum_weights(a.shape[-1]), index.shape)
    keep = (index >= 1) & (index <= shells)
    idx, w = index[keep], multiplicity[keep]

    def per_shell(values: np.ndarray) -> np.ndarray:
        return np.bincount(idx, weights=w * values[keep], minlength=shells + 1)[1:]

    numerator = per_shell((fa * np.conj(fb)).real.astype(np.float64))
    power_a = per_shell((np.abs(fa) ** 2).astype(np.float64))
    power_b = per_shell((np.abs(fb) ** 2).astype(np.float64))
    denom = np.sqrt(power_a * power_b)
    curve = np.divide(numerator, denom, out=np.zeros_like(numerator), where=denom > 0)
    frequency = np.arange(1, shells + 1) * width
    counts = np.bincount(idx, weights=w, minlength=shells + 1)[1:].round().astype(np.int64)
    return {
        "frequency": frequency,
        "fsc": curve,
        "n_voxels": counts,
        "shell_width": width,
        "resolution": _resolution(frequency, curve, voxel_size_A, counts),
    }


def evaluate_reconstruction(
    recon: np.ndarray,
    truth: np.ndarray,
    voxel_size_A: float | None = None,
    mask: np.ndarray | None = None,
    register: bool = True,
    taper_vox: float = 0.0,
) -> dict:
    """Register ``recon`` to ``truth`` (unless ``register`` is false), then score it; JSON-friendly dict.

    ``mask``: boolean ``(nz, ny, nx)``, the voxels scored (CC over them; FSC of the masked volumes).
    ``taper_vox``: width of an :func:`edge_taper` applied to both volumes for the FSC only (0: none).
    Keys: ``cc``, ``fsc`` (the :func:`fsc` dict as lists, including ``resolution``), ``shift_zyx_vox`` (the
    translation applied to ``recon``, voxels), ``registered``, ``voxel_size_A``, ``masked``, ``taper_vox``.
    """
    recon, truth = np.asarray(recon, dtype=np.float32), np.asarray(truth, dtype=np.float32)
    _check_same_shape(recon, truth, "reconstruction and truth")
    shift = register_translation(recon, truth) if register else np.zeros(recon.ndim)
    aligned = apply_translation(recon, shift)
    weights = edge_taper(truth.shape, taper_vox) if taper_vox > 0 else None
    if mask is not None:
        weights = np.asarray(mask, dtype=np.float32) * (1.0 if weights is None else weights)
    curve = fsc(aligned, truth, voxel_size_A, mask=weights)
    for key in ("frequency", "fsc", "n_voxels"):
        curve[key] = curve[key].tolist()
    return {
        "cc": cc(aligned, truth, mask),
        "fsc": curve,
        "shift_zyx_vox": shift.tolist(),
        "registered": bool(register),
        "voxel_size_A": voxel_size_A,
        "masked": mask is not None,
        "taper_vox": float(taper_vox),
    }


def check_same_tilts(true: Deformations, est: Deformations) -> None:
    """Raise :class:`IcetideError` unless ``true`` and ``est`` describe the same tilts of the same detector."""
    if true.n_tilts != est.n_tilts:
        raise IcetideError(f"deformations have {true.n_tilts} (truth) and {est.n_tilts} (estimate) tilts")
    if not np.allclose(true.tilt_angles_deg, est.tilt_angles_deg, atol=1e-3):
        raise IcetideError("true and estimated deformations have different tilt angles")
    if true.detector_shape != est.detector_shape:
        raise IcetideError(
            f"deformations refer to different detectors: {true.detector_shape} (truth) vs {est.detector_shape}"
        )


def detector_mesh(detector_shape: tuple[int, int], mesh: int) -> tuple[np.ndarray, np.ndarray]:
    """A uniform ``mesh x mesh`` grid ``(u, v)`` from the first to the last pixel centre, each ``(mesh, mesh)``."""
    ny, nx = detector_shape
    v = np.linspace(-(ny - 1) / 2, (ny - 1) / 2, mesh)
    u = np.linspace(-(nx - 1) / 2, (nx - 1) / 2, mesh)
    vv, uu = np.meshgrid(v, u, indexing="ij")
    return uu, vv


def local_field(d: Deformations, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``phi_m`` of every tilt at detector points ``u, v`` ``(H, W)``: ``(M, H, W, 2)`` pixels ``[du, dv]``."""
    phi = local_displacement(
        torch.as_tensor(d.local_px, dtype=torch.float64),
        torch.as_tensor(u, dtype=torch.float64),
        torch.as_tensor(v, dtype=torch.float64),
        d.detector_shape,
        d.local_interpolation,
    )
    return phi.numpy()


def deformation_errors(true: Deformations, est: Deformations, mesh: int = 32) -> dict:
    """Errors of estimated deformations against the truth, for the same tilts (docs/CONVENTIONS.md "Evaluation").

    - ``shift_rms_px``: RMS over tilts of ``|r_m|`` where ``r`` is the shift difference ``est - true`` minus
      its best-fitting volume translation ``gauge_translation_xyz_vox`` (:func:`remove_gauge`).
    - ``rotation_mae_deg``: mean ``|alpha_est - alpha_true|``; a rotation has no gauge, so nothing is removed
      (``rotation_mean_error_deg`` gives the signed mean for reference).
    - ``local_mean_error_px``: mean over tilts and a ``mesh x mesh`` detector grid of
      ``|phi_true(x) - phi_est(x)|``, each field interpolated from its own control grid;
      ``local_true_mean_px``: mean ``|phi_true|`` on the same points, for scale.
    - per tilt ``(M,)``: ``shift_error_per_tilt_px`` (``|r_m|``), ``rotation_error_per_tilt_deg`` (signed,
      est - true), ``local_error_per_tilt_px``; and ``tilt_angles_deg``.
    """
    check_same_tilts(true, est)
    residual, translation = remove_gauge(est.shifts_px - true.shifts_px, true.tilt_angles_deg)
    shift_error = np.linalg.norm(residual, axis=-1)
    rotation_error = est.angles_deg - true.angles_deg
    u, v = detector_mesh(true.detector_shape, mesh)
    phi_true, phi_est = local_field(true, u, v), local_field(est, u, v)
    local_error = np.linalg.norm(phi_est - phi_true, axis=-1)
    return {
        "shift_rms_px": float(np.sqrt(np.mean(shift_error**2))),
        "rotation_mae_deg": float(np.mean(np.abs(rotation_error))),
        "rotation_mean_error_deg": float(np.mean(rotation_error)),
        "rotation_note": "in-plane rotations have no gauge: plain mean absolute error, nothing removed",
        "local_mean_error_px": float(local_error.mean()),
        "local_true_mean_px": float(np.linalg.norm(phi_true, axis=-1).mean()),
        "local_mesh": mesh,
        "gauge_translation_xyz_vox": translation,
        "tilt_angles_deg": true.tilt_angles_deg.copy(),
        "shift_error_per_tilt_px": shift_error,
        "rotation_error_per_tilt_deg": rotation_error,
        "local_error_per_tilt_px": local_error.mean(axis=(1, 2)),
    }


def edge_taper(shape: tuple[int, ...], width_vox: float) -> np.ndarray:
    """Separable raised-cosine weights ``shape`` (float32): 0 at the box faces, 1 from ``width_vox`` inwards.

    Multiplying both volumes by it before an FSC removes the spectral lines that the box faces (where the
    content is cut, and the FFT wraps around) add to both spectra, which otherwise inflate high frequencies.
    """
    if not width_vox >= 0:
        raise IcetideError(f"taper width must be non-negative, got {width_vox}")
    weights = np.ones(shape, dtype=np.float32)
    if width_vox == 0:
        return weights
    for axis, n in enumerate(shape):
        depth = np.minimum(np.arange(n), np.arange(n)[::-1]) + 0.5  # distance of voxel centres to the faces
        ramp = np.where(depth < width_vox, 0.5 - 0.5 * np.cos(np.pi * depth / width_vox), 1.0)
        weights *= ramp.astype(np.float32).reshape([-1 if a == axis else 1 for a in range(len(shape))])
    return weights


def slab_mask(shape: tuple[int, int, int], thickness: float) -> np.ndarray:
    """Boolean ``(nz, ny, nx)`` mask of the centred slab ``|z| <= thickness / 2`` (voxels, icetide's frame)."""
    nz = shape[0]
    if not thickness > 0:
        raise IcetideError(f"slab thickness must be positive, got {thickness}")
    z = np.arange(nz) - (nz - 1) / 2
    inside = np.abs(z) <= thickness / 2
    return np.broadcast_to(inside[:, None, None], tuple(shape)).copy()
