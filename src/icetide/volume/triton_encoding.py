"""The hash encoding's fused GPU kernels, in Triton (the CUDA counterpart of :mod:`.cpu_encoding`).

One program handles ``BLOCK`` points of one level: it computes the 8 corner rows of each point's cell (dense
row or spatial hash, as :mod:`icetide.volume.encoding` defines them), gathers their ``F`` features straight
from the table, interpolates, and writes the level's ``F`` output columns; nothing of size ``N x 8`` is ever
stored. The backward kernel recomputes the corners, adds ``weight x output gradient`` into the table gradient
with atomic adds (fp32), and, when the positions need a gradient (deformations being fitted), the analytic
derivative of the interpolation, also by atomic adds across levels.

Tables may be read in half precision (``table_dtype``): the fp32 parameter stays the master copy, a
half-precision copy is made for the gathers of each call, and gradients are accumulated in fp32.

Selected automatically for CUDA tensors when Triton imports (:func:`kernel_available`); the tests compare it
with the PyTorch path. ``TRITON_INTERPRET=1`` runs the same kernels on CPU tensors (slowly), which is how they
are tested without a GPU.
"""

from __future__ import annotations

import os

import torch

try:  # Triton ships with CUDA builds of PyTorch; CPU-only installs have none.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None

__all__ = ["kernel_available", "LevelConstants", "encode_points_triton"]

_BLOCK = 128


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def kernel_available(device: torch.device) -> bool:
    """Whether the Triton kernels can run on ``device``: Triton imports and the device is CUDA (or any device
    under ``TRITON_INTERPRET=1``)."""
    return triton is not None and (device.type == "cuda" or _interpreting())


class LevelConstants:
    """Per-level constants of consecutive levels, as small device tensors the kernels read.

    ``resolution`` / ``last_cell`` ``(L, 3)`` float32; ``multiplier`` ``(L, 3)`` int64 (dense: ``1, G_x,
    G_x G_y``; hashed: the primes); ``mask`` ``(L,)`` int64 (``T - 1`` when hashed, ``-1`` when dense, so that
    it keeps every bit); ``hashed`` ``(L,)`` int32; ``offset`` ``(L,)`` int64 (first table row).
    """

    def __init__(self, levels, primes: tuple[int, int, int], device: torch.device):
        def tensor(values, dtype):
            return torch.tensor(values, dtype=dtype, device=device)

        self.n_levels = len(levels)
        self.resolution = tensor([lv.resolution_xyz for lv in levels], torch.float32)
        self.last_cell = tensor([[g - 2 for g in lv.vertices_xyz] for lv in levels], torch.float32)
        self.multiplier = tensor(
            [primes if not lv.dense else (1, lv.vertices_xyz[0], lv.vertices_xyz[0] * lv.vertices_xyz[1])
             for lv in levels], torch.int64,
        )
        self.mask = tensor([-1 if lv.dense else lv.rows - 1 for lv in levels], torch.int64)
        self.hashed = tensor([0 if lv.dense else 1 for lv in levels], torch.int32)
        self.offset = tensor([lv.offset for lv in levels], torch.int64)


