"""Memory planning of a fit: how much a training step may use, and how the work is cut to stay within it.

The plan is made once at start-up from the memory available then (``AVAILABLE_FRACTION`` of free CPU RAM or
GPU memory, capped by ``fit.max_memory_gb``); a step that still runs out of memory is retried with less work
(:class:`icetide.fit.Fitter` halves the band or splits the tilts, and records it in ``memory_events``). The
constants were measured as described in docs/BENCHMARKS.md "Memory: batches sized to what is available".
"""

from __future__ import annotations

import resource
from dataclasses import dataclass

import torch

from ..config import ReconstructConfig
from ..memory import available_bytes

__all__ = [
    "AVAILABLE_FRACTION", "BYTES_PER_FIELD_POINT", "LATTICE_VOXELS_PER_STEP", "MemoryPlan", "RECOMPUTE_PIECE_VOXELS",
    "auto_lattice_rows", "field_bytes_per_point", "is_out_of_memory", "memory_budget_bytes", "peak_memory_mb",
    "plan_memory",
]

# Voxels evaluated per lattice step when ``lattice_rows`` is not set (a few GB for the default volume on CPU).
LATTICE_VOXELS_PER_STEP = 8_000_000
# Memory per field evaluation in a training step of the default volume (forward and backward of encoding + MLP,
# the lattice's projections), with a margin; see field_bytes_per_point.
BYTES_PER_FIELD_POINT = 600
# Voxels per piece of a lattice band whose activations are recomputed in the backward pass (fit.recompute_field):
# smaller pieces hold less memory and cost more host time (docs/BENCHMARKS.md "Memory and time at the paper's
# scale").
RECOMPUTE_PIECE_VOXELS = 2**19
# Fraction of the memory available at start-up that a fit plans to use.
AVAILABLE_FRACTION = 0.7


def memory_budget_bytes(device: torch.device, max_memory_gb: float | None) -> int | None:
    """Bytes a training step may use: ``AVAILABLE_FRACTION`` of the available memory (CPU RAM or free GPU
    memory), capped by ``max_memory_gb``; None when neither is known."""
    available = available_bytes(device)
    budgets = [b for b in (
        None if available is None else int(available * AVAILABLE_FRACTION),
        None if max_memory_gb is None else int(max_memory_gb * 2**30),
    ) if b is not None]
    return min(budgets) if budgets else None


def field_bytes_per_point(volume, mixed_precision: bool = False, recompute: bool = False) -> int:
    """Memory a training step holds per field evaluation, bytes, for the volume settings ``volume`` (``L`` levels
    of ``F`` features, ``N`` hidden layers of ``H``): ``4 (6 L F + H N) + 64`` in fp32, ``12 L F + 2 H N + 64`` in
    mixed precision (bf16 activations), 64 when the activations are recomputed (``fit.recompute_field``: the
    densities, their gradients, the projections). A margin above the slope of the measured peak over the band
    size (docs/BENCHMARKS.md "Memory and time at the paper's scale")."""
    if recompute:
        return 64
    lf, hn = volume.n_levels * volume.n_features, volume.hidden * volume.n_hidden_layers
    return 12 * lf + 2 * hn + 64 if mixed_precision else 4 * (6 * lf + hn) + 64


def auto_lattice_rows(
    shape_zyx: tuple[int, int, int],
    budget_voxels: int = LATTICE_VOXELS_PER_STEP,
    memory_bytes: int | None = None,
    bytes_per_point: int = BYTES_PER_FIELD_POINT,
) -> int:
    """Rows per lattice band so that one step evaluates at most ``budget_voxels`` (all rows when they fit),
    and fewer when ``memory_bytes`` would not hold them at ``bytes_per_point`` each (at least 4 rows)."""
    nz, ny, nx = shape_zyx
    if memory_bytes is not None:
        budget_voxels = min(budget_voxels, memory_bytes // bytes_per_point)
    return int(min(ny, max(4, budget_voxels // (nz * nx))))


@dataclass
class MemoryPlan:
    """What a fit plans at start-up. ``budget_bytes``: for everything (None: unknown); ``step_bytes``: for a
    step's field evaluations, after the fixed part; ``lattice_rows``: rows per lattice band (unbinned);
    ``point_bytes``: per field evaluation; ``recompute_voxels``: voxels per recomputed piece (None: no
    recomputation)."""

    budget_bytes: int | None
    step_bytes: int | None
    lattice_rows: int
    point_bytes: int
    recompute_voxels: int | None

def plan_memory(
    config: ReconstructConfig,
    device: torch.device,
    model_shape_zyx: tuple[int, int, int],
    table_numels: list[int],
    image_numel: int,
    binned: bool,
    recompute: bool,
) -> MemoryPlan:
    """The memory plan of a fit of the volumes whose encoding tables hold ``table_numels`` entries each, on a
    series of ``image_numel`` pixels (plus a binned copy when ``binned``); ``recompute``: the renderer can
    recompute activations (then ``fit.recompute_field`` applies)."""
    fit = config.fit
    budget = memory_budget_bytes(device, fit.max_memory_gb)
    mixed = fit.precision == "mixed" and device.type == "cuda"
    recompute = fit.recompute_field and recompute
    point_bytes = field_bytes_per_point(config.volume, mixed, recompute)
    # What a step needs besides its field evaluations: per volume, its table 8 times (parameters, gradients,
    # Adam's two moments, a step's gradient buffers, half-precision copies) and, when recomputing, one
    # piece's activations; the series 3 times (images, masks, warped copies).
    fixed = sum(8 * 4 * n for n in table_numels) + 3 * 4 * image_numel
    if binned:
        fixed += image_numel  # the binned series: a quarter of the size, 4 bytes per pixel
    if recompute:
        fixed += len(table_numels) * RECOMPUTE_PIECE_VOXELS * field_bytes_per_point(config.volume, mixed)
    step_bytes = None if budget is None else max(0, budget - fixed)
    per_volume = None if step_bytes is None else step_bytes // len(table_numels)
    rows = fit.lattice_rows or auto_lattice_rows(model_shape_zyx, memory_bytes=per_volume, bytes_per_point=point_bytes)
    return MemoryPlan(budget, step_bytes, rows, point_bytes, RECOMPUTE_PIECE_VOXELS if recompute else None)


def is_out_of_memory(exc: BaseException) -> bool:
    """A failed allocation: CUDA's ``OutOfMemoryError`` or the CPU allocator's ``RuntimeError``."""
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)
    )


def peak_memory_mb(device: torch.device) -> dict:
    """The process's peak resident memory and, on CUDA, the device's peak allocation, MB."""
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"cpu_peak_rss_mb": rss_kb / 1024}
    if device.type == "cuda":
        out["gpu_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out
