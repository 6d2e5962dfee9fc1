"""Crowded-cell phantoms with known truth (SHREC'21-like), generated without data files.

A phantom is a float32 volume ``(nz, ny, nx)`` (docs/CONVENTIONS.md "Arrays and frames"), density in about
``[0, 1]``. The specimen is the slab ``margin <= k < nz - margin`` of z-slices (``margin = max(1, nz // 16)``); the
density is zero above and below it. Content, drawn from one ``numpy`` generator seeded by ``seed``:

- membranes: thin shells (about 2.5 voxels FWHM) of randomly oriented ellipsoids, cut by the slab;
- filaments: curved rods (actin-like, radius 2-3 voxels) and hollow tubes (microtubule-like, radius 8-11);
- proteins: random compact blobs of 3-7 Gaussians (sigma 1-3 voxels, diameters 4-14 voxels), or, with
  ``proteins_dir``, randomly rotated copies of the ``*.mrc`` density maps found there, resampled to the
  phantom's voxel size. Proteins are placed by rejection so that they do not overlap each other or the
  membranes and filaments (their supports, dilated by one voxel, stay disjoint).

Components are combined with a voxel-wise maximum, so the density never exceeds the largest amplitude (1).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from ..errors import IcetideError
from ..io import read_mrc

__all__ = ["crowded_phantom", "bin_volume"]

# Fraction of the specimen slab that proteins fill before placement stops (SHREC'21 is about this crowded).
_PROTEIN_FRACTION = 0.15
# Density below this fraction of a component's peak counts as empty space for the non-overlap test.
_SUPPORT_LEVEL = 0.05
_SHELL_SIGMA_VOX = 1.1  # Gaussian wall profile: FWHM 2.355 * 1.1 = 2.6 voxels


@dataclass
class _Slab:
    """The specimen slab: z-slices ``z0 <= k < z1`` of a volume ``(nz, ny, nx)``."""

    shape: tuple[int, int, int]
    z0: int
    z1: int

    @classmethod
    def of(cls, shape_zyx: tuple[int, int, int]) -> "_Slab":
        nz = shape_zyx[0]
        margin = max(1, nz // 16)
        return cls(shape_zyx, margin, nz - margin)

    @property
    def thickness(self) -> int:
        return self.z1 - self.z0


def _box(lo_zyx: np.ndarray, hi_zyx: np.ndarray, shape: tuple[int, int, int]) -> tuple[slice, ...] | None:
    """Slices of the voxels between the corners ``lo_zyx`` and ``hi_zyx`` (clipped to the volume), or None."""
    lo = np.maximum(np.floor(lo_zyx).astype(int), 0)
    hi = np.minimum(np.ceil(hi_zyx).astype(int) + 1, shape)
    if np.any(hi <= lo):
        return None
    return tuple(slice(a, b) for a, b in zip(lo, hi))


def _grid(box: tuple[slice, ...], centre_zyx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Open-grid offsets ``(dz, dy, dx)`` of the voxels of ``box`` from ``centre_zyx`` (broadcastable)."""
    dz, dy, dx = np.ogrid[box[0], box[1], box[2]]
    return dz - centre_zyx[0], dy - centre_zyx[1], dx - centre_zyx[2]


def _shell(distance: np.ndarray, amplitude: float) -> np.ndarray:
    """Thin-wall profile: ``amplitude`` on the surface ``distance = 0``, Gaussian across it."""
    return (amplitude * np.exp(-0.5 * (distance / _SHELL_SIGMA_VOX) ** 2)).astype(np.float32)


def _paint(volume: np.ndarray, box: tuple[slice, ...], values: np.ndarray) -> None:
    """Combine ``values`` into ``volume[box]`` by voxel-wise maximum."""
    np.maximum(volume[box], values, out=volume[box])