if triton is not None:

    @triton.jit
    def _axis(unit_ptr, points, valid, axis: tl.constexpr, level, res_ptr, last_ptr, mult_ptr, mask,
              SMOOTH: tl.constexpr):
        """One axis of a point's cell: the upper-corner weight, its slope, and the two per-axis row terms."""
        u = tl.load(unit_ptr + points * 3 + axis, mask=valid, other=0.0).to(tl.float32)
        inside = (u >= 0.0) & (u <= 1.0)
        u = tl.minimum(tl.maximum(u, 0.0), 1.0)
        resolution = tl.load(res_ptr + level * 3 + axis)
        p = u * resolution
        lower = tl.minimum(tl.floor(p), tl.load(last_ptr + level * 3 + axis))
        frac = p - lower
        if SMOOTH:
            weight = frac * frac * (3.0 - 2.0 * frac)
            slope = 6.0 * frac * (1.0 - frac) * resolution
        else:
            weight = frac
            slope = tl.zeros_like(frac) + resolution
        multiplier = tl.load(mult_ptr + level * 3 + axis)
        term0 = lower.to(tl.int64) * multiplier
        term1 = term0 + multiplier
        return weight, slope, term0 & mask, term1 & mask, inside

    @triton.jit
    def _program(n_points, BLOCK: tl.constexpr, mask_ptr, hashed_ptr, offset_ptr):
        """This program's level, its points (int64 indices) and which are in range, and the level's index
        mask, hashed flag and first table row."""
        level = tl.program_id(1)
        points = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask, hashed, offset = tl.load(mask_ptr + level), tl.load(hashed_ptr + level), tl.load(offset_ptr + level)
        return level, points, points < n_points, mask, hashed, offset

    @triton.jit
    def _corner(corner: tl.constexpr, sx, sy, sz, x0, x1, y0, y1, z0, z1, hashed, offset):
        """Per-axis weights ``(wx, wy, wz)`` and table row of corner ``corner`` (bit a: upper along axis a).

        The per-axis terms are XORed (hashed level) or summed (dense), plus the level's offset. ``corner`` is
        a compile-time constant, so the choices between lower and upper are resolved at compile time.
        """
        cx: tl.constexpr = corner & 1
        cy: tl.constexpr = (corner >> 1) & 1
        cz: tl.constexpr = (corner >> 2) & 1
        tx = x1 if cx else x0
        ty = y1 if cy else y0
        tz = z1 if cz else z0
        row = tl.where(hashed != 0, tx ^ ty ^ tz, tx + ty + tz) + offset
        return sx if cx else 1.0 - sx, sy if cy else 1.0 - sy, sz if cz else 1.0 - sz, row

    @triton.jit
    def _encode_forward_kernel(
        unit_ptr, table_ptr, out_ptr, res_ptr, last_ptr, mult_ptr, mask_ptr, hashed_ptr, offset_ptr,
        n_points, out_columns, F: tl.constexpr, BLOCK: tl.constexpr, SMOOTH: tl.constexpr,
    ):
        level, points, valid, mask, hashed, offset = _program(n_points, BLOCK, mask_ptr, hashed_ptr, offset_ptr)
        features = tl.arange(0, F)
        sx, _, x0, x1, _ = _axis(unit_ptr, points, valid, 0, level, res_ptr, last_ptr, mult_ptr, mask, SMOOTH)
        sy, _, y0, y1, _ = _axis(unit_ptr, points, valid, 1, level, res_ptr, last_ptr, mult_ptr, mask, SMOOTH)
        sz, _, z0, z1, _ = _axis(unit_ptr, points, valid, 2, level, res_ptr, last_ptr, mult_ptr, mask, SMOOTH)
        acc = tl.zeros((BLOCK, F), dtype=tl.float32)
        for corner in tl.static_range(8):
            wx, wy, wz, row = _corner(corner, sx, sy, sz, x0, x1, y0, y1, z0, z1, hashed, offset)
            feats = tl.load(table_ptr + row[:, None] * F + features[None, :], mask=valid[:, None], other=0.0)
            acc += (wx * wy * wz)[:, None] * feats.to(tl.float32)
        column = level * F + features
        tl.store(out_ptr + points[:, None] * out_columns + column[None, :], acc, mask=valid[:, None])

    @triton.jit
    def _encode_backward_kernel(
        unit_ptr, table_ptr, grad_out_ptr, grad_table_ptr, grad_unit_ptr,
        res_ptr, last_ptr, mult_ptr, mask_ptr, hashed_ptr, offset_ptr,
        n_points, out_columns, F: tl.constexpr, BLOCK: tl.constexpr, SMOOTH: tl.constexpr,
        NEED_TABLE: tl.constexpr, NEED_UNIT: tl.constexpr,
    ):
        level, points, valid, mask, hashed, offset = _program(n_points, BLOCK, mask_ptr, hashed_ptr, offset_ptr)
        features = tl.arange(0, F)
        sx, dx, x0, x1, in_x = _axis(unit_ptr, points, valid, 0, level, res_ptr, last_ptr, mult_ptr, mask, SMOOTH)
        sy, dy, y0, y1, in_y = _axis(unit_ptr, points, valid, 1, level, res_ptr, last_ptr, mult_ptr, mask, SMOOTH)
        sz, dz, z0, z1, in_z = _axis(unit_ptr, points, valid, 2, level, res_ptr, last_ptr, mult_ptr, mask, SMOOTH)
        column = level * F + features
        grad = tl.load(grad_out_ptr + points[:, None] * out_columns + column[None, :], mask=valid[:, None],
                       other=0.0).to(tl.float32)
        gx = tl.zeros((BLOCK,), dtype=tl.float32)
        gy = tl.zeros((BLOCK,), dtype=tl.float32)
        gz = tl.zeros((BLOCK,), dtype=tl.float32)
        for corner in tl.static_range(8):
            wx, wy, wz, row = _corner(corner, sx, sy, sz, x0, x1, y0, y1, z0, z1, hashed, offset)
            where = row[:, None] * F + features[None, :]
            if NEED_TABLE:
                tl.atomic_add(grad_table_ptr + where, (wx * wy * wz)[:, None] * grad, mask=valid[:, None])
            if NEED_UNIT:
                feats = tl.load(table_ptr + where, mask=valid[:, None], other=0.0).to(tl.float32)
                dot = tl.sum(feats * grad, axis=1)
                # d(weight)/d(s_a) is +1 for the upper corner along a and -1 for the lower one.
                gx += (1.0 if corner & 1 else -1.0) * wy * wz * dot
                gy += (1.0 if (corner >> 1) & 1 else -1.0) * wx * wz * dot
                gz += (1.0 if (corner >> 2) & 1 else -1.0) * wx * wy * dot
        if NEED_UNIT:
            # The clamp to [0, 1] passes no gradient outside the box.
            tl.atomic_add(grad_unit_ptr + points * 3 + 0, tl.where(in_x, gx * dx, 0.0), mask=valid)
            tl.atomic_add(grad_unit_ptr + points * 3 + 1, tl.where(in_y, gy * dy, 0.0), mask=valid)
            tl.atomic_add(grad_unit_ptr + points * 3 + 2, tl.where(in_z, gz * dz, 0.0), mask=valid)


