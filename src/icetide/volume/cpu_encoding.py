"""The hash encoding's fused CPU kernels, compiled with Numba (the CPU counterpart of :mod:`.triton_encoding`).

For each point and level a kernel computes the cell's 8 corner rows (dense row or spatial hash, as
:mod:`icetide.volume.encoding` defines them), reads their ``F`` features straight from the table and
interpolates (x, then y, then z): nothing of size ``N x 8`` is ever stored, and each point costs a few dozen
scalar operations where the PyTorch path makes about twenty passes over chunk-sized buffers. The backward
recomputes the corners: the table gradient adds ``weight x output gradient`` into the rows, the position
gradient is the analytic derivative of the interpolation (zero outside ``[0, 1]``, where the encoding clamps).

Reals are computed in float64 whatever the table's dtype (outputs and gradients are stored in it). A NaN
coordinate is read as 0, as the Triton kernels do, so that a row index is never out of range.

Parallelism. The kernels release the GIL; :func:`encode_points_cpu` splits the work over
``torch.get_num_threads()`` Python threads: the forward and the position gradient by blocks of points, the
table gradient by levels (levels own disjoint rows, so no two threads add into the same row). When there are
fewer levels than threads, a level is also split by points, the extra blocks adding into scratch copies of
the level's rows that are summed at the end (at most ``_MAX_LEVEL_SPLITS`` blocks per level).

Compiled on first use and cached on disk by Numba (a few seconds once per install; in every new process where
Numba finds no writable cache directory). Selected automatically for CPU tensors when Numba imports
(:func:`kernel_available`).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

try:  # a dependency of icetide; a broken or missing install falls back to the PyTorch path
    import numba
except ImportError:  # pragma: no cover - depends on the install
    numba = None

__all__ = ["kernel_available", "CpuLevelConstants", "encode_points_cpu"]

_MAX_LEVEL_SPLITS = 4


def kernel_available(device: torch.device) -> bool:
    """Whether the Numba kernels can run on ``device``: Numba imports and the device is the CPU."""
    return numba is not None and device.type == "cpu"


class CpuLevelConstants:
    """Per-level constants of consecutive levels, as the arrays the kernels read.

    ``resolution`` ``(L, 3)`` float64; ``last_cell`` ``(L, 3)`` int64 (vertex counts minus 2: the last cell is
    closed); ``multiplier`` ``(L, 3)`` uint64 (dense: ``1, G_x, G_x G_y``; hashed: the primes); ``mask`` ``(L,)``
    uint64 (``T - 1``; unused when dense); ``hashed`` ``(L,)`` bool; ``offset`` ``(L,)`` uint64 (first table
    row); ``rows`` the levels' row counts.
    """

    def __init__(self, levels, primes: tuple[int, int, int]):
        self.n_levels = len(levels)
        self.resolution = np.array([lv.resolution_xyz for lv in levels], dtype=np.float64)
        self.last_cell = np.array([[g - 2 for g in lv.vertices_xyz] for lv in levels], dtype=np.int64)
        self.multiplier = np.array(
            [primes if not lv.dense else (1, lv.vertices_xyz[0], lv.vertices_xyz[0] * lv.vertices_xyz[1])
             for lv in levels], dtype=np.uint64,
        )
        self.mask = np.array([lv.rows - 1 for lv in levels], dtype=np.uint64)
        self.hashed = np.array([not lv.dense for lv in levels], dtype=np.bool_)
        self.offset = np.array([lv.offset for lv in levels], dtype=np.uint64)
        self.rows = [lv.rows for lv in levels]

    def arrays(self) -> tuple[np.ndarray, ...]:
        """The constants in the order the kernels take them."""
        return self.resolution, self.last_cell, self.multiplier, self.mask, self.hashed, self.offset


def _jit(kernel):
    """``kernel`` compiled without the GIL, its machine code cached on disk where Numba finds a writable place
    (beside this file, else the user's cache directory); without one, compiled anew in each process."""
    try:
        return numba.njit(nogil=True, cache=True, error_model="numpy")(kernel)
    except RuntimeError:  # "cannot cache function ...: no locator available"
        return numba.njit(nogil=True, error_model="numpy")(kernel)


if numba is not None:
    _inline = numba.njit(inline="always", error_model="numpy")

    @_inline
    def _axis(u, resolution, last_cell, multiplier, smooth):
        """One axis of a point's cell: upper-corner weight, d(weight)/du (0 outside [0, 1]) and the two per-axis
        row terms (lower, upper)."""
        inside = u >= 0.0 and u <= 1.0
        clamped = min(u, 1.0) if u >= 0.0 else 0.0  # NaN reads as 0
        p = clamped * resolution
        lower = min(np.int64(p), last_cell)  # p >= 0: truncation is floor
        frac = p - lower
        if smooth:
            weight = frac * frac * (3.0 - 2.0 * frac)
            slope = 6.0 * frac * (1.0 - frac)
        else:
            weight = frac
            slope = 1.0
        term = np.uint64(lower) * multiplier
        return weight, slope * resolution if inside else 0.0, term, term + multiplier

    @_inline
    def _cell(unit, i, resolution, last_cell, multiplier, mask, hashed, offset, level, smooth):
        """Upper weights ``(x, y, z)``, their slopes and the 8 corner rows (z, y, x order, 0 lower 1 upper)."""
        sx, dx, x0, x1 = _axis(unit[i, 0], resolution[level, 0], last_cell[level, 0], multiplier[level, 0], smooth)
        sy, dy, y0, y1 = _axis(unit[i, 1], resolution[level, 1], last_cell[level, 1], multiplier[level, 1], smooth)
        sz, dz, z0, z1 = _axis(unit[i, 2], resolution[level, 2], last_cell[level, 2], multiplier[level, 2], smooth)
        m, o = mask[level], offset[level]
        if hashed[level]:
            rows = ((x0 ^ y0 ^ z0) & m, (x1 ^ y0 ^ z0) & m, (x0 ^ y1 ^ z0) & m, (x1 ^ y1 ^ z0) & m,
                    (x0 ^ y0 ^ z1) & m, (x1 ^ y0 ^ z1) & m, (x0 ^ y1 ^ z1) & m, (x1 ^ y1 ^ z1) & m)
        else:
            rows = (x0 + y0 + z0, x1 + y0 + z0, x0 + y1 + z0, x1 + y1 + z0,
                    x0 + y0 + z1, x1 + y0 + z1, x0 + y1 + z1, x1 + y1 + z1)
        return (sx, sy, sz), (dx, dy, dz), (rows[0] + o, rows[1] + o, rows[2] + o, rows[3] + o,
                                            rows[4] + o, rows[5] + o, rows[6] + o, rows[7] + o)

    @_jit
    def _forward(unit, table, resolution, last_cell, multiplier, mask, hashed, offset, smooth,
                 point_start, point_stop, out):
        """``out[i, level, f]`` for the points of the range, every level."""
        n_features = table.shape[1]
        for level in range(resolution.shape[0]):  # level-major: one level's rows stay in cache
            for i in range(point_start, point_stop):
                (sx, sy, sz), _, r = _cell(unit, i, resolution, last_cell, multiplier, mask, hashed, offset,
                                           level, smooth)
                for f in range(n_features):
                    a = table[r[0], f]
                    c00 = a + sx * (table[r[1], f] - a)
                    a = table[r[2], f]
                    c01 = a + sx * (table[r[3], f] - a)
                    a = table[r[4], f]
                    c10 = a + sx * (table[r[5], f] - a)
                    a = table[r[6], f]
                    c11 = a + sx * (table[r[7], f] - a)
                    c0 = c00 + sy * (c01 - c00)
                    c1 = c10 + sy * (c11 - c10)
                    out[i, level, f] = c0 + sz * (c1 - c0)

    @_inline
    def _add_along_x(grad_table, lower_row, upper_row, f, g, sx):
        """Adds ``g`` to feature ``f`` of a pair of corners along x, split by the upper weight ``sx``."""
        upper = g * sx
        grad_table[lower_row, f] += g - upper
        grad_table[upper_row, f] += upper

    @_jit
    def _backward_table(unit, grad, resolution, last_cell, multiplier, mask, hashed, offset, smooth,
                        level, point_start, point_stop, row_shift, grad_table):
        """``grad_table[row - row_shift] += corner weight x grad[i, level]`` for the points of the range."""
        n_features = grad.shape[2]
        for i in range(point_start, point_stop):
            (sx, sy, sz), _, r = _cell(unit, i, resolution, last_cell, multiplier, mask, hashed, offset,
                                       level, smooth)
            for f in range(n_features):
                g = grad[i, level, f]
                g1 = g * sz
                g0 = g - g1
                g01 = g0 * sy
                g00 = g0 - g01
                g11 = g1 * sy
                g10 = g1 - g11
                _add_along_x(grad_table, r[0] - row_shift, r[1] - row_shift, f, g00, sx)
                _add_along_x(grad_table, r[2] - row_shift, r[3] - row_shift, f, g01, sx)
                _add_along_x(grad_table, r[4] - row_shift, r[5] - row_shift, f, g10, sx)
                _add_along_x(grad_table, r[6] - row_shift, r[7] - row_shift, f, g11, sx)

    @_jit
    def _backward_positions(unit, table, grad, resolution, last_cell, multiplier, mask, hashed, offset, smooth,
                            point_start, point_stop, grad_unit):
        """``grad_unit[i] +=`` the derivative of ``sum(grad[i] * out[i])`` with respect to the point's coordinates,
        for the points of the range (level-major, as :func:`_forward`)."""
        n_features = table.shape[1]
        for level in range(resolution.shape[0]):
            for i in range(point_start, point_stop):
                (sx, sy, sz), (dx, dy, dz), r = _cell(unit, i, resolution, last_cell, multiplier, mask, hashed,
                                                      offset, level, smooth)
                gx = gy = gz = 0.0
                for f in range(n_features):
                    v0, v1, v2, v3 = table[r[0], f], table[r[1], f], table[r[2], f], table[r[3], f]
                    v4, v5, v6, v7 = table[r[4], f], table[r[5], f], table[r[6], f], table[r[7], f]
                    c00, c01 = v0 + sx * (v1 - v0), v2 + sx * (v3 - v2)
                    c10, c11 = v4 + sx * (v5 - v4), v6 + sx * (v7 - v6)
                    c0, c1 = c00 + sy * (c01 - c00), c10 + sy * (c11 - c10)
                    # The output is linear along each axis: its slope is the upper face minus the lower one,
                    # interpolated along the other axes.
                    e0 = (v1 - v0) + sy * ((v3 - v2) - (v1 - v0))
                    e1 = (v5 - v4) + sy * ((v7 - v6) - (v5 - v4))
                    g = grad[i, level, f]
                    gx += g * (e0 + sz * (e1 - e0))
                    gy += g * ((c01 - c00) + sz * ((c11 - c10) - (c01 - c00)))
                    gz += g * (c1 - c0)
                grad_unit[i, 0] += gx * dx
                grad_unit[i, 1] += gy * dy
                grad_unit[i, 2] += gz * dz


_pool_state: dict[str, object] = {}


def _run(tasks: list) -> None:
    """Run the thunks ``tasks`` on ``torch.get_num_threads()`` threads (inline with one); re-raises the first
    failure. The pool is remade after a fork (threads do not survive one) or a change of the thread count."""
    workers = torch.get_num_threads()
    if workers == 1 or len(tasks) == 1:
        for task in tasks:
            task()
        return
    key = (os.getpid(), workers)
    if _pool_state.get("key") != key:
        _pool_state.update(key=key, pool=ThreadPoolExecutor(workers, thread_name_prefix="icetide-encoding"))
    for future in [_pool_state["pool"].submit(task) for task in tasks]:
        future.result()


def _blocks(n: int, count: int) -> list[tuple[int, int]]:
    """``count`` (or fewer) contiguous, nearly equal ranges covering ``0 .. n``."""
    edges = np.linspace(0, n, max(1, min(count, n)) + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]


class _CpuLookup(torch.autograd.Function):
    """Autograd wrapper of the kernels; saves only the inputs (the backward recomputes the corners)."""

    @staticmethod
    def forward(ctx, unit_xyz, table, constants, smooth):  # type: ignore[override]
        unit_xyz, table_c = unit_xyz.contiguous(), table.detach().contiguous()
        n, n_features = unit_xyz.shape[0], table.shape[1]
        out = torch.empty(n, constants.n_levels, n_features, dtype=table.dtype)
        unit_np, table_np, out_np = unit_xyz.detach().numpy(), table_c.numpy(), out.numpy()
        args = (*constants.arrays(), smooth)
        _run([lambda a=a, b=b: _forward(unit_np, table_np, *args, a, b, out_np)
              for a, b in _blocks(n, torch.get_num_threads())])
        ctx.save_for_backward(unit_xyz, table_c)
        ctx.constants, ctx.smooth = constants, smooth
        return out.view(n, constants.n_levels * n_features)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        unit_xyz, table = ctx.saved_tensors
        constants, smooth = ctx.constants, ctx.smooth
        need_unit, need_table = ctx.needs_input_grad[:2]
        n, n_levels, n_features = unit_xyz.shape[0], constants.n_levels, table.shape[1]
        grad = grad_out.to(table.dtype).contiguous().view(n, n_levels, n_features)
        unit_np, table_np, grad_np = unit_xyz.detach().numpy(), table.numpy(), grad.numpy()
        workers = torch.get_num_threads()
        grad_table = grad_unit = None
        if need_table:  # no points: no tasks, a zero gradient
            grad_table = torch.zeros_like(table)
            splits = max(1, min(_MAX_LEVEL_SPLITS, workers // n_levels))
            tasks, scratch = [], []
            for level in range(n_levels):
                first, rows = int(constants.offset[level]), constants.rows[level]
                for k, (a, b) in enumerate(_blocks(n, splits)):
                    # The first block adds straight into the gradient, the others into scratch rows.
                    target, shift = grad_table, np.uint64(0)
                    if k:
                        target, shift = torch.zeros(rows, n_features, dtype=table.dtype), np.uint64(first)
                        scratch.append((first, target))
                    tasks.append(lambda lv=level, a=a, b=b, t=target.numpy(), s=shift: _backward_table(
                        unit_np, grad_np, *constants.arrays(), smooth, lv, a, b, s, t))
            _run(tasks)
            for first, rows in scratch:
                grad_table[first : first + rows.shape[0]] += rows
        if need_unit:
            grad_unit = torch.zeros_like(unit_xyz)
            grad_unit_np = grad_unit.numpy()
            args = (*constants.arrays(), smooth)
            _run([lambda a=a, b=b: _backward_positions(unit_np, table_np, grad_np, *args, a, b, grad_unit_np)
                  for a, b in _blocks(n, workers)])
        return grad_unit, grad_table, None, None


def encode_points_cpu(
    unit_xyz: torch.Tensor, table: torch.Tensor, constants: CpuLevelConstants, smooth: bool
) -> torch.Tensor:
    """Encoding ``(N, L * F)`` of points ``(N, 3)`` (unit coordinates ``(x, y, z)``, CPU) by the levels described
    by ``constants``, whose rows lie in ``table`` ``(rows, F)`` (float32 or float64; the output and gradients
    have its dtype). Differentiable with respect to ``unit_xyz`` and ``table``.
    """
    if numba is None:
        raise RuntimeError("Numba is not installed")
    if table.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"the CPU kernels need a float32 or float64 table, not {table.dtype}")
    return _CpuLookup.apply(unit_xyz.to(table.dtype), table, constants, bool(smooth))