def _add_membrane(volume: np.ndarray, slab: _Slab, rng: np.random.Generator) -> None:
    """One ellipsoidal shell, randomly oriented, centred in the slab, possibly cut by the box."""
    nz, ny, nx = volume.shape
    lateral = min(ny, nx)
    semi_axes = rng.uniform(0.15, 0.4, size=3) * lateral  # (x, y, z) in the ellipsoid's own frame
    centre = np.array(
        [rng.uniform(slab.z0, slab.z1 - 1), rng.uniform(0, ny - 1), rng.uniform(0, nx - 1)]
    )
    reach = semi_axes.max() + 4 * _SHELL_SIGMA_VOX
    box = _box(centre - reach, centre + reach, volume.shape)
    if box is None:
        return
    dz, dy, dx = _grid(box, centre)
    rot = Rotation.random(random_state=rng).as_matrix()  # body axes as rows act on (x, y, z)
    body = [rot[i, 0] * dx + rot[i, 1] * dy + rot[i, 2] * dz for i in range(3)]
    q = np.sqrt(sum((b / a) ** 2 for b, a in zip(body, semi_axes)))
    grad = np.sqrt(sum((b / a**2) ** 2 for b, a in zip(body, semi_axes))) / np.maximum(q, 1e-6)
    # First-order distance to the surface q = 1; accurate within the few voxels of the wall.
    distance = (q - 1) / np.maximum(grad, 1e-6)
    _paint(volume, box, _shell(distance, rng.uniform(0.55, 0.8)))


def _segment_distance(
    box: tuple[slice, ...], a_zyx: np.ndarray, b_zyx: np.ndarray
) -> np.ndarray:
    """Distance of every voxel of ``box`` to the segment ``a -> b`` (voxel units)."""
    dz, dy, dx = _grid(box, a_zyx)
    d = b_zyx - a_zyx
    t = np.clip((dz * d[0] + dy * d[1] + dx * d[2]) / max(float(d @ d), 1e-12), 0.0, 1.0)
    return np.sqrt((dz - t * d[0]) ** 2 + (dy - t * d[1]) ** 2 + (dx - t * d[2]) ** 2)


def _filament_path(slab: _Slab, radius: float, rng: np.random.Generator) -> np.ndarray:
    """Polyline ``(P, 3)`` in ``(z, y, x)``: a gently curving path across the box, kept inside the slab."""
    nz, ny, nx = slab.shape
    step = 6.0
    zlo, zhi = slab.z0 + radius, slab.z1 - 1 - radius
    if zlo > zhi:  # a slab thinner than the filament: run along its middle, the slab cuts the rest
        zlo = zhi = (slab.z0 + slab.z1 - 1) / 2
    point = np.array([rng.uniform(zlo, zhi), rng.uniform(0, ny - 1), rng.uniform(0, nx - 1)])
    heading = rng.uniform(0, 2 * np.pi)
    elevation = rng.uniform(-0.15, 0.15)
    points = [point]
    for _ in range(int(2 * (ny + nx) / step)):
        heading += rng.normal(0, 0.08)
        elevation = np.clip(elevation + rng.normal(0, 0.05), -0.3, 0.3)
        flat = np.cos(elevation)
        move = step * np.array([np.sin(elevation), flat * np.sin(heading), flat * np.cos(heading)])
        point = points[-1] + move
        if not (zlo <= point[0] <= zhi):
            elevation = -elevation  # bounce off the slab faces
            point[0] = np.clip(point[0], zlo, zhi)
        points.append(point)
        if not (-radius <= point[1] <= ny - 1 + radius and -radius <= point[2] <= nx - 1 + radius):
            break
    return np.asarray(points)


