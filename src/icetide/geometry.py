"""Frames and the single-axis projection geometry (docs/CONVENTIONS.md "Arrays and frames").

Units are pixels of the tilt series (= voxels of the volume). The conventions:

- volume voxel ``(k, j, i)`` of an array ``(nz, ny, nx)`` sits at
  ``(x, y, z) = (i - (nx-1)/2, j - (ny-1)/2, k - (nz-1)/2)``;
- detector pixel ``(r, c)`` of an image ``(ny, nx)`` sits at ``(u, v) = (c - (nx-1)/2, r - (ny-1)/2)``;
- the tilt axis is Y; at tilt ``theta`` a point ``(x, y, z)`` projects to
  ``u = x cos(theta) + z sin(theta)``, ``v = y`` (RELION-5 ``Ry(theta)``);
- the beam direction at tilt ``theta`` is ``(-sin(theta), 0, cos(theta))``;
- ``R(a) = [[cos a, -sin a], [sin a, cos a]]`` rotates ``(u, v)`` counter-clockwise.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = [
    "centered_coords",
    "default_thickness",
    "detector_grid",
    "frame_quarter_turns",
    "rotation_y",
    "rotation_2d",
    "project_points",
    "ray_points",
    "slab_ray_interval",
    "box_to_unit",
    "deg2rad",
    "slab_padding_px",
]


def centered_coords(n: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Coordinates ``i - (n-1)/2`` of the ``n`` sample centres along one axis, shape ``(n,)``."""
    return torch.arange(n, device=device, dtype=dtype) - (n - 1) / 2


def detector_grid(ny: int, nx: int, *, device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Detector coordinates ``(u, v)`` of every pixel, each of shape ``(ny, nx)``."""
    v = centered_coords(ny, device=device, dtype=dtype)
    u = centered_coords(nx, device=device, dtype=dtype)
    vv, uu = torch.meshgrid(v, u, indexing="ij")
    return uu, vv


def rotation_y(theta_rad: torch.Tensor | float) -> torch.Tensor:
    """``Ry(theta)``: maps specimen ``(x, y, z)`` to beam-frame ``(u, v, w)``; shape ``(..., 3, 3)``.

    ``u = x cos + z sin``, ``v = y``, ``w = -x sin + z cos`` (``w`` runs along the beam).
    """
    t = torch.as_tensor(theta_rad)
    c, s = torch.cos(t), torch.sin(t)
    z, o = torch.zeros_like(c), torch.ones_like(c)
    return torch.stack(
        [torch.stack([c, z, s], -1), torch.stack([z, o, z], -1), torch.stack([-s, z, c], -1)], -2
    )


def rotation_2d(alpha_rad: torch.Tensor) -> torch.Tensor:
    """``R(alpha)`` of docs/CONVENTIONS.md, shape ``alpha.shape + (2, 2)``."""
    c, s = torch.cos(alpha_rad), torch.sin(alpha_rad)
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def project_points(xyz: torch.Tensor, theta_rad: torch.Tensor) -> torch.Tensor:
    """Detector position ``(u, v)`` of specimen points.

    ``xyz``: ``(..., 3)`` in ``(x, y, z)`` order; ``theta_rad`` broadcastable to ``xyz[..., 0]``.
    Returns ``(..., 2)`` in ``(u, v)`` order.
    """
    x, y, z = xyz.unbind(-1)
    u = x * torch.cos(theta_rad) + z * torch.sin(theta_rad)
    return torch.stack([u, y], -1)


def ray_points(u: torch.Tensor, v: torch.Tensor, theta_rad: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Specimen points ``(x, y, z)`` at distance ``t`` along the ray of detector point ``(u, v)``.

    All arguments broadcast; ``t`` is measured along the beam from the plane ``w = 0`` (voxel units).
    Returns ``(..., 3)``.
    """
    c, s = torch.cos(theta_rad), torch.sin(theta_rad)
    x = u * c - t * s
    z = u * s + t * c
    y = v + torch.zeros_like(x)
    return torch.stack(torch.broadcast_tensors(x, y, z), -1)


def slab_ray_interval(
    u: torch.Tensor, theta_rad: torch.Tensor, thickness: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Interval ``[t0, t1]`` of the ray parameter inside the slab ``|z| <= thickness/2``.

    The slab is laterally unbounded; ``|theta| < 90`` degrees is assumed. Shapes broadcast.
    """
    c, s = torch.cos(theta_rad), torch.sin(theta_rad)
    h = thickness / 2
    t0 = (-h - u * s) / c
    t1 = (h - u * s) / c
    return t0, t1


def box_to_unit(xyz: torch.Tensor, shape_zyx: tuple[int, int, int]) -> torch.Tensor:
    """Map specimen points onto ``[0, 1]^3`` so that the box's outer voxel faces land on 0 and 1.

    ``xyz``: ``(..., 3)`` in ``(x, y, z)`` order; ``shape_zyx`` the volume shape ``(nz, ny, nx)``.
    Returns ``(..., 3)`` in ``(x, y, z)`` order; each axis is scaled by its own length (tight mapping).
    """
    nz, ny, nx = shape_zyx
    # Per-axis Python scalars: a tensor of the sizes would be a host-to-device copy that waits for a GPU.
    return torch.stack([xyz[..., 0] / nx, xyz[..., 1] / ny, xyz[..., 2] / nz], -1) + 0.5


def deg2rad(a) -> torch.Tensor:
    """Degrees to radians as a float32 tensor (any array-like in)."""
    return torch.as_tensor(np.asarray(a, dtype=np.float64) * (math.pi / 180.0), dtype=torch.float32)


def slab_padding_px(nx: int, nz: int, max_tilt_deg: float) -> int:
    """Columns to add on each side of an ``nx``-wide box so that every ray reaching an ``nx``-wide detector at
    tilts up to ``max_tilt_deg`` crosses a slab of thickness ``nz`` inside it: a ray at ``u`` meets the slab at
    ``|x| <= |u| / cos(theta) + (nz / 2) tan(theta)``."""
    theta = math.radians(abs(max_tilt_deg))
    half_width = (nx / 2) / math.cos(theta) + (nz / 2) * math.tan(theta)
    return max(0, math.ceil(half_width - nx / 2 - 1e-9))


def default_thickness(detector_shape: tuple[int, int]) -> int:
    """The default slab thickness in voxels: half the smaller detector side (at least 8)."""
    return max(8, min(detector_shape) // 2)


def frame_quarter_turns(tilt_axis_deg: float) -> int:
    """Quarter turns ``k`` (``np.rot90``'s, -1, 0 or 1) that bring a tilt axis at ``tilt_axis_deg`` (counter-clockwise
    from the image Y axis) within 45 degrees of the Y axis: ``tilt_axis_deg - 90 k``. The tomogram's Y runs along
    the tilt axis, so a detector whose axis lies nearer its X axis is turned first, and the tomogram spans the
    field along the axis (a 4092 x 5760 detector with the axis at 85 degrees gives a tomogram 5760 long in Y)."""
    k = int(np.round(float(tilt_axis_deg) / 90.0)) % 4
    return {1: 1, 3: -1}.get(k, 0)

