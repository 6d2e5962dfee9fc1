"""Multiresolution hash encoding (Instant-NGP, Mueller et al. 2022), fitted to a box.

Layout. Level ``l`` has the base resolution ``R_l = base_resolution * per_level_scale**l`` along the box's
longest axis and, with the *tight mapping*, ``R_l * n_a / max(n)`` along axis ``a`` (``n`` the box shape), so
an anisotropic box (e.g. 48 x 128 x 128) does not waste vertices on empty space. A unit coordinate
``u in [0, 1]`` sits at ``p = u * R_{l,a}`` in level units; the level's vertices are the integers
``0 .. ceil(R_{l,a})`` on each axis. A level whose vertices fit in the table size ``T`` is indexed densely
(row ``i_x + G_x (i_y + G_y i_z)``, ``G`` the vertex counts); the others by spatial hashing
``(i_x * 1 XOR i_y * 2654435761 XOR i_z * 805459861) mod T``. Each point gets the trilinear (or smoothstep)
interpolation of its cell's 8 corner features; levels are concatenated, level-major:
column ``l * F + f`` holds feature ``f`` of level ``l``.

Outside the box. Unit coordinates are clamped to ``[0, 1]`` first, so the encoding continues the values on the
box faces outwards (and has zero gradient with respect to positions there).

All levels share one flat parameter ``table`` of shape ``(sum of level rows, F)``, initialised uniformly in
``+-1e-4``; :attr:`HashEncoding.levels` gives each level's rows.

Speed (docs/BENCHMARKS.md). Points are evaluated by fused kernels where they can run: Triton on CUDA
(:mod:`.triton_encoding`), Numba on the CPU (:mod:`.cpu_encoding`); each computes a point's corners, reads
their features and interpolates without storing anything per corner. Elsewhere (or with ``kernel="torch"``)
the *PyTorch path* does the same with tensor operations: it evaluates points in chunks (8192 on CPU) whose
intermediates live in buffers reused from chunk to chunk (a fresh multi-MB CPU tensor costs page faults worth
more than its arithmetic). Per chunk it builds the 8 corner rows of every cell by broadcasting per-axis
index terms (int32 arithmetic on CPU), gathers each corner's ``F`` features as one or two integer words,
interpolates with three ``lerp`` passes (x, then y, then z), and has a hand-written backward: the table
gradient by one flat ``scatter_add_`` (the 1-D form of ``index_add_``; two features at a time as a complex
number), the position gradient from the analytic derivative of the interpolation. The backward recomputes
the chunk's corners instead of storing them, so memory stays bounded. :class:`ReferenceHashEncoding` is the
straightforward autograd version, kept as the baseline that the tests and ``benchmarks/throughput.py``
compare against.

On a regular lattice (:meth:`HashEncoding.forward_lattice`) a dense level is a separable resampling of its
vertex grid: three matrix products with ``(m, G)`` interpolation matrices, one per axis, in place of
``grid_sample``, which is slower on CPU; hashed levels go through the point path. The lattice's features come channels first,
``(L * F, nz, ny, nx)``: the products then leave each level's block contiguous, joining the levels is a plain
copy, and the MLP reads every feature as one contiguous row (:meth:`icetide.volume.MLP.forward_channels_first`).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .cpu_encoding import CpuLevelConstants, encode_points_cpu, numba
from .cpu_encoding import kernel_available as numba_available
from .triton_encoding import LevelConstants, encode_points_triton, triton
from .triton_encoding import kernel_available as triton_available

__all__ = ["HASH_PRIMES", "Level", "level_layout", "HashEncoding", "ReferenceHashEncoding"]

HASH_PRIMES = (1, 2654435761, 805459861)
Interpolation = Literal["linear", "smoothstep"]
Kernel = Literal["auto", "triton", "numba", "torch"]
KernelUsed = Literal["triton", "numba", "torch"]

# Points per chunk: on a CPU the intermediates of a chunk stay in cache; on a GPU a chunk fills the device.
_CHUNK_POINTS = {"cpu": 8192}
_CHUNK_POINTS_DEFAULT = 2**17
# Integer dtypes by size in bytes: table rows are gathered as whole words, not feature by feature.
_WORDS = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}
# Two features of a table gradient are scattered at once as one complex number.
_COMPLEX_OF = {torch.float32: torch.complex64, torch.float64: torch.complex128}


@dataclass(frozen=True)
class Level:
    """One level of the encoding.

    ``resolution_xyz``: cells per unit length along x, y, z; ``vertices_xyz``: vertex counts
    ``ceil(resolution) + 1``; ``dense``: indexed without hashing; ``rows``: its rows in the table (the vertex
    count if dense, else ``T``); ``offset``: its first row in the flat table.
    """

    resolution_xyz: tuple[float, float, float]
    vertices_xyz: tuple[int, int, int]
    dense: bool
    rows: int
    offset: int


def level_layout(
    n_levels: int,
    log2_table_size: int,
    base_resolution: float,
    per_level_scale: float,
    box_shape_zyx: tuple[int, int, int],
) -> list[Level]:
    """The levels of an encoding of the box ``box_shape_zyx`` (tight mapping, see the module docstring).

    Hashed levels come first in the flat table, so that their offsets are multiples of ``T`` (the lookup
    folds them into the hashed index by a bitwise OR); the dense levels follow.
    """
    nz, ny, nx = box_shape_zyx
    longest = max(box_shape_zyx)
    table_rows = 2**log2_table_size
    shapes = []
    for level in range(n_levels):
        r = base_resolution * per_level_scale**level
        resolution = (r * nx / longest, r * ny / longest, r * nz / longest)
        vertices = tuple(math.ceil(res) + 1 for res in resolution)
        shapes.append((resolution, vertices, math.prod(vertices) <= table_rows))
    n_hashed = sum(not dense for _, _, dense in shapes)
    levels, hashed_offset, dense_offset = [], 0, n_hashed * table_rows
    for resolution, vertices, dense in shapes:
        if dense:
            levels.append(Level(resolution, vertices, True, math.prod(vertices), dense_offset))
            dense_offset += math.prod(vertices)
        else:
            levels.append(Level(resolution, vertices, False, table_rows, hashed_offset))
            hashed_offset += table_rows
    return levels


def _cell(p: torch.Tensor, last_cell: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower corner (float, integral) and fractional position of level coordinates ``p >= 0``.

    The last cell is closed so that ``p`` on the far face interpolates inside the grid.
    """
    i0 = torch.clamp(p.floor(), max=last_cell)
    return i0, p - i0


