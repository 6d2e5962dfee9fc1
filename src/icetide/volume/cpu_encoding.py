"""The hash encoding's fused CPU kernels, compiled with Numba (the CPU counterpart of :mod:`.triton_encoding`).

For each point and level a kernel computes the cell's 8 corner rows (dense row or spatial hash, as
:mod:`icetide.volume.encoding` defines them), reads their ``F`` features straight from the table and
interpolates (x, then y, then z): nothing of size ``N x 8`` is ever stored, and each point costs a few dozen
scalar operations where the PyTorch path makes about twenty passes over chunk-sized buffers. The backward
recomputes the corners: the table gradient adds ``weight x output gradient`` into the rows, the position
gradient is the analytic derivative of the interpolation (zero outside ``[0, 1]``, where the encoding clamps).

Each kernel computes a point's cell ``_AHEAD`` points before its turn and asks the memory system for the
cell's rows then (an LLVM prefetch): in a level of tens of MB the rows of random points are scattered over
memory, and the lookups that waited for each row in turn spent most of their time waiting
(docs/BENCHMARKS.md "Rows requested ahead").

Reals are computed in float64 whatever the table's dtype (outputs and gradients are stored in it). A NaN
coordinate is read as 0, as the Triton kernels do, so that a row index is never out of range.

Parallelism. The kernels release the GIL; :func:`encode_points_cpu` splits the work over
``torch.get_num_threads()`` Python threads: the forward and the position gradient by blocks of points, the
table gradient by levels (levels own disjoint rows, so no two threads add into the same row). When there are
fewer levels than threads, a level is also split by points, the extra blocks adding into scratch copies of
the level's rows that are summed at the end (at most ``_MAX_LEVEL_SPLITS`` blocks per level).

Compiled on first use and cached on disk by Numba (about 10 s once per install; in every new process where
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
    from llvmlite import binding as _llvm
    from llvmlite import ir as _ir
    from numba.core import cgutils as _cgutils
    from numba.core import types as _types
    from numba.extending import intrinsic as _intrinsic
except ImportError:  # pragma: no cover - depends on the install
    numba = None

__all__ = ["kernel_available", "CpuLevelConstants", "encode_points_cpu"]

_MAX_LEVEL_SPLITS = 4
# Points whose corner rows are computed, and requested from memory, ahead of their use (a power of two). The
# table gradient is added into that way only in levels of more than _PREFETCH_BYTES: in smaller ones the staging
# costs more than it saves (measured: docs/BENCHMARKS.md, "Rows requested ahead").
_AHEAD = 8
_PREFETCH_BYTES = 8 << 20


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

    @_intrinsic
    def _request(typingctx, array, row, hint):
        """``_request(array, row, hint)``: asks the memory system for the start of row ``row`` of a 2-D array, to
        read it (``hint`` 1) or to write it (2); 0: nothing. A hint to the processor: it never faults and changes no
        value."""

        def codegen(context, builder, signature, args):
            array_type = signature.args[0]
            view = context.make_array(array_type)(context, builder, args[0])
            zero = context.get_constant(_types.intp, 0)
            pointer = _cgutils.get_item_pointer(context, builder, array_type, view, [args[1], zero],
                                                wraparound=False)
            byte_pointer = _ir.IntType(8).as_pointer()
            i32 = _ir.IntType(32)
            # The intrinsic's name carries its pointer type: "p0" where LLVM has opaque pointers (15+).
            name = "llvm.prefetch.p0" if _llvm.llvm_version_info[0] >= 15 else "llvm.prefetch.p0i8"
            function = _cgutils.get_or_insert_function(
                builder.module, _ir.FunctionType(_ir.VoidType(), [byte_pointer, i32, i32, i32]), name)
            hint = context.cast(builder, args[2], signature.args[2], _types.intp)
            for value, write in ((1, 0), (2, 1)):  # the read/write flag must be a constant
                with builder.if_then(builder.icmp_signed("==", hint, hint.type(value))):
                    # (address, read 0 / write 1, locality 3: keep in every cache level, data cache)
                    builder.call(function, [builder.bitcast(pointer, byte_pointer), i32(write), i32(3), i32(1)])
            return context.get_dummy_value()

        return _types.void(array, row, hint), codegen

    @_inline
    def _stage(unit, j, resolution, last_cell, multiplier, mask, hashed, offset, level, smooth, reals, rows,
               target, shift, hint):
        """Point ``j``'s cell into slot :func:`_slot` of ``reals`` (weights, slopes) and ``rows``, and a request
        for its 8 rows of ``target`` (rows minus ``shift``; ``hint`` as :func:`_request`), so that they are in cache
        when the point's turn comes, ``_AHEAD`` points later (:func:`_staged` reads them back)."""
        (sx, sy, sz), (dx, dy, dz), r = _cell(unit, j, resolution, last_cell, multiplier, mask, hashed, offset,
                                              level, smooth)
        slot = _slot(j)
        reals[slot, 0], reals[slot, 1], reals[slot, 2] = sx, sy, sz
        reals[slot, 3], reals[slot, 4], reals[slot, 5] = dx, dy, dz
        for c in range(8):
            rows[slot, c] = r[c]
            _request(target, r[c] - shift, hint)

    @_inline
    def _slot(i):
        """Point ``i``'s slot in the staging arrays: unsigned, so that indexing with it needs no check for
        negative indices (``i`` is negative in a kernel's lead-in when the range starts below ``_AHEAD``)."""
        return np.uint64(i) & np.uint64(_AHEAD - 1)

    @_inline
    def _staged(reals, rows, slot):
        """The cell staged in ``slot`` by :func:`_stage`, as :func:`_cell` returns it."""
        return ((reals[slot, 0], reals[slot, 1], reals[slot, 2]), (reals[slot, 3], reals[slot, 4], reals[slot, 5]),
                (rows[slot, 0], rows[slot, 1], rows[slot, 2], rows[slot, 3],
                 rows[slot, 4], rows[slot, 5], rows[slot, 6], rows[slot, 7]))

    @_jit
    def _forward(unit, table, resolution, last_cell, multiplier, mask, hashed, offset, smooth,
                 point_start, point_stop, out):
        """``out[i, level, f]`` for the points of the range, every level."""
        n_features = table.shape[1]
        reals, rows, shift = np.empty((_AHEAD, 6)), np.empty((_AHEAD, 8), np.uint64), np.uint64(0)
        for level in range(resolution.shape[0]):  # level-major: one level's rows stay in cache
            # Each kernel reads point i's cell, staged _AHEAD points earlier, then stages point i + _AHEAD in its
            # slot; the lead-in (i < point_start) only stages (what it reads there is unused).
            for i in range(point_start - _AHEAD, point_stop):
                (sx, sy, sz), _, r = _staged(reals, rows, _slot(i))
                if i + _AHEAD < point_stop:
                    _stage(unit, i + _AHEAD, resolution, last_cell, multiplier, mask, hashed, offset, level, smooth,
                           reals, rows, table, shift, 1)
                if i < point_start:
                    continue
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
                        level, point_start, point_stop, row_shift, grad_table, hint):
        """``grad_table[row - row_shift] += corner weight x grad[i, level]`` for the points of the range; ``hint``
        2: the cells staged and their rows requested ahead of use, as in :func:`_forward`; 0: each cell computed in
        its turn."""
        n_features = grad.shape[2]
        reals, rows = np.empty((_AHEAD, 6)), np.empty((_AHEAD, 8), np.uint64)
        for i in range(point_start - _AHEAD if hint else point_start, point_stop):  # staged as in _forward
            if hint:
                cell = _staged(reals, rows, _slot(i))
                if i + _AHEAD < point_stop:
                    _stage(unit, i + _AHEAD, resolution, last_cell, multiplier, mask, hashed, offset, level, smooth,
                           reals, rows, grad_table, row_shift, hint)
                if i < point_start:
                    continue
            else:
                cell = _cell(unit, i, resolution, last_cell, multiplier, mask, hashed, offset, level, smooth)
            (sx, sy, sz), _, r = cell
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
        reals, rows, shift = np.empty((_AHEAD, 6)), np.empty((_AHEAD, 8), np.uint64), np.uint64(0)
        for level in range(resolution.shape[0]):
            for i in range(point_start - _AHEAD, point_stop):  # staged as in _forward
                (sx, sy, sz), (dx, dy, dz), r = _staged(reals, rows, _slot(i))
                if i + _AHEAD < point_stop:
                    _stage(unit, i + _AHEAD, resolution, last_cell, multiplier, mask, hashed, offset, level, smooth,
                           reals, rows, table, shift, 1)
                if i < point_start:
                    continue
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
            # Largest levels first: the threads then finish together (each takes the next task when free).
            for level in sorted(range(n_levels), key=lambda lv: -constants.rows[lv]):
                first, rows = int(constants.offset[level]), constants.rows[level]
                hint = 2 if rows * n_features * table.element_size() > _PREFETCH_BYTES else 0
                for k, (a, b) in enumerate(_blocks(n, splits)):
                    # The first block adds straight into the gradient, the others into scratch rows.
                    target, shift = grad_table, np.uint64(0)
                    if k:
                        target, shift = torch.zeros(rows, n_features, dtype=table.dtype), np.uint64(first)
                        scratch.append((first, target))
                    tasks.append(lambda lv=level, a=a, b=b, t=target.numpy(), s=shift, h=hint: _backward_table(
                        unit_np, grad_np, *constants.arrays(), smooth, lv, a, b, s, t, h))
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
