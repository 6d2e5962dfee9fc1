"""Explicit-grid tomography: projector, its exact adjoint, FBP and SIRT (geometry: docs/CONVENTIONS.md).

Projection model (distance-driven, the 2-D "box footprint" model of De Man & Basu applied to every ``y`` row):
at tilt ``theta`` voxel ``(k, j, i)`` projects to detector row ``j`` at ``u = x cos(theta) + z sin(theta)``
(``x = i - (nx-1)/2``, ``z = k - (nz-1)/2``, ``u = c - (n_u-1)/2``). Its footprint on the detector is a box of
width ``max(|cos|, |sin|)`` centred there (the shadow of the voxel's side that faces the beam most), and the
voxel's value is shared between the detector bins (width 1) in proportion to the overlap. Hence

- a voxel of density 1 puts a total mass of exactly 1 on the detector at every angle;
- a constant slab of thickness ``t`` projects to exactly ``t / cos(theta)`` for ``|theta| <= 45`` degrees (each
  z-row tiles the detector without gap or overlap) and to ``t / cos(theta)`` within about ``cos(theta) / (t tan
  theta)`` relative for larger tilts (columns are stepped in whole voxels), away from the lateral edges;
- every voxel touches at most two bins, so each tilt is a sparse matrix with two entries per voxel.

The matrices are built per chunk of tilts (memory stays bounded) and applied with sparse-dense products in
which the ``y`` rows are the contiguous dense dimension. :func:`project` and :func:`backproject` are exact
adjoints (same matrix, transposed) and each one's autograd backward is the other one. Building the matrices
costs about ten times applying them, so the last few geometries are kept (``MATRIX_CACHE_SIZE``), keyed by the
sorted tilt angles: the lattice renderer projects the same tilts, in a new order, at every training step.
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from typing import Callable

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from .deform import Deformations, unwarp_images
from .errors import IcetideError
from .geometry import centered_coords

__all__ = [
    "standardised",
    "project",
    "backproject",
    "ramp_filter",
    "angular_weights",
    "fbp",
    "sirt",
    "align_series",
    "fbp_deformed",
    "FILTERS",
]

FILTERS = ("ramp", "hann", "shepp-logan")

# Voxel-tilt pairs per sparse matrix (at most two entries each): about 35 MB of matrix and 150 MB of
# temporaries while building one.
CHUNK_VOXEL_TILTS = 2**21
# Geometries whose system matrices are kept between calls (least recently used first out).
MATRIX_CACHE_SIZE = 4
# Tilts filtered at once by FBP: bounds the padded FFT buffers (8 x 4k x 8k complex = 2 GB at most).
FILTER_CHUNK_TILTS = 8


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sparse products run in float32 or float64; anything else is computed in float32."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _tilt_chunks(n_tilts: int, n_voxels: int) -> list[slice]:
    step = max(1, CHUNK_VOXEL_TILTS // max(n_voxels, 1))
    return [slice(b, min(b + step, n_tilts)) for b in range(0, n_tilts, step)]


def _system_matrix_t(
    tilt_angles_rad: torch.Tensor, nz: int, nx: int, n_u: int, dtype: torch.dtype
) -> torch.Tensor:
    """Transposed system matrix of a chunk of tilts: CSR ``(nz * nx, B * n_u)``.

    Row ``k * nx + i`` holds the weights with which voxel column ``(k, i)`` (every ``y``) enters detector
    column ``b * n_u + c`` of tilt ``b``; entries off the detector or of zero weight are left out.
    """
    device = tilt_angles_rad.device
    theta = tilt_angles_rad.detach().to(torch.float64)
    b = theta.shape[0]
    cos, sin = torch.cos(theta), torch.sin(theta)
    x = centered_coords(nx, device=device, dtype=torch.float64)
    z = centered_coords(nz, device=device, dtype=torch.float64)
    # Built directly in row order (voxel k, voxel i, tilt, tap): rows of the CSR, columns increasing.
    pos = x[None, :, None] * cos + z[:, None, None] * sin + (n_u - 1) / 2  # (nz, nx, B), detector index
    width = torch.maximum(cos.abs(), sin.abs())
    left = torch.floor(pos)
    # Fraction of the footprint [pos - width/2, pos + width/2] beyond the bin boundary left + 1/2.
    w1 = ((pos - left - 0.5) / width + 0.5).clamp_(0.0, 1.0)
    del pos
    weights = torch.stack([1.0 - w1, w1], -1).to(dtype)  # (nz, nx, B, 2)
    del w1
    left = left.long()
    taps = torch.stack([left, left + 1], -1)
    del left
    keep = (taps >= 0) & (taps < n_u) & (weights > 0)
    n_vox = nz * nx
    keep = keep.view(n_vox, 2 * b)
    cols = (taps + (torch.arange(b, device=device) * n_u)[:, None]).view(n_vox, 2 * b)[keep]
    del taps
    weights = weights.view(n_vox, 2 * b)[keep]
    index_dtype = torch.int32 if max(b * n_u, int(cols.numel())) < 2**31 - 1 else torch.int64
    crow = torch.zeros(n_vox + 1, dtype=index_dtype, device=device)
    crow[1:] = torch.cumsum(keep.sum(1), 0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(
            crow,
            cols.to(index_dtype),
            weights,
            size=(n_vox, b * n_u),
            check_invariants=False,
        )


def _csr_transpose(matrix: torch.Tensor) -> torch.Tensor:
    """The transpose as CSR (CSR products are what every backend supports)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return matrix.t().to_sparse_csr()