def _upper_weight(frac: torch.Tensor, interpolation: Interpolation, out: torch.Tensor | None = None) -> torch.Tensor:
    """Weight of a cell's upper corner along one axis: ``frac`` or ``frac^2 (3 - 2 frac)`` (smoothstep).

    With ``out`` (no autograd) the smoothstep is written there; ``frac`` itself is returned when linear.
    """
    if interpolation == "linear":
        return frac
    if out is None:
        return frac * frac * (3 - 2 * frac)
    torch.mul(frac, -2, out=out)
    return out.add_(3).mul_(frac).mul_(frac)


def _upper_weight_slope(frac: torch.Tensor, interpolation: Interpolation) -> torch.Tensor | None:
    """Derivative of :func:`_upper_weight` with respect to ``frac`` (None: identically 1)."""
    return None if interpolation == "linear" else 6 * frac * (1 - frac)


def _index_dtype(device: torch.device) -> torch.dtype:
    """Dtype of row indices: int32 on CPU, where int64 arithmetic runs about 4x slower; int64 elsewhere."""
    return torch.int32 if device.type == "cpu" else torch.int64


def _to_index(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Integer constants in the index dtype; int32 wraps modulo 2**32 (hash multipliers then keep their
    low bits, which are all the hash uses)."""
    if dtype == torch.int32:
        values = (values + 2**31) % 2**32 - 2**31
    return values.to(dtype)


def _chunk_points(device: torch.device, chunk_points: int | None) -> int:
    return chunk_points or _CHUNK_POINTS.get(device.type, _CHUNK_POINTS_DEFAULT)


class _Workspace:
    """Buffers that the chunks of one call reuse, by name.

    A CPU tensor of a few MB is mapped afresh by the C allocator each time it is allocated and page-faulted
    on its first write, which costs more than the arithmetic on it; chunks write into the same buffers.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._buffers: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        buf = self._buffers.get(name)
        if buf is None or buf.shape != shape or buf.dtype != dtype:
            buf = torch.empty(shape, dtype=dtype, device=self.device)
            self._buffers[name] = buf
        return buf


class _LevelGroup:
    """Consecutive levels of one kind (all dense or all hashed), evaluated together on chunks of points.

    Chunk tensors are laid out ``(..., Lg, n)`` (levels, points) with the 8 corners as leading ``(2, 2, 2)``
    dims in z, y, x order (0 lower, 1 upper), so that broadcasting runs over long contiguous rows; features
    ``(..., Lg, n, F)`` are combined with weights expanded to ``F`` for the same reason.
    """

    def __init__(self, levels: list[Level], first: int, interpolation: Interpolation):
        self.first, self.stop = first, first + len(levels)
        self.dense = levels[0].dense
        self.name = "dense" if self.dense else "hashed"
        self.interpolation = interpolation
        self.mask = levels[0].rows - 1  # hashed levels: T - 1, T a power of two

        def per_axis(values: list[tuple], dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype).t().contiguous()[:, :, None]  # (3, Lg, 1)

        # A corner's row: the per-axis terms (vertex index * multiplier), summed (dense) or XORed and masked
        # (hashed), plus the level's offset, added to the x term (a multiple of T when hashed, so it commutes
        # with the XOR and the mask).
        multipliers = [(1, lv.vertices_xyz[0], lv.vertices_xyz[0] * lv.vertices_xyz[1]) for lv in levels]
        self._constants = {
            "resolution": per_axis([lv.resolution_xyz for lv in levels], torch.float64),
            "last_cell": per_axis([tuple(g - 2 for g in lv.vertices_xyz) for lv in levels], torch.float64),
            "multiplier": per_axis(multipliers if self.dense else [HASH_PRIMES] * len(levels), torch.int64),
            "offset": torch.tensor([lv.offset for lv in levels])[:, None],
        }
        self._cache: dict[tuple, dict[str, torch.Tensor]] = {}

    @property
    def n_levels(self) -> int:
        return self.stop - self.first

    def constants(self, like: torch.Tensor) -> dict[str, torch.Tensor]:
        """The constants on ``like``'s device: reals in its dtype (kept in float64), integers in the index dtype."""
        key = (like.dtype, like.device)
        if key not in self._cache:
            index_dtype = _index_dtype(like.device)
            self._cache[key] = {
                k: v.to(like.device, like.dtype) if v.is_floating_point()
                else _to_index(v, index_dtype).to(like.device)
                for k, v in self._constants.items()
            }
        return self._cache[key]

    def _buf(self, ws: _Workspace, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return ws(f"{self.name}.{name}", shape, dtype)

    def corners(self, unit_xyz: torch.Tensor, ws: _Workspace) -> tuple[torch.Tensor, torch.Tensor]:
        """Corner rows ``(2, 2, 2, Lg, n)`` and fractional positions ``(3, Lg, n)`` of a chunk ``(n, 3)``."""
        c = self.constants(unit_xyz)
        shape = (3, self.n_levels, unit_xyz.shape[0])
        index_dtype = c["multiplier"].dtype
        frac = self._buf(ws, "frac", shape, unit_xyz.dtype)
        torch.mul(unit_xyz.clamp(0, 1).t()[:, None, :], c["resolution"], out=frac)
        lower = self._buf(ws, "lower", shape, unit_xyz.dtype)
        torch.floor(frac, out=lower)
        torch.minimum(lower, c["last_cell"], out=lower)  # the last cell is closed
        frac.sub_(lower)
        term = self._buf(ws, "term", (3, 2, *shape[1:]), index_dtype)
        term[:, 0].copy_(lower)  # integral and >= 0: exact
        term[:, 0].mul_(c["multiplier"])
        torch.add(term[:, 0], c["multiplier"], out=term[:, 1])
        if not self.dense:
            term.bitwise_and_(self.mask)
        term[0].add_(c["offset"])
        tx, ty, tz = term
        # The 8 corners by broadcasting the per-axis terms: two passes, the full-size one once.
        combine = torch.add if self.dense else torch.bitwise_xor
        zy = self._buf(ws, "zy", (2, 2, *shape[1:]), index_dtype)
        combine(tz[:, None], ty[None, :], out=zy)
        rows = self._buf(ws, "rows", (2, 2, 2, *shape[1:]), index_dtype)
        combine(zy[:, :, None], tx[None, None], out=rows)
        if index_dtype != torch.int64:
            # gather and scatter_add_ want int64 (they would convert int32 themselves, into a fresh tensor).
            rows = self._buf(ws, "rows64", rows.shape, torch.int64).copy_(rows)
        return rows, frac

    def gather(self, table: torch.Tensor, rows: torch.Tensor, ws: _Workspace) -> torch.Tensor:
        """Features ``(*rows.shape, F)`` of the table rows ``rows``.

        A row's ``F`` features are moved as one or a few integer words (exact bit copies), not one by one.
        """
        n_features = table.shape[1]
        row_bytes = n_features * table.element_size()
        word_bytes = next(b for b in _WORDS if row_bytes % b == 0)
        per_row = row_bytes // word_bytes
        words = table.view(_WORDS[word_bytes]).view(-1)
        index = rows.view(-1, 1)
        if per_row > 1:
            words_of_row = torch.arange(per_row, device=rows.device, dtype=rows.dtype)
            out = self._buf(ws, "index", (index.shape[0], per_row), rows.dtype)
            index = torch.add(words_of_row, index, alpha=per_row, out=out)
        out = self._buf(ws, "feats", (index.numel(),), _WORDS[word_bytes])
        torch.gather(words, 0, index.view(-1), out=out)
        return out.view(table.dtype).view(*rows.shape, n_features)

    def upper_weights(
        self, frac: torch.Tensor, n_features: int, ws: _Workspace
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-axis weights of the upper corners, ``(3, Lg, n)``, and the same repeated ``(3, Lg, n, F)``."""
        s = _upper_weight(frac, self.interpolation, self._buf(ws, "s", frac.shape, frac.dtype))
        s_f = self._buf(ws, "s_f", (*frac.shape, n_features), frac.dtype)
        torch.stack([s] * n_features, -1, out=s_f)
        return s, s_f

    def partial_sums(
        self, feats: torch.Tensor, s_f: torch.Tensor, ws: _Workspace
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Corner features interpolated along x ``(2, 2, Lg, n, F)``, then along y ``(2, Lg, n, F)``."""
        along_x = self._buf(ws, "along_x", feats[:, :, 0].shape, feats.dtype)
        torch.lerp(feats[:, :, 0], feats[:, :, 1], s_f[0], out=along_x)
        along_y = self._buf(ws, "along_y", along_x[:, 0].shape, feats.dtype)
        torch.lerp(along_x[:, 0], along_x[:, 1], s_f[1], out=along_y)
        return along_x, along_y

    def encode_chunk(self, unit_xyz: torch.Tensor, table: torch.Tensor, ws: _Workspace, out: torch.Tensor) -> None:
        """Write the encoding of a chunk ``(n, 3)`` into ``out`` ``(Lg, n, F)``."""
        rows, frac = self.corners(unit_xyz, ws)
        _, s_f = self.upper_weights(frac, table.shape[1], ws)
        _, along_y = self.partial_sums(self.gather(table, rows, ws), s_f, ws)
        torch.lerp(along_y[0], along_y[1], s_f[2], out=out)

    def scatter_table_grad(
        self, s_f: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor, grad_table: torch.Tensor, ws: _Workspace
    ) -> None:
        """``grad_table[rows] += w * grad``: corner weights ``w`` from the upper weights ``s_f``
        ``(3, Lg, n, F)``, output gradient ``grad`` ``(Lg, n, F)``.

        The contributions are built axis by axis (``grad`` times the z weights, then y, then x), then added by
        one 1-D ``scatter_add_`` (index_add_'s fastest CPU form: a 2-D index_add_ runs a TensorIterator per
        row) into the flat gradient; on CPU, pairs of features are added as one complex number (``F`` even).
        """
        n_features = grad.shape[-1]
        axis = self._buf(ws, "axis_weights", (3, 2, *s_f.shape[1:]), s_f.dtype)  # lower, upper
        axis[:, 1].copy_(s_f)
        torch.neg(s_f, out=axis[:, 0]).add_(1)
        wx, wy, wz = axis
        along_z = torch.mul(wz, grad, out=self._buf(ws, "grad_z", wz.shape, grad.dtype))
        along_zy = self._buf(ws, "grad_zy", (2, *wy.shape), grad.dtype)
        torch.mul(along_z[:, None], wy[None], out=along_zy)
        contribution = self._buf(ws, "contribution", (2, *along_zy.shape), grad.dtype)
        torch.mul(along_zy[:, :, None], wx[None, None], out=contribution)
        pairs = n_features % 2 == 0 and grad_table.device.type == "cpu"  # GPUs scatter in parallel anyway
        complex_dtype = _COMPLEX_OF.get(grad_table.dtype) if pairs else None
        if complex_dtype is not None:
            target, source = grad_table.view(complex_dtype).view(-1), contribution.view(complex_dtype).view(-1)
        else:
            target, source = grad_table.view(-1), contribution.view(-1)
        per_row = target.numel() // grad_table.shape[0]
        index = rows.view(-1, 1)
        if per_row > 1:
            elements = torch.arange(per_row, device=rows.device, dtype=rows.dtype)
            out = self._buf(ws, "scatter_index", (index.shape[0], per_row), rows.dtype)
            index = torch.add(elements, index, alpha=per_row, out=out)
        target.scatter_add_(0, index.view(-1), source)

    def backward_chunk(
        self,
        unit_xyz: torch.Tensor,
        table: torch.Tensor,
        grad: torch.Tensor,
        ws: _Workspace,
        grad_table: torch.Tensor | None,
        need_positions: bool,
    ) -> torch.Tensor | None:
        """Backward of :meth:`encode_chunk` given the output gradient ``grad`` ``(Lg, n, F)``.

        Adds the table gradient into ``grad_table`` ``(rows, F)`` unless None; returns the
        gradient with respect to the clamped unit coordinates ``(n, 3)`` if ``need_positions``.
        """
        n_features = table.shape[1]
        rows, frac = self.corners(unit_xyz, ws)
        s, s_f = self.upper_weights(frac, n_features, ws)
        if grad_table is not None:
            self.scatter_table_grad(s_f, rows, grad, grad_table, ws)
        if not need_positions:
            return None
        feats = self.gather(table, rows, ws)
        along_x, along_y = self.partial_sums(feats, s_f, ws)
        # The output is lerp_z(lerp_y(lerp_x(f))), linear in f: its derivative along s_a is the difference of
        # the upper and lower faces along a, interpolated along the remaining axes.
        dx = feats[:, :, 1] - feats[:, :, 0]
        dx = torch.lerp(dx[:, 0], dx[:, 1], s_f[1])
        dx = torch.lerp(dx[0], dx[1], s_f[2])
        dy = along_x[:, 1] - along_x[:, 0]
        dy = torch.lerp(dy[0], dy[1], s_f[2])
        dz = along_y[1] - along_y[0]
        grad_s = torch.stack([(d * grad).sum(-1) for d in (dx, dy, dz)])  # (3, Lg, n)
        slope = _upper_weight_slope(frac, self.interpolation)
        if slope is not None:
            grad_s *= slope
        return (grad_s * self.constants(grad_s)["resolution"]).sum(1).t()


class HashEncoding(nn.Module):
    """Multiresolution hash encoding of points of a box; ``forward``: ``(N, 3)`` -> ``(N, L * F)``.

    Inputs are unit coordinates in ``(x, y, z)`` order (``icetide.geometry.box_to_unit`` of voxel coordinates).
    ``chunk_points`` overrides the number of points the PyTorch path processes at once (default: 8192 on CPU,
    2**17 elsewhere). ``kernel``: ``"auto"`` evaluates points with the fused Triton kernels
    (:mod:`.triton_encoding`) on CUDA when Triton imports and ``F`` is a power of two, with the fused Numba
    kernels (:mod:`.cpu_encoding`) on the CPU when Numba imports, else with the PyTorch path; ``"torch"`` always
    uses the PyTorch path; ``"triton"`` and ``"numba"`` require those kernels. ``table_dtype`` is the precision
    of the Triton kernels' table reads (float32, float16 or bfloat16; the parameter stays float32). Raises
    ``ValueError`` on bad sizes.
    """

    def __init__(
        self,
        n_levels: int = 8,
        n_features: int = 2,
        log2_table_size: int = 19,
        base_resolution: float = 8.0,
        per_level_scale: float = 1.5,
        interpolation: Interpolation = "linear",
        box_shape_zyx: tuple[int, int, int] = (48, 128, 128),
        chunk_points: int | None = None,
        kernel: Kernel = "auto",
        table_dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.set_kernel(kernel, table_dtype)
        if interpolation not in ("linear", "smoothstep"):
            raise ValueError(f"interpolation must be 'linear' or 'smoothstep', not {interpolation!r}")
        if n_levels < 1 or n_features < 1 or base_resolution <= 0 or per_level_scale < 1:
            raise ValueError("need n_levels >= 1, n_features >= 1, base_resolution > 0, per_level_scale >= 1")
        if len(box_shape_zyx) != 3 or min(box_shape_zyx) < 1:
            raise ValueError(f"box_shape_zyx must be three positive sizes, not {box_shape_zyx}")
        if not 1 <= log2_table_size <= 30:
            raise ValueError(f"log2_table_size must be in 1..30, not {log2_table_size}")
        self.n_levels = n_levels
        self.n_features = n_features
        self.log2_table_size = log2_table_size
        self.interpolation: Interpolation = interpolation
        self.box_shape_zyx = tuple(int(n) for n in box_shape_zyx)
        self.chunk_points = chunk_points
        self._level_constants: dict[tuple, LevelConstants] = {}
        self.levels = level_layout(n_levels, log2_table_size, base_resolution, per_level_scale, self.box_shape_zyx)
        self.n_dense = sum(level.dense for level in self.levels)  # dense levels are the coarse ones, a prefix
        total_rows = sum(level.rows for level in self.levels)
        if total_rows >= 2**31:  # rows are computed in int32 on CPU
            raise ValueError(f"the table would have {total_rows} rows; at most 2**31 - 1 are supported")
        self.table = nn.Parameter(torch.empty(total_rows, n_features).uniform_(-1e-4, 1e-4))
        self._dense_group = _LevelGroup(self.levels[: self.n_dense], 0, interpolation) if self.n_dense else None
        self._hashed_group = (
            _LevelGroup(self.levels[self.n_dense :], self.n_dense, interpolation)
            if self.n_dense < n_levels
            else None
        )

    @property
    def output_dim(self) -> int:
        """Features per point, ``L * F``."""
        return self.n_levels * self.n_features

    def forward(self, unit_xyz: torch.Tensor) -> torch.Tensor:
        """Encode points ``(N, 3)`` of ``[0, 1]^3`` (``(x, y, z)``); returns ``(N, L * F)``."""
        groups = tuple(g for g in (self._dense_group, self._hashed_group) if g is not None)
        return self._encode_points(unit_xyz, groups)

    def _encode_points(
        self, unit_xyz: torch.Tensor, groups: tuple[_LevelGroup, ...], table: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The consecutive level groups ``groups`` of points ``(N, 3)``: ``(N, levels * F)``.

        ``table``: the table or a leading piece of it holding every row of ``groups`` (default: the table).
        """
        if unit_xyz.ndim != 2 or unit_xyz.shape[1] != 3:
            raise ValueError(f"expected points of shape (N, 3), got {tuple(unit_xyz.shape)}")
        table = self.table if table is None else table
        kernel = self.kernel_for(table.device)
        smooth = self.interpolation == "smoothstep"
        if kernel != "torch":
            first, stop = groups[0].first, groups[-1].stop
            key = (kernel, first, stop, table.device)
            if key not in self._level_constants:
                levels = self.levels[first:stop]
                self._level_constants[key] = (
                    LevelConstants(levels, HASH_PRIMES, table.device) if kernel == "triton"
                    else CpuLevelConstants(levels, HASH_PRIMES)
                )
            if kernel == "numba":
                return encode_points_cpu(unit_xyz, table, self._level_constants[key], smooth)
            out = encode_points_triton(unit_xyz.float(), table, self._level_constants[key], smooth, self.table_dtype)
            return out.to(table.dtype)
        x = unit_xyz.to(table.dtype)
        return _PointLookup.apply(x, table, groups, _chunk_points(x.device, self.chunk_points))

    def set_kernel(self, kernel: Kernel, table_dtype: torch.dtype = torch.float32) -> None:
        """Choose how points are evaluated and the precision of the Triton kernels' table reads (see the class
        docstring); raises ``ValueError`` on an unknown kernel or dtype."""
        if kernel not in ("auto", "triton", "numba", "torch"):
            raise ValueError(f"kernel must be 'auto', 'triton', 'numba' or 'torch', not {kernel!r}")
        if table_dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"table_dtype must be float32, float16 or bfloat16, not {table_dtype}")
        self.kernel: Kernel = kernel
        self.table_dtype = table_dtype

    def kernel_for(self, device: torch.device) -> KernelUsed:
        """What evaluates points on ``device``: ``"triton"``, ``"numba"`` or ``"torch"`` (the PyTorch path), by
        ``kernel`` (see the class docstring); raises ``RuntimeError`` when the kernel asked for cannot run."""
        if self.kernel == "torch":
            return "torch"
        power_of_two = self.n_features & (self.n_features - 1) == 0
        usable = {
            "triton": power_of_two and triton_available(device),
            "numba": numba_available(device) and self.table.dtype in (torch.float32, torch.float64),
        }
        if self.kernel == "auto":
            return next((k for k, ok in usable.items() if ok), "torch")
        if not usable[self.kernel]:
            installed = (triton if self.kernel == "triton" else numba) is not None
            raise RuntimeError(
                f"the {self.kernel.capitalize()} kernels cannot run here (device {device.type}, "
                f"{self.n_features} features, {str(self.table.dtype).removeprefix('torch.')} table, "
                f"{self.kernel.capitalize()} {'present' if installed else 'missing'})"
            )
        return self.kernel

    # -- the lattice path ------------------------------------------------------------------------------------

    def forward_lattice(
        self,
        shape_zyx: tuple[int, int, int],
        offset_vox: torch.Tensor,
        rows: slice | None = None,
        spacing_vox: float | None = None,
    ) -> torch.Tensor:
        """Encoding of every point (+ ``offset_vox``) of a lattice of shape ``shape_zyx`` centred on the box,
        channels first.

        ``spacing_vox``: distance between lattice points in voxels of the box; by default the box over
        ``shape_zyx``, so that the lattice's cells tile the box (``shape_zyx`` is usually the box itself, its
        voxel centres; another shape samples the same box on a finer or coarser lattice). A spacing of 2 with
        half the box's shape is every other voxel, as a fit binned by 2 sees it. ``offset_vox``: ``(3,)`` in
        ``(x, y, z)``, in units of the spacing (the renderer's random sub-voxel shift). ``rows``: a band
        ``start:stop`` of y indices (all rows if None). Returns a contiguous ``(L * F, nz, n_rows, nx)``, whose
        ``[:, k, j, i]`` equals :meth:`forward` at point ``(i, j, k)`` of the lattice (channels first: see the
        module docstring).
        """
        nz, ny, nx = shape_zyx
        start, stop, step = (rows or slice(None)).indices(ny)
        if step != 1 or start >= stop:
            raise ValueError(f"rows must be a non-empty band start:stop of 0:{ny}, not {rows}")
        dtype, device = self.table.dtype, self.table.device
        offset = torch.as_tensor(offset_vox, dtype=dtype, device=device)

        def unit_axis(first: int, last: int, n: int, box: int, shift: torch.Tensor) -> torch.Tensor:
            # Point j at (j + 1/2 - n/2 + shift) spacings from the box centre, in unit coordinates.
            scale = (1.0 / n) if spacing_vox is None else spacing_vox / box
            return (torch.arange(first, last, device=device, dtype=dtype) + 0.5 - n / 2 + shift) * scale + 0.5

        box_z, box_y, box_x = self.box_shape_zyx
        axes = [
            unit_axis(0, nx, nx, box_x, offset[0]),
            unit_axis(start, stop, ny, box_y, offset[1]),
            unit_axis(0, nz, nz, box_z, offset[2]),
        ]
        # One split of the table (hashed rows first, then one piece per dense level): its backward builds
        # the table gradient once, where slicing per level would build a full-size gradient per level.
        n_hashed_rows = (self.n_levels - self.n_dense) * 2**self.log2_table_size
        dense_rows = [lv.rows for lv in self.levels[: self.n_dense]]
        hashed_table, *dense_tables = self.table.split([n_hashed_rows, *dense_rows])
        parts = [self._dense_level_on_lattice(lv, t, axes) for lv, t in zip(self.levels, dense_tables)]
        if self._hashed_group is not None:
            zz, yy, xx = torch.meshgrid(axes[2], axes[1], axes[0], indexing="ij")
            points = torch.stack([xx, yy, zz], -1).reshape(-1, 3)
            hashed = self._encode_points(points, (self._hashed_group,), hashed_table)
            parts.append(hashed.t().reshape(-1, *zz.shape))
        return torch.cat(parts, 0)

    def _dense_level_on_lattice(self, lv: Level, table: torch.Tensor, unit_axes: list[torch.Tensor]) -> torch.Tensor:
        """Dense level ``lv`` (its rows ``table``) resampled separably on the lattice with axes ``unit_axes``
        (x, y, z): contiguous ``(F, nz, ny, nx)``."""
        gx, gy, gz = lv.vertices_xyz
        wx, wy, wz = (self._axis_weights(unit_axes[a], lv.resolution_xyz[a], lv.vertices_xyz[a]) for a in range(3))
        # Each product contracts the leading grid axis of a contiguous tensor and appends the lattice axis
        # last, so no operand is ever copied: (z, y, x, F) -> (y, x, F, nz) -> (x, F, nz, ny) -> (F, nz, ny, nx).
        grid = table.reshape(gz, gy * gx * self.n_features).t() @ wz.t()
        grid = grid.view(gy, -1).t() @ wy.t()
        grid = grid.view(gx, -1).t() @ wx.t()
        return grid.view(self.n_features, len(unit_axes[2]), len(unit_axes[1]), len(unit_axes[0]))

    def _axis_weights(self, unit: torch.Tensor, resolution: float, vertices: int) -> torch.Tensor:
        """Interpolation matrix ``(m, G)`` from a level's ``G`` vertices to ``m`` unit coordinates on one axis."""
        p = unit.clamp(0, 1) * resolution
        i0, frac = _cell(p, float(vertices - 2))
        s = _upper_weight(frac, self.interpolation)
        lower = i0.long()[:, None]
        w = torch.zeros(len(unit), vertices, dtype=unit.dtype, device=unit.device)
        return w.scatter(1, lower, (1 - s)[:, None]).scatter(1, lower + 1, s[:, None])


class _PointLookup(torch.autograd.Function):
    """Consecutive level groups of :class:`HashEncoding` at points, with a hand-written, chunked backward.

    Only the inputs are saved; the backward recomputes each chunk's corners (cheap index arithmetic), so
    memory stays bounded by one chunk's intermediates.
    """

    @staticmethod
    def forward(ctx, unit_xyz, table, groups, chunk):  # type: ignore[override]
        n, n_features = unit_xyz.shape[0], table.shape[1]
        first = groups[0].first
        out = unit_xyz.new_empty(n, groups[-1].stop - first, n_features)
        ws = _Workspace(unit_xyz.device)
        for i in range(0, n, chunk):
            for group in groups:
                target = out[i : i + chunk, group.first - first : group.stop - first].transpose(0, 1)
                group.encode_chunk(unit_xyz[i : i + chunk], table, ws, target)
        ctx.save_for_backward(unit_xyz, table)
        ctx.groups, ctx.chunk = groups, chunk
        return out.view(n, out.shape[1] * n_features)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        unit_xyz, table = ctx.saved_tensors
        groups, chunk = ctx.groups, ctx.chunk
        need_xyz, need_table = ctx.needs_input_grad[:2]
        n, n_features = unit_xyz.shape[0], table.shape[1]
        first = groups[0].first
        grad = grad_out.contiguous().view(n, groups[-1].stop - first, n_features)
        grad_table = torch.zeros_like(table) if need_table else None
        grad_xyz = torch.zeros_like(unit_xyz) if need_xyz else None
        ws = _Workspace(unit_xyz.device)
        for i in range(0, n, chunk):
            for group in groups:
                g = grad[i : i + chunk, group.first - first : group.stop - first].transpose(0, 1).contiguous()
                g_xyz = group.backward_chunk(unit_xyz[i : i + chunk], table, g, ws, grad_table, need_xyz)
                if g_xyz is not None:
                    grad_xyz[i : i + chunk] += g_xyz
        if grad_xyz is not None:
            grad_xyz *= (unit_xyz >= 0) & (unit_xyz <= 1)  # the clamp passes no gradient outside the box
        return grad_xyz, grad_table, None, None


class ReferenceHashEncoding(HashEncoding):
    """The straightforward encoding: ``(N, 8, 3)`` corner indices per level, autograd for every gradient.

    Same layout and parameters as :class:`HashEncoding` (a state dict moves between them); the baseline of
    the tests and of ``benchmarks/throughput.py``. Never uses the fused kernels.
    """

    def __init__(self, **kwargs):
        super().__init__(**{**kwargs, "kernel": "torch"})

    _CORNERS = torch.tensor(list(itertools.product((0, 1), repeat=3)))  # (8, 3): 0 lower, 1 upper corner

    def forward(self, unit_xyz: torch.Tensor) -> torch.Tensor:
        """Encode points ``(N, 3)`` of ``[0, 1]^3``; returns ``(N, L * F)``."""
        x = unit_xyz.to(self.table.dtype).clamp(0, 1)
        corners = self._CORNERS.to(x.device)
        out = []
        for lv in self.levels:
            resolution = x.new_tensor(lv.resolution_xyz)
            p = x * resolution
            i0, frac = _cell(p, x.new_tensor([g - 2 for g in lv.vertices_xyz]))
            s = _upper_weight(frac, self.interpolation)
            idx = i0.long()[:, None, :] + corners  # (N, 8, 3)
            w = torch.where(corners == 1, s[:, None, :], 1 - s[:, None, :]).prod(-1)  # (N, 8)
            if lv.dense:
                gx, gy, _ = lv.vertices_xyz
                row = idx[..., 0] + gx * (idx[..., 1] + gy * idx[..., 2])
            else:
                row = (idx[..., 0] * HASH_PRIMES[0]) ^ (idx[..., 1] * HASH_PRIMES[1]) ^ (idx[..., 2] * HASH_PRIMES[2])
                row = row % lv.rows
            feats = self.table[lv.offset + row]  # (N, 8, F)
            out.append((w[..., None] * feats).sum(1))
        return torch.cat(out, -1)
