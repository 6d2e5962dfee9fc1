"""The per-tilt deformation model (paper eq. 1-5, docs/CONVENTIONS.md "Deformation model").

For tilt ``m`` and detector coordinates ``x = (u, v)`` in pixels, the observed image is

    y_m(x) = P_theta_m[rho]( R(alpha_m) (x + phi_m(x)) - tau_m )

so ``deform_coords`` maps an *observed* pixel ``x`` to the *ideal* projection coordinate ``x'`` it shows.

- ``shifts_px`` ``(M, 2)``: ``tau_m = [du, dv]`` in pixels. With no rotation or local field the observed image
  is the ideal projection translated by ``+tau_m``.
- ``angles_rad`` ``(M,)``: ``alpha_m``; the observed image is the ideal one rotated by ``-alpha_m`` about the
  detector centre. A tilt axis drawn at ``psi`` degrees counter-clockwise from the image Y axis corresponds
  to ``alpha = -psi``.
- ``local_px`` ``(M, 2, N1, N2)``: ``phi_m`` at an ``N1 x N2`` grid of control points, ``[du, dv]``; control
  ``(a, b)`` sits at ``v = -(ny-1)/2 + a (ny-1)/(N1-1)``, ``u = -(nx-1)/2 + b (nx-1)/(N2-1)`` (rows along v,
  first to last pixel centre). Between control points the field is interpolated exactly as PyTorch's
  ``grid_sample(mode=..., align_corners=True, padding_mode="border")`` does: ``"bilinear"``, or ``"bicubic"``
  (Keys cubic convolution with ``a = -0.75``, taps beyond the grid clamped to the edge control points).

Gauge: translating the volume by ``(dx, dy, dz)`` is the same as adding ``(dx cos theta + dz sin theta, dy)``
to every ``tau_m``; :func:`remove_gauge` splits shifts into that part and the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .geometry import centered_coords, deg2rad, detector_grid, rotation_2d

__all__ = [
    "Deformations",
    "local_displacement",
    "local_displacement_grid",
    "deform_coords",
    "deform_grid",
    "sample_images",
    "warp_images",
    "unwarp_images",
    "deformation_penalty",
    "smoothness_penalty",
    "gauge_shifts",
    "remove_gauge",
]

INTERPOLATIONS = ("bilinear", "bicubic")


@dataclass
class Deformations:
    """Per-tilt deformations of a tilt series, as plain arrays (the ``deformations.json`` content).

    Shapes: ``tilt_angles_deg (M,)``, ``shifts_px (M, 2)``, ``angles_deg (M,)``, ``local_px (M, 2, N1, N2)``.
    ``detector_shape`` is ``(ny, nx)`` of the images the deformations refer to.
    """

    tilt_angles_deg: np.ndarray
    shifts_px: np.ndarray
    angles_deg: np.ndarray
    local_px: np.ndarray
    detector_shape: tuple[int, int]
    local_interpolation: str = "bicubic"
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.tilt_angles_deg = np.asarray(self.tilt_angles_deg, dtype=np.float64).reshape(-1)
        m = self.tilt_angles_deg.shape[0]
        self.shifts_px = np.asarray(self.shifts_px, dtype=np.float64).reshape(m, 2)
        self.angles_deg = np.asarray(self.angles_deg, dtype=np.float64).reshape(m)
        self.local_px = np.asarray(self.local_px, dtype=np.float64)
        if self.local_px.ndim != 4 or self.local_px.shape[:2] != (m, 2):
            raise ValueError(f"local_px must have shape (M, 2, N1, N2) with M={m}, got {self.local_px.shape}")
        if min(self.local_px.shape[2:]) < 2:
            raise ValueError(f"local_px needs at least 2 x 2 control points, got {self.local_px.shape[2:]}")
        if self.local_interpolation not in INTERPOLATIONS:
            raise ValueError(f"local_interpolation must be one of {INTERPOLATIONS}, got {self.local_interpolation!r}")
        self.detector_shape = (int(self.detector_shape[0]), int(self.detector_shape[1]))

    @property
    def n_tilts(self) -> int:
        return self.tilt_angles_deg.shape[0]

    @classmethod
    def identity(
        cls,
        tilt_angles_deg,
        detector_shape: tuple[int, int],
        grid: tuple[int, int] = (2, 2),
        local_interpolation: str = "bicubic",
    ) -> "Deformations":
        """No deformation at all (zero shifts, rotations and local fields)."""
        m = len(np.asarray(tilt_angles_deg).reshape(-1))
        return cls(
            tilt_angles_deg,
            np.zeros((m, 2)),
            np.zeros(m),
            np.zeros((m, 2, *grid)),
            detector_shape,
            local_interpolation,
        )

    def tensors(self, device=None) -> dict[str, torch.Tensor]:
        """``shifts_px``, ``angles_rad`` and ``local_px`` as float32 tensors (the model's parameters)."""
        return {
            "shifts_px": torch.as_tensor(self.shifts_px, dtype=torch.float32, device=device),
            "angles_rad": deg2rad(self.angles_deg).to(device),
            "local_px": torch.as_tensor(self.local_px, dtype=torch.float32, device=device),
        }

    def scaled(self, factor: float, detector_shape: tuple[int, int]) -> "Deformations":
        """The same deformations on a detector sampled ``factor`` times finer (``detector_shape``): shifts and
        local fields in its pixels, rotations unchanged (e.g. an alignment fitted on a binned series, for the
        unbinned stack)."""
        return Deformations(
            self.tilt_angles_deg, self.shifts_px * factor, self.angles_deg, self.local_px * factor,
            detector_shape, self.local_interpolation, dict(self.extra),
        )

    def quarter_turned(self, k: int) -> "Deformations":
        """The same deformations for the images turned by ``k`` quarter turns as ``np.rot90(image, k)`` turns
        them (:meth:`icetide.data.TiltSeries.quarter_turned`): a pixel at ``x`` comes to ``Q x``, ``Q = R(-90 k
        degrees)``, so the rotations grow by ``90 k`` degrees, the shifts stay and the local fields' control grid
        and vectors turn with the images. Exact: both describe the same map to the ideal projection."""
        k = (int(k) + 1) % 4 - 1  # -1, 0, 1 or 2: the smallest turn
        q = np.round(rotation_2d(deg2rad(-90.0 * k)).numpy()).astype(np.float64)
        local = np.einsum("ij,mjab->miab", q, np.rot90(self.local_px, k, axes=(2, 3)))
        shape = self.detector_shape if k % 2 == 0 else self.detector_shape[::-1]
        return Deformations(
            self.tilt_angles_deg, self.shifts_px.copy(), self.angles_deg + 90.0 * k, np.ascontiguousarray(local),
            shape, self.local_interpolation, dict(self.extra),
        )

    def subset(self, index) -> "Deformations":
        """The deformations of the tilts selected by ``index`` (a mask or integer array)."""
        return Deformations(
            self.tilt_angles_deg[index],
            self.shifts_px[index],
            self.angles_deg[index],
            self.local_px[index],
            self.detector_shape,
            self.local_interpolation,
            dict(self.extra),
        )


def _normalised(u: torch.Tensor, v: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Centred pixel coordinates -> ``grid_sample`` coordinates (align_corners=True), ``(..., 2)``."""
    ny, nx = shape
    return torch.stack([u / max((nx - 1) / 2, 1e-12), v / max((ny - 1) / 2, 1e-12)], -1)


def local_displacement(
    local_px: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    detector_shape: tuple[int, int],
    interpolation: str = "bicubic",
) -> torch.Tensor:
    """Local field ``phi_m`` at detector points.

    ``local_px``: ``(M, 2, N1, N2)``; ``u, v``: ``(M, H, W)`` (or broadcastable to it) in centred pixels.
    Returns ``(M, H, W, 2)`` displacements ``[du, dv]`` in pixels. Differentiable in ``local_px``.
    """
    m = local_px.shape[0]
    u, v = torch.broadcast_tensors(u, v)
    if u.dim() == 2:
        u, v = u.expand(m, *u.shape), v.expand(m, *v.shape)
    grid = _normalised(u, v, detector_shape).to(local_px.dtype)
    out = F.grid_sample(local_px, grid, mode=interpolation, padding_mode="border", align_corners=True)
    return out.permute(0, 2, 3, 1)


def _control_weights(coords_px: torch.Tensor, n_px: int, n_controls: int, interpolation: str) -> torch.Tensor:
    """Weights ``(n, n_controls)`` of one axis's control points at centred pixel coordinates ``coords_px`` ``(n,)``
    of an axis of ``n_px`` pixels, as ``grid_sample(align_corners=True, padding_mode="border")`` takes them:
    bilinear on the coordinate clipped to the grid, or the 4 Keys taps (``a = -0.75``) clamped to the edges."""
    pos = (coords_px / max((n_px - 1) / 2, 1e-12) + 1) / 2 * (n_controls - 1)  # grid_sample's unnormalisation
    if interpolation == "bilinear":
        pos = pos.clamp(0, n_controls - 1)
        lower = pos.floor()
        t = (pos - lower)[:, None]
        taps, weights = lower[:, None] + torch.arange(2, device=pos.device), torch.cat([1 - t, t], 1)
    elif interpolation == "bicubic":
        lower = pos.floor()
        t = (pos - lower)[:, None]
        a = -0.75
        near = torch.cat([t, 1 - t], 1)  # taps 1 and 2, |distance| <= 1
        far = torch.cat([t + 1, 2 - t], 1)  # taps 0 and 3, 1 <= |distance| < 2
        near_w = ((a + 2) * near - (a + 3)) * near * near + 1
        far_w = ((a * far - 5 * a) * far + 8 * a) * far - 4 * a
        taps = lower[:, None] + torch.arange(-1, 3, device=pos.device)
        weights = torch.stack([far_w[:, 0], near_w[:, 0], near_w[:, 1], far_w[:, 1]], 1)
    else:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, not {interpolation!r}")
    out = torch.zeros(len(pos), n_controls, dtype=pos.dtype, device=pos.device)
    return out.scatter_add_(1, taps.clamp(0, n_controls - 1).long(), weights)


def local_displacement_grid(
    local_px: torch.Tensor,
    u_px: torch.Tensor,
    v_px: torch.Tensor,
    detector_shape: tuple[int, int],
    interpolation: str = "bicubic",
) -> torch.Tensor:
    """:func:`local_displacement` at every point of the grid ``v_px (H,) x u_px (W,)`` (rows along v).

    The interpolation is separable, so the field is two matrix products per tilt, ``W_v phi_m W_u^T``, instead
    of ``grid_sample`` (whose backward scatters each pixel's 16 taps into the few control points). Returns
    ``(M, H, W, 2)``; the same values up to rounding. Differentiable in ``local_px``.
    """
    ny, nx = detector_shape
    n1, n2 = local_px.shape[-2:]
    w_u = _control_weights(u_px.to(local_px.dtype), nx, n2, interpolation)
    w_v = _control_weights(v_px.to(local_px.dtype), ny, n1, interpolation)
    return (w_v @ (local_px @ w_u.T)).permute(0, 2, 3, 1)


def _rigid(x: torch.Tensor, angles_rad: torch.Tensor, shifts_px: torch.Tensor) -> torch.Tensor:
    """``R(alpha_m) x - tau_m`` of points ``x`` ``(M, H, W, 2)``."""
    x = torch.einsum("mij,mhwj->mhwi", rotation_2d(angles_rad), x)
    return x - shifts_px[:, None, None, :]


def deform_coords(
    u: torch.Tensor,
    v: torch.Tensor,
    shifts_px: torch.Tensor,
    angles_rad: torch.Tensor,
    local_px: torch.Tensor | None,
    detector_shape: tuple[int, int],
    interpolation: str = "bicubic",
) -> torch.Tensor:
    """Ideal-projection coordinates ``R(alpha)(x + phi(x)) - tau`` of observed detector points ``x = (u, v)``.

    ``u, v``: ``(M, H, W)`` or ``(H, W)`` (shared by all tilts); ``shifts_px (M, 2)``, ``angles_rad (M,)``,
    ``local_px (M, 2, N1, N2)`` or ``None`` (no local field). Returns ``(M, H, W, 2)`` as ``(u', v')``.
    """
    m = shifts_px.shape[0]
    u, v = torch.broadcast_tensors(u, v)
    if u.dim() == 2:
        u, v = u.expand(m, *u.shape), v.expand(m, *v.shape)
    x = torch.stack([u, v], -1)
    if local_px is not None:
        x = x + local_displacement(local_px, u, v, detector_shape, interpolation)
    return _rigid(x, angles_rad, shifts_px)


def deform_grid(u_px: torch.Tensor, v_px: torch.Tensor, shifts_px: torch.Tensor, angles_rad: torch.Tensor,
                local_px: torch.Tensor | None, detector_shape: tuple[int, int],
                interpolation: str = "bicubic") -> torch.Tensor:
    """:func:`deform_coords` of every point of the grid ``v_px (H,) x u_px (W,)`` (rows along v), the local
    field evaluated separably (:func:`local_displacement_grid`). Returns ``(M, H, W, 2)`` as ``(u', v')``."""
    vv, uu = torch.meshgrid(v_px, u_px, indexing="ij")
    x = torch.stack([uu, vv], -1).expand(shifts_px.shape[0], -1, -1, -1)
    if local_px is not None:
        x = x + local_displacement_grid(local_px, u_px, v_px, detector_shape, interpolation)
    return _rigid(x, angles_rad, shifts_px)


def sample_images(
    images: torch.Tensor, coords: torch.Tensor, mode: str = "bilinear", fill: str | float = 0.0
) -> torch.Tensor:
    """Sample images at centred pixel coordinates.

    ``images``: ``(M, Hi, Wi)`` in the centred frame of their own shape; ``coords``: ``(M, H, W, 2)`` as
    ``(u, v)``. ``fill`` is the value outside the images: a number, or ``"mean"`` (each image's mean).
    Returns ``(M, H, W)``. Differentiable in ``images`` and ``coords``.
    """
    hi, wi = images.shape[-2:]
    grid = _normalised(coords[..., 0], coords[..., 1], (hi, wi)).to(images.dtype)
    # A number stays a Python scalar: a tensor made from it would be a host-to-device copy that waits.
    offset = images.mean(dim=(-2, -1), keepdim=True) if fill == "mean" else float(fill)
    out = F.grid_sample((images - offset)[:, None], grid, mode=mode, padding_mode="zeros", align_corners=True)
    return out[:, 0] + offset


def warp_images(
    ideal: torch.Tensor,
    shifts_px: torch.Tensor,
    angles_rad: torch.Tensor,
    local_px: torch.Tensor | None,
    interpolation: str = "bicubic",
    mode: str = "bilinear",
) -> torch.Tensor:
    """Apply the deformation to ideal projections: ``observed(x) = ideal(R(alpha)(x + phi(x)) - tau)``.

    ``ideal``: ``(M, ny, nx)``. Returns ``(M, ny, nx)``; outside the ideal images the value is 0.
    """
    ny, nx = shape = tuple(ideal.shape[-2:])
    u, v = (centered_coords(n, device=ideal.device, dtype=ideal.dtype) for n in (nx, ny))
    coords = deform_grid(u, v, shifts_px, angles_rad, local_px, shape, interpolation)
    return sample_images(ideal, coords, mode=mode)


def unwarp_images(
    observed: torch.Tensor,
    shifts_px: torch.Tensor,
    angles_rad: torch.Tensor,
    local_px: torch.Tensor | None,
    interpolation: str = "bicubic",
    mode: str = "bilinear",
    iterations: int = 20,
) -> torch.Tensor:
    """Undo the deformation: the aligned image ``a`` with ``observed(x) = a(R(alpha)(x + phi(x)) - tau)``.

    For each aligned pixel ``x'`` the observed point ``x`` solves ``x = R(-alpha)(x' + tau) - phi(x)``
    (fixed-point iteration; converges for the small, smooth fields of this model). ``observed``:
    ``(M, ny, nx)``; pixels whose source lies outside the image get the image's mean. Returns ``(M, ny, nx)``.
    """
    shape = tuple(observed.shape[-2:])
    m = observed.shape[0]
    u, v = detector_grid(*shape, device=observed.device, dtype=observed.dtype)
    target = torch.stack([u, v], -1).expand(m, *shape, 2)
    rot_inv = rotation_2d(-angles_rad)
    base = torch.einsum("mij,mhwj->mhwi", rot_inv, target + shifts_px[:, None, None, :])
    x = base
    if local_px is not None:
        for _ in range(iterations):
            x = base - local_displacement(local_px, x[..., 0], x[..., 1], shape, interpolation)
    return sample_images(observed, x, mode=mode, fill="mean")


def deformation_penalty(
    shifts_px: torch.Tensor,
    angles_rad: torch.Tensor,
    local_px: torch.Tensor | None,
    weights: tuple[float, float, float],
    detector_shape: tuple[int, int],
    interpolation: str = "bicubic",
    mesh: int = 16,
) -> torch.Tensor:
    """Paper eq. 7, averaged over the given tilts: ``l1 |alpha| + l2 ||tau||_2 + l3 RMS(phi)``.

    ``RMS(phi)`` is the root mean square of the local field on a uniform ``mesh x mesh`` grid over the
    detector. ``weights = (l1, l2, l3)``. Returns a scalar.
    """
    l1, l2, l3 = weights
    total = l1 * angles_rad.abs().mean() + l2 * torch.linalg.vector_norm(shifts_px, dim=-1).mean()
    if local_px is not None and l3 > 0:
        ny, nx = detector_shape
        u, v = (torch.linspace(-(n - 1) / 2, (n - 1) / 2, mesh, device=local_px.device) for n in (nx, ny))
        phi = local_displacement_grid(local_px, u, v, detector_shape, interpolation)
        rms = phi.square().sum(-1).mean(dim=(1, 2)).add(1e-12).sqrt()
        total = total + l3 * rms.mean()
    return total


def smoothness_penalty(shifts_px: torch.Tensor) -> torch.Tensor:
    """Random-walk prior on shifts ``(M, 2)`` given in acquisition order: the mean squared difference between
    consecutive tilts' shifts, px^2 (0 for fewer than two tilts). Blind to a common shift."""
    if shifts_px.shape[0] < 2:
        return shifts_px.sum() * 0.0
    return (shifts_px[1:] - shifts_px[:-1]).square().sum(-1).mean()


def gauge_shifts(translation_xyz, tilt_angles_deg) -> np.ndarray:
    """Per-tilt shifts ``(M, 2)`` equivalent to translating the volume by ``(dx, dy, dz)`` voxels."""
    dx, dy, dz = np.asarray(translation_xyz, dtype=np.float64)
    t = np.deg2rad(np.asarray(tilt_angles_deg, dtype=np.float64))
    return np.stack([dx * np.cos(t) + dz * np.sin(t), np.full_like(t, dy)], -1)


def remove_gauge(shifts_px, tilt_angles_deg) -> tuple[np.ndarray, np.ndarray]:
    """Split shifts into the best-fitting volume translation and the rest (least squares).

    Returns ``(residual_shifts (M, 2), translation_xyz (3,))`` with
    ``shifts = residual + gauge_shifts(translation, tilt_angles_deg)``.
    """
    s = np.asarray(shifts_px, dtype=np.float64)
    t = np.deg2rad(np.asarray(tilt_angles_deg, dtype=np.float64))
    a = np.stack([np.cos(t), np.sin(t)], -1)
    (dx, dz), *_ = np.linalg.lstsq(a, s[:, 0], rcond=None)
    dy = s[:, 1].mean()
    translation = np.array([dx, dy, dz])
    return s - gauge_shifts(translation, tilt_angles_deg), translation