class _SystemMatrix:
    """The projector of one geometry: sparse matrices per chunk of tilts, built on first use and kept.

    Works on *columns* ``(nz * nx, ny)`` (the volume with its y rows contiguous) and *rows*
    ``(B, n_u, ny)`` (the projections likewise), in ``dtype``.
    """

    def __init__(self, theta: torch.Tensor, nz: int, nx: int, n_u: int, dtype: torch.dtype):
        self.theta, self.nz, self.nx, self.n_u, self.dtype = theta, nz, nx, n_u, dtype
        self.chunks = _tilt_chunks(theta.shape[0], nz * nx)
        self._transposed: dict[int, torch.Tensor] = {}
        self._forward: dict[int, torch.Tensor] = {}

    def transposed(self, index: int) -> torch.Tensor:
        if index not in self._transposed:
            theta = self.theta[self.chunks[index]]
            self._transposed[index] = _system_matrix_t(theta, self.nz, self.nx, self.n_u, self.dtype)
        return self._transposed[index]

    def forward(self, index: int) -> torch.Tensor:
        if index not in self._forward:
            self._forward[index] = _csr_transpose(self.transposed(index))
        return self._forward[index]

    def project(self, columns: torch.Tensor) -> torch.Tensor:
        """``columns (nz * nx, ny)`` -> ``rows (B, n_u, ny)``."""
        ny = columns.shape[1]
        out = [(self.forward(i) @ columns).view(-1, self.n_u, ny) for i in range(len(self.chunks))]
        return torch.cat(out, 0) if len(out) > 1 else out[0]

    def backproject(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows (B, n_u, ny)`` -> ``columns (nz * nx, ny)``."""
        ny = rows.shape[2]
        out = torch.zeros(self.nz * self.nx, ny, dtype=rows.dtype, device=rows.device)
        for i, chunk in enumerate(self.chunks):
            out.addmm_(self.transposed(i), rows[chunk].reshape(-1, ny))
        return out


def _angles(tilt_angles_rad) -> torch.Tensor:
    """Tilt angles as a float64 host tensor (angles on a GPU are copied back, which waits for it)."""
    return torch.as_tensor(tilt_angles_rad).detach().to("cpu", torch.float64).reshape(-1)


_MATRIX_CACHE: OrderedDict[tuple, _SystemMatrix] = OrderedDict()


def _system_matrix(
    theta: torch.Tensor, nz: int, nx: int, n_u: int, dtype: torch.dtype, device: torch.device
) -> _SystemMatrix:
    """The (cached) projector on ``device`` of tilts ``theta`` (float64 on the host, sorted by the callers)
    for an ``nz x nx`` slice; found in the cache without touching the device."""
    key = (theta.numpy().tobytes(), nz, nx, n_u, dtype, device)
    matrix = _MATRIX_CACHE.pop(key, None) or _SystemMatrix(theta.to(device), nz, nx, n_u, dtype)
    _MATRIX_CACHE[key] = matrix
    while len(_MATRIX_CACHE) > MATRIX_CACHE_SIZE:
        _MATRIX_CACHE.popitem(last=False)
    return matrix


def _sorted_order(theta: torch.Tensor) -> torch.Tensor | None:
    """The permutation that sorts host angles ``theta``, or None when they are sorted already."""
    order = torch.argsort(theta)
    return None if bool((order == torch.arange(len(theta))).all()) else order


def _volume_to_columns(volume: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    nz, ny, nx = volume.shape
    return volume.to(dtype).permute(0, 2, 1).reshape(nz * nx, ny)


def _columns_to_volume(columns: torch.Tensor, nz: int, nx: int) -> torch.Tensor:
    return columns.view(nz, nx, -1).permute(0, 2, 1).contiguous()


def _projections_to_rows(projections: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return projections.to(dtype).transpose(1, 2).contiguous()


def _rows_to_projections(rows: torch.Tensor) -> torch.Tensor:
    return rows.transpose(1, 2).contiguous()


def _apply_project(matrix: _SystemMatrix, volume: torch.Tensor) -> torch.Tensor:
    """``volume (nz, ny, nx)`` -> projections ``(B, ny, n_u)`` in the volume's dtype."""
    rows = matrix.project(_volume_to_columns(volume, matrix.dtype))
    return _rows_to_projections(rows).to(volume.dtype)


def _apply_backproject(matrix: _SystemMatrix, projections: torch.Tensor) -> torch.Tensor:
    """``projections (B, ny, n_u)`` -> volume ``(nz, ny, nx)`` in the projections' dtype."""
    columns = matrix.backproject(_projections_to_rows(projections, matrix.dtype))
    return _columns_to_volume(columns, matrix.nz, matrix.nx).to(projections.dtype)


class _Project(torch.autograd.Function):
    @staticmethod
    def forward(ctx, volume: torch.Tensor, matrix: _SystemMatrix) -> torch.Tensor:
        ctx.matrix = matrix
        return _apply_project(matrix, volume)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        return _apply_backproject(ctx.matrix, grad), None


class _Backproject(torch.autograd.Function):
    @staticmethod
    def forward(ctx, projections: torch.Tensor, matrix: _SystemMatrix) -> torch.Tensor:
        ctx.matrix = matrix
        return _apply_backproject(matrix, projections)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        return _apply_project(ctx.matrix, grad), None


def project(volume: torch.Tensor, tilt_angles_rad, n_u: int | None = None) -> torch.Tensor:
    """Line integrals (voxel-length units) of ``volume (nz, ny, nx)`` at each tilt -> ``(B, ny, n_u)``.

    ``tilt_angles_rad``: ``(B,)``; ``n_u``: detector width in pixels (default ``nx``), centred on the volume.
    Differentiable with respect to ``volume`` (the backward pass is :func:`backproject`).
    """
    if volume.dim() != 3:
        raise ValueError(f"volume must have shape (nz, ny, nx), got {tuple(volume.shape)}")
    nz, _, nx = volume.shape
    n_u = nx if n_u is None else int(n_u)
    theta = _angles(tilt_angles_rad)
    order = _sorted_order(theta)
    in_order = theta if order is None else theta[order]
    matrix = _system_matrix(in_order, nz, nx, n_u, _work_dtype(volume.dtype), volume.device)
    projections = _Project.apply(volume, matrix)
    if order is None:
        return projections
    return projections[torch.argsort(order).to(volume.device, non_blocking=True)]


def backproject(projections: torch.Tensor, tilt_angles_rad, nz: int, nx: int) -> torch.Tensor:
    """Exact adjoint of :func:`project`: ``projections (B, ny, n_u)`` -> volume ``(nz, ny, nx)``.

    Differentiable with respect to ``projections`` (the backward pass is :func:`project`).
    """
    if projections.dim() != 3:
        raise ValueError(f"projections must have shape (B, ny, n_u), got {tuple(projections.shape)}")
    theta = _angles(tilt_angles_rad)
    if theta.shape[0] != projections.shape[0]:
        raise ValueError(f"{theta.shape[0]} tilt angles for {projections.shape[0]} projections")
    order = _sorted_order(theta)
    if order is not None:
        theta, projections = theta[order], projections[order.to(projections.device, non_blocking=True)]
    matrix = _system_matrix(theta, int(nz), int(nx), projections.shape[2], _work_dtype(projections.dtype),
                            projections.device)
    return _Backproject.apply(projections, matrix)


def _filter_response(size: int, filter: str, device) -> torch.Tensor:
    """Frequency response ``(size // 2 + 1,)`` of the discrete ramp filter (times an apodisation window).

    The ramp is the DFT of the band-limited spatial kernel (Kak & Slaney eq. 61, unit sampling):
    ``h[0] = 1/4``, ``h[n] = -1 / (pi n)^2`` for odd ``n``, 0 for even ``n``. Its response follows ``|f|``
    (``f`` in cycles per pixel, 0.5 at Nyquist) but keeps the small positive value at ``f = 0`` that sampling
    ``|f|`` directly would zero, which would offset the reconstruction's mean.
    """
    if filter not in FILTERS:
        raise IcetideError(f"unknown filter {filter!r} (use {', '.join(FILTERS)})")
    n = np.minimum(np.arange(size), size - np.arange(size))  # circular distance
    kernel = np.zeros(size)
    kernel[0] = 0.25
    odd = n % 2 == 1
    kernel[odd] = -1.0 / (np.pi * n[odd]) ** 2
    response = np.fft.rfft(kernel).real
    freq = np.fft.rfftfreq(size)  # cycles per pixel, 0 .. 0.5
    if filter == "hann":
        response *= 0.5 * (1.0 + np.cos(2.0 * np.pi * freq))
    elif filter == "shepp-logan":
        response *= np.sinc(freq)
    return torch.as_tensor(response, dtype=torch.float64, device=device)


def ramp_filter(projections: torch.Tensor, filter: str = "ramp", axis: int = -1) -> torch.Tensor:
    """Filter every line of ``projections`` along ``axis`` with the discrete ramp filter.

    Lines are zero-padded to at least twice their length (a power of two) so that the circular convolution
    does not wrap. ``filter``: ``"ramp"``, ``"hann"`` (ramp times ``(1 + cos(2 pi f)) / 2``) or
    ``"shepp-logan"`` (ramp times ``sinc(f)``). Same shape and dtype as the input.
    """
    n = projections.shape[axis]
    size = max(64, 1 << math.ceil(math.log2(2 * n)))
    dtype = _work_dtype(projections.dtype)
    response = _filter_response(size, filter, projections.device).to(dtype)
    lines = projections.movedim(axis, -1).to(dtype)
    filtered = torch.fft.irfft(torch.fft.rfft(lines, n=size) * response, n=size)[..., :n]
    return filtered.movedim(-1, axis).to(projections.dtype)


def angular_weights(tilt_angles_deg) -> np.ndarray:
    """Angular interval (radians) that each tilt stands for, ``(M,)``, for the FBP sum over angles.

    Each tilt owns the interval between the midpoints to its neighbours (in sorted order); the first and
    last tilts own the whole gap to their single neighbour. Uniform steps ``d`` give ``d`` everywhere, so
    ``M`` tilts evenly covering 180 degrees weigh ``pi / M`` each. A single tilt weighs ``pi``.
    """
    angles = np.deg2rad(np.asarray(tilt_angles_deg, dtype=np.float64).reshape(-1))
    if angles.shape[0] == 1:
        return np.array([np.pi])
    order = np.argsort(angles, kind="stable")
    gaps = np.diff(angles[order])
    owned = np.empty_like(angles)
    owned[1:-1] = (gaps[:-1] + gaps[1:]) / 2
    owned[0], owned[-1] = gaps[0], gaps[-1]
    weights = np.empty_like(angles)
    weights[order] = owned
    return weights


def _as_series(projections) -> torch.Tensor:
    if isinstance(projections, np.ndarray) and not projections.flags.writeable:
        projections = projections.copy()  # torch cannot wrap read-only memory (e.g. a memory-mapped MRC)
    series = torch.as_tensor(projections)
    if series.dim() != 3:
        raise IcetideError(f"expected a tilt series (n_tilts, ny, nx), got shape {tuple(series.shape)}")
    return series.to(torch.float32)


def _check_angles(tilt_angles_deg, n_tilts: int) -> np.ndarray:
    angles = np.asarray(
        tilt_angles_deg.detach().cpu() if isinstance(tilt_angles_deg, torch.Tensor) else tilt_angles_deg,
        dtype=np.float64,
    ).reshape(-1)
    if angles.shape[0] != n_tilts:
        raise IcetideError(f"{angles.shape[0]} tilt angles for {n_tilts} images")
    return angles


def _check_thickness(thickness: int) -> int:
    if int(thickness) < 1:
        raise IcetideError(f"thickness must be a positive number of voxels, got {thickness}")
    return int(thickness)


def fbp(projections, tilt_angles_deg, thickness: int, filter: str = "ramp") -> torch.Tensor:
    """Filtered backprojection of a tilt series ``(M, ny, nx)`` -> volume ``(thickness, ny, nx)``, float32.

    Each detector row is ramp-filtered along ``u`` (:func:`ramp_filter`), weighted by its tilt's angular
    interval (:func:`angular_weights`) and backprojected (:func:`backproject`): over a full 180-degree range
    the result has the density units of the projected volume; over a limited range it is the standard
    weighted backprojection with the same per-angle weights. Runs on the device of ``projections``.
    """
    series = _as_series(projections)
    angles = _check_angles(tilt_angles_deg, series.shape[0])
    thickness = _check_thickness(thickness)
    weights = torch.as_tensor(angular_weights(angles), dtype=torch.float32, device=series.device)
    filtered = torch.empty_like(series)
    for start in range(0, series.shape[0], FILTER_CHUNK_TILTS):
        chunk = slice(start, start + FILTER_CHUNK_TILTS)
        filtered[chunk] = ramp_filter(series[chunk], filter) * weights[chunk, None, None]
    theta = _angles(np.deg2rad(angles)).to(series.device)
    return _apply_backproject(_SystemMatrix(theta, thickness, series.shape[2], series.shape[2], torch.float32), filtered)


def _inverse(sums: torch.Tensor) -> torch.Tensor:
    """``1 / sums`` where positive, else 0."""
    return torch.where(sums > 0, 1.0 / sums.clamp(min=1e-30), 0.0)


def sirt(
    projections,
    tilt_angles_deg,
    thickness: int,
    iterations: int = 30,
    positivity: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """SIRT: ``x <- x + C A^T R (b - A x)`` from ``x = 0``; returns ``(thickness, ny, nx)``, float32.

    ``A`` is :func:`project`, ``R`` and ``C`` the inverse row and column sums of ``A`` (zero where a sum is
    zero). ``positivity`` clamps negative densities to 0 after every update. ``progress(done, total)`` is
    called after each iteration. Runs on the device of ``projections``.
    """
    series = _as_series(projections)
    angles = _check_angles(tilt_angles_deg, series.shape[0])
    thickness = _check_thickness(thickness)
    if iterations < 1:
        raise IcetideError(f"iterations must be at least 1, got {iterations}")
    n_tilts, ny, nx = series.shape
    theta = _angles(np.deg2rad(angles)).to(series.device)
    matrix = _SystemMatrix(theta, thickness, nx, nx, torch.float32)  # built once for all iterations
    # A acts identically on every y row, so its sums need one row only.
    inv_rows = _inverse(_apply_project(matrix, series.new_ones(thickness, 1, nx)))
    inv_cols = _inverse(_apply_backproject(matrix, series.new_ones(n_tilts, 1, nx)))
    volume = series.new_zeros(thickness, ny, nx)
    for it in range(iterations):
        residual = (series - _apply_project(matrix, volume)) * inv_rows
        volume += _apply_backproject(matrix, residual) * inv_cols
        if positivity:
            volume.clamp_(min=0.0)
        if progress is not None:
            progress(it + 1, iterations)
    return volume


def align_series(images, deformations: Deformations, chunk_tilts: int = 8) -> torch.Tensor:
    """Undo the deformations of a tilt series: the aligned (ideal-projection) images, ``(M, ny, nx)`` float32.

    ``images``: observed series ``(M, ny, nx)`` (tensor or array; the result is on its device). Uses
    :func:`icetide.deform.unwarp_images` with the deformations' own local-field interpolation, a few tilts
    at a time to bound memory; a local field that is zero everywhere is skipped (same result, faster).
    """
    series = _as_series(images)
    if deformations.n_tilts != series.shape[0]:
        raise IcetideError(f"deformations for {deformations.n_tilts} tilts, tilt series of {series.shape[0]}")
    if tuple(deformations.detector_shape) != tuple(series.shape[1:]):
        raise IcetideError(
            f"deformations refer to a {deformations.detector_shape} detector, images are {tuple(series.shape[1:])}"
        )
    aligned = torch.empty_like(series)
    for start in range(0, series.shape[0], chunk_tilts):
        index = np.arange(start, min(start + chunk_tilts, series.shape[0]))
        params = deformations.subset(index).tensors(series.device)
        if not params["local_px"].any():
            params["local_px"] = None
        aligned[index] = unwarp_images(series[index], **params, interpolation=deformations.local_interpolation)
    return aligned


def standardised(images: torch.Tensor) -> torch.Tensor:
    """Each image of ``images (M, ny, nx)`` with mean 0 and standard deviation 1 (levels and gains removed)."""
    centred = images - images.mean(dim=(1, 2), keepdim=True)
    return centred / centred.std(dim=(1, 2), keepdim=True).clamp(min=1e-30)


def fbp_deformed(
    images,
    tilt_angles_deg,
    thickness: int,
    deformations: Deformations | None,
    filter: str = "ramp",
) -> torch.Tensor:
    """FBP of a deformed tilt series: :func:`align_series` (when ``deformations`` is given), then :func:`fbp`.

    ``images (M, ny, nx)`` -> ``(thickness, ny, nx)`` float32.
    """
    series = _as_series(images)
    if deformations is not None:
        series = align_series(series, deformations)
    return fbp(series, tilt_angles_deg, thickness, filter)