class _TritonLookup(torch.autograd.Function):
    """Autograd wrapper of the two kernels; saves only the inputs (the backward recomputes the corners)."""

    @staticmethod
    def forward(ctx, unit_xyz, table, constants, smooth, table_dtype):  # type: ignore[override]
        unit_xyz = unit_xyz.contiguous()
        n, n_features = unit_xyz.shape[0], table.shape[1]
        gathered = table.detach().to(table_dtype).contiguous()
        out = torch.empty(n, constants.n_levels * n_features, device=unit_xyz.device, dtype=torch.float32)
        if n:
            grid = (triton.cdiv(n, _BLOCK), constants.n_levels)
            _encode_forward_kernel[grid](
                unit_xyz, gathered, out, constants.resolution, constants.last_cell, constants.multiplier,
                constants.mask, constants.hashed, constants.offset, n, out.shape[1],
                F=n_features, BLOCK=_BLOCK, SMOOTH=smooth,
            )
        ctx.save_for_backward(unit_xyz, gathered)
        ctx.constants, ctx.smooth, ctx.table_shape, ctx.table_dtype = constants, smooth, table.shape, table.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        unit_xyz, gathered = ctx.saved_tensors
        constants = ctx.constants
        need_unit, need_table = ctx.needs_input_grad[:2]
        n, n_features = unit_xyz.shape[0], ctx.table_shape[1]
        grad_table = torch.zeros(ctx.table_shape, device=grad_out.device, dtype=torch.float32)
        grad_unit = torch.zeros(n, 3, device=grad_out.device, dtype=torch.float32)
        if n and (need_unit or need_table):
            grid = (triton.cdiv(n, _BLOCK), constants.n_levels)
            _encode_backward_kernel[grid](
                unit_xyz, gathered, grad_out.contiguous(), grad_table, grad_unit,
                constants.resolution, constants.last_cell, constants.multiplier, constants.mask, constants.hashed,
                constants.offset, n, grad_out.shape[1], F=n_features, BLOCK=_BLOCK, SMOOTH=ctx.smooth,
                NEED_TABLE=bool(need_table), NEED_UNIT=bool(need_unit),
            )
        return (
            grad_unit.to(unit_xyz.dtype) if need_unit else None,
            grad_table.to(ctx.table_dtype) if need_table else None,
            None, None, None,
        )


def encode_points_triton(
    unit_xyz: torch.Tensor,
    table: torch.Tensor,
    constants: LevelConstants,
    smooth: bool,
    table_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Encoding ``(N, L * F)`` float32 of points ``(N, 3)`` (unit coordinates ``(x, y, z)``) by the levels
    described by ``constants``, whose rows lie in ``table`` ``(rows, F)``; ``F`` must be a power of two.

    ``table_dtype``: precision of the gathers (float32, float16 or bfloat16); gradients are fp32.
    Differentiable with respect to ``unit_xyz`` and ``table``.
    """
    if triton is None:
        raise RuntimeError("Triton is not installed")
    n_features = table.shape[1]
    if n_features & (n_features - 1):
        raise ValueError(f"the Triton kernel needs a power-of-two feature count, not {n_features}")
    return _TritonLookup.apply(unit_xyz, table, constants, bool(smooth), table_dtype)