def _add_filament(volume: np.ndarray, slab: _Slab, rng: np.random.Generator) -> None:
    """One filament: a solid rod (actin-like) or, one time in three, a hollow tube (microtubule-like)."""
    tube = rng.uniform() < 1 / 3 and slab.thickness > 26
    radius = rng.uniform(8, 11) if tube else rng.uniform(2, 3)
    amplitude = rng.uniform(0.6, 0.9)
    path = _filament_path(slab, radius, rng)
    reach = radius + 4 * _SHELL_SIGMA_VOX
    outer = _box(path.min(0) - reach, path.max(0) + reach, volume.shape)
    if outer is None:
        return
    # Minimum distance to the whole polyline, so that the wall of a tube stays a single wall at the bends.
    distance = np.full([s.stop - s.start for s in outer], np.inf, dtype=np.float32)
    for a, b in zip(path[:-1], path[1:]):
        box = _box(np.minimum(a, b) - reach, np.maximum(a, b) + reach, volume.shape)
        if box is None:
            continue
        local = tuple(slice(s.start - o.start, s.stop - o.start) for s, o in zip(box, outer))
        np.minimum(distance[local], _segment_distance(box, a, b), out=distance[local])
    if tube:
        values = _shell(distance - radius, amplitude)
    else:
        values = (amplitude / (1 + np.exp((distance - radius) / 0.5))).astype(np.float32)
    _paint(volume, outer, values)


def _blob(rng: np.random.Generator) -> np.ndarray:
    """A compact random particle: 3-7 Gaussians (sigma 1-3 voxels) inside a 4-14 voxel diameter; peak 1."""
    radius = rng.uniform(2, 7)
    half = int(np.ceil(radius)) + 2
    dz, dy, dx = np.ogrid[-half : half + 1, -half : half + 1, -half : half + 1]
    out = np.zeros((2 * half + 1,) * 3)
    for _ in range(rng.integers(3, 8)):
        sigma = rng.uniform(1.0, max(1.0, min(3.0, radius / 1.5)))
        direction = rng.normal(size=3)
        offset = direction / np.linalg.norm(direction) * max(radius - sigma, 0.0) * rng.uniform() ** (1 / 3)
        r2 = (dz - offset[0]) ** 2 + (dy - offset[1]) ** 2 + (dx - offset[2]) ** 2
        out += rng.uniform(0.5, 1.0) * np.exp(-0.5 * r2 / sigma**2)
    out /= out.max()
    out[out < 0.02] = 0.0  # compact support, so that the non-overlap test means something
    return out.astype(np.float32)


def _load_templates(proteins_dir: str | os.PathLike, voxel_size_A: float) -> list[np.ndarray]:
    """The ``*.mrc`` maps of ``proteins_dir`` at ``voxel_size_A``, cropped to their support, peak 1."""
    files = sorted(Path(proteins_dir).glob("*.mrc"))
    if not files:
        raise IcetideError(f"{proteins_dir}: no *.mrc density maps")
    templates = []
    for path in files:
        data, map_voxel_A = read_mrc(path)
        if data.ndim != 3:
            raise IcetideError(f"{path}: expected a 3-D density map, got shape {data.shape}")
        data = np.clip(data, 0, None)
        factor = (map_voxel_A or voxel_size_A) / voxel_size_A
        if abs(factor - 1) > 1e-3:
            data = ndimage.zoom(data, factor, order=1)
        if data.max() <= 0:
            continue
        data = data / data.max()
        support = np.argwhere(data > 0.01)
        lo, hi = support.min(0), support.max(0) + 1
        templates.append(np.ascontiguousarray(data[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]], dtype=np.float32))
    return templates


def _rotated(template: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``template`` under a uniformly random rotation (trilinear), in a cube that holds every rotation."""
    side = int(np.ceil(np.linalg.norm(template.shape))) | 1
    rot = Rotation.random(random_state=rng).as_matrix()
    out_centre = np.full(3, (side - 1) / 2)
    in_centre = (np.asarray(template.shape) - 1) / 2
    # affine_transform maps output index o to input index rot @ (o - out_centre) + in_centre.
    offset = in_centre - rot @ out_centre
    out = ndimage.affine_transform(template, rot, offset=offset, output_shape=(side,) * 3, order=1)
    support = np.argwhere(out > 0.01)
    if support.size == 0:
        return out
    lo, hi = support.min(0), support.max(0) + 1
    return out[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]


def _place(
    volume: np.ndarray, occupied: np.ndarray, particle: np.ndarray, slab: _Slab, rng: np.random.Generator, tries: int
) -> bool:
    """Put ``particle`` at a random free spot inside the slab; False if ``tries`` positions all collide."""
    nz, ny, nx = volume.shape
    particle = np.pad(particle, 1)  # room for the one-voxel dilation of the support
    pz, py, px = particle.shape
    if pz > slab.thickness or py > ny or px > nx:
        return False
    mask = ndimage.binary_dilation(particle > _SUPPORT_LEVEL)
    for _ in range(tries):
        z = int(rng.integers(slab.z0, slab.z1 - pz + 1))
        y = int(rng.integers(0, ny - py + 1))
        x = int(rng.integers(0, nx - px + 1))
        box = (slice(z, z + pz), slice(y, y + py), slice(x, x + px))
        if occupied[box][mask].any():
            continue
        _paint(volume, box, particle * np.float32(rng.uniform(0.5, 1.0)))
        occupied[box] |= mask
        return True
    return False


def crowded_phantom(
    shape_zyx: tuple[int, int, int] = (48, 128, 128),
    seed: int = 0,
    proteins_dir: str | os.PathLike | None = None,
    voxel_size_A: float = 10.0,
) -> np.ndarray:
    """A SHREC'21-like crowded cell slab, float32 ``(nz, ny, nx)``, density in about ``[0, 1]``.

    Membranes, filaments and non-overlapping proteins (random Gaussian blobs, or rotated maps from
    ``proteins_dir`` resampled to ``voxel_size_A``); zero outside the specimen slab. Deterministic for a seed.
    """
    shape = tuple(int(n) for n in shape_zyx)
    if len(shape) != 3 or min(shape) < 8:
        raise IcetideError(f"phantom shape must be 3 sizes of at least 8 voxels, got {shape_zyx}")
    rng = np.random.default_rng(seed)
    slab = _Slab.of(shape)
    volume = np.zeros(shape, dtype=np.float32)
    # Membrane sizes scale with the box, so their number does not; filaments cross it, so theirs grows with it.
    for _ in range(int(rng.integers(2, 4))):
        _add_membrane(volume, slab, rng)
    for _ in range(max(1, round(rng.uniform(2, 5) * min(shape[1:]) / 128))):
        _add_filament(volume, slab, rng)
    volume[: slab.z0] = 0
    volume[slab.z1 :] = 0
    occupied = volume > _SUPPORT_LEVEL * volume.max() if volume.any() else np.zeros(shape, dtype=bool)
    templates = None if proteins_dir is None else _load_templates(proteins_dir, voxel_size_A)
    if templates is not None:
        fits = [t for t in templates if np.linalg.norm(t.shape) <= min(slab.thickness, shape[1], shape[2])]
        if not fits:
            raise IcetideError(f"{proteins_dir}: no density map fits in a {shape} phantom at {voxel_size_A} A/voxel")
        templates = fits
    target = _PROTEIN_FRACTION * slab.thickness * shape[1] * shape[2]
    filled, failures = 0.0, 0
    while filled < target and failures < 30:
        if templates is None:
            particle = _blob(rng)
        else:
            particle = _rotated(templates[rng.integers(len(templates))], rng)
        if _place(volume, occupied, particle, slab, rng, tries=40):
            filled += float((particle > _SUPPORT_LEVEL).sum())
            failures = 0
        else:
            failures += 1
    return volume


def bin_volume(volume: np.ndarray, factor: int) -> np.ndarray:
    """Average-pool ``volume (nz, ny, nx)`` by an integer ``factor`` (cropped to a multiple); float32."""
    volume = np.asarray(volume)
    factor = int(factor)
    if volume.ndim != 3:
        raise IcetideError(f"expected a 3-D volume, got shape {volume.shape}")
    if factor < 1 or factor > min(volume.shape):
        raise IcetideError(
            f"bin factor must be between 1 and {min(volume.shape)} for a {volume.shape} volume, got {factor}"
        )
    nz, ny, nx = (n // factor for n in volume.shape)
    cropped = volume[: nz * factor, : ny * factor, : nx * factor].astype(np.float32, copy=False)
    return cropped.reshape(nz, factor, ny, factor, nx, factor).mean(axis=(1, 3, 5), dtype=np.float64).astype(np.float32)
