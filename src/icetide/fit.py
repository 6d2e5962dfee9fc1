"""The joint optimisation of the implicit volume and the per-tilt deformations (paper section II.C).

Loss: mean absolute error between predicted and observed pixel values (exact pixel centres; the data are
never interpolated) plus the deformation penalty of paper eq. 7 on the deviation from the starting
deformations. Adam with one learning rate per parameter group (volume, shifts, rotations, local fields);
deformations are frozen for ``warmup_epochs``; every learning rate is multiplied by ``lr_decay_factor`` every
``lr_decay_every`` epochs. A random ``validation_fraction`` of the pixels is held out; after each validation
pass the best state so far is kept, and fitting stops after ``patience`` passes without improvement, counted
once every deformation is released (after ``warmup_epochs`` and, with local fields, ``local_delay_epochs``).

Coarse-to-fine sampling (``binned_epochs``): the first epochs fit the series binned by 2 (:func:`bin_by_two`),
predicted from the field on every other voxel, a quarter of the pixels and an eighth of the field evaluations;
the deformations keep their unbinned units (the binned pixel centres are deformed, then halved). Their held-out
loss is not comparable with the unbinned one, so the binned stage has its own early stopping: it ends before its
plan after ``patience`` binned validations without improvement (noisy data), and the fit goes on unbinned from
the binned stage's best state; the best state and early stopping of the fit start with the first unbinned epoch.
By default the encoding's levels enter one after another over the planned binned stage (``coarse_to_fine_epochs``).

A step whose loss or gradient norm is not finite is skipped: the model and both optimisers go back to the
"last good" state (taken after every completed epoch), every learning rate is halved for the rest of the fit,
and the event is listed in ``report["rollbacks"]`` (epoch and step counted from 1, reason, learning-rate factor
after the halving). After ``max_rollbacks`` of these the next one ends the fit ("numerical failure") with the
best state so far.

State is plain tensors and state dicts: ``checkpoint.pt`` holds the volume and optimiser state dicts, the
deformation tensors, the random generator state, the best state, the curves, the rollbacks and the learning-rate
factor; resuming continues exactly.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
import logging
import math
import platform
import resource
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .config import ReconstructConfig
from .ctf import SeriesCtf
from .data import TiltSeries
from .deform import (
    Deformations, deform_grid, deformation_penalty, local_displacement_grid, remove_gauge, smoothness_penalty,
)
from .errors import IcetideError
from .geometry import centered_coords, default_thickness, deg2rad, slab_padding_px
from .io.util import atomic_path
from .memory import available_bytes
from .render import LatticeRenderer, RaysRenderer, make_renderer
from .runtime import distributed_rank, resolve_device
from .volume import ImplicitVolume, VolumeConfig

__all__ = ["FitResult", "Fitter", "auto_lattice_rows", "field_bytes_per_point", "robust_spread", "pixel_loss"]

log = logging.getLogger(__name__)


class _NumericalFailure(Exception):
    """A non-finite step with no rollback left; the message is the stop reason's detail."""


# Voxels evaluated per lattice step when ``lattice_rows`` is not set: about 4.5 GB of CPU memory for the
# forward and backward pass of the default volume (3.6 GB measured at 6.3 M voxels, 96 x 256 x 256).
LATTICE_VOXELS_PER_STEP = 8_000_000
# Memory per field evaluation in a training step of the default volume (forward and backward of encoding + MLP,
# the lattice's projections), from the measurement above with a margin; see field_bytes_per_point.
BYTES_PER_FIELD_POINT = 600
# The second half volume's encoding grids are finer by this factor: half volumes on identical grids share the
# grids' interpolation artefacts, which correlate them at high frequency (half-map FSC 0.25-0.5 near Nyquist
# where the truth's is 0; below 0.05 with 1.13; docs/RESULTS.md, half maps).
HALF_GRID_SCALE = 1.13
# Voxels per piece of a lattice band whose activations are recomputed in the backward pass (fit.recompute_field):
# about 0.4 GB of activations for the default volume, 0.8 GB for the paper's. Smaller pieces cost more host time
# (per-piece operations): 2**21 halved the epoch time at the paper's scale on an H200, for 2.2 GB more memory.
RECOMPUTE_PIECE_VOXELS = 2**19
# Binned epochs of fit.binned_epochs: None (docs/BENCHMARKS.md "Coarse-to-fine sampling": 80 against 0-120 on
# three simulated problems; also checked on a larger volume, from -20 to 10 dB and on the real needle series,
# alone and with the levels entering over them, fit.coarse_to_fine_epochs: None).
DEFAULT_BINNED_EPOCHS = 80
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
    densities, their gradients, the projections). 18-23 % above what was measured: 1355 / 685 bytes for the
    paper's volume on an H200 (the slope of the peak over the band size, docs/BENCHMARKS.md), 571 for the
    default volume on CPU (3.6 GB at 6.3 M voxels, including the fixed part)."""
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


def robust_spread(images: torch.Tensor, clip_mads: float = 10.0, keep_fraction: float = 0.99) -> float:
    """Standard deviation of ``images`` after clipping values further than ``clip_mads`` scaled MADs from the
    median (hot pixels, dead areas, gold beads do not set the scale), the clip never tighter than the central
    ``keep_fraction`` of the values; equals the plain standard deviation when nothing lies that far out.
    Estimated on at most 4 M evenly spaced pixels.

    The quantile floor matters for sparse images, an object in a mostly empty field (a needle in vacuum): there
    the median and the MAD describe the empty background, and a MAD clip alone cuts the object itself down to
    the background noise (a needle series came out 300 times too small, which threw off every learning rate)."""
    flat = images.reshape(-1)
    sample = flat[:: max(1, flat.numel() // 4_000_000)].double()
    median = sample.median()
    mad = 1.4826 * (sample - median).abs().median()
    if not mad > 0:
        return float(sample.std()) or 1.0
    tail = (1.0 - keep_fraction) / 2
    low, high = torch.quantile(sample, torch.tensor([tail, 1.0 - tail], dtype=sample.dtype))
    clipped = sample.clamp(min(float(median - clip_mads * mad), float(low)),
                           max(float(median + clip_mads * mad), float(high)))
    return float(clipped.std()) or 1.0


def _is_out_of_memory(exc: BaseException) -> bool:
    """A failed allocation: CUDA's ``OutOfMemoryError`` or the CPU allocator's ``RuntimeError``."""
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)
    )


def _peak_memory_mb(device: torch.device) -> dict:
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"cpu_peak_rss_mb": rss_kb / 1024}
    if device.type == "cuda":
        out["gpu_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


@dataclass
class _Scale:
    """The series as the epochs of one sampling scale see it: unbinned (``factor`` 1) or binned by 2
    (``fit.binned_epochs``). Tensors ``(M, ny, nx)`` at this scale; ``u_px``, ``v_px``: its pixel centres in
    unbinned detector pixels (where the deformations act); ``lattice_rows`` and ``rank_rows`` in its rows."""

    factor: int
    shape: tuple[int, int]
    images: torch.Tensor
    half_images: torch.Tensor | None
    held_out: torch.Tensor
    half_mask: torch.Tensor | None
    u_px: torch.Tensor
    v_px: torch.Tensor
    renderer: LatticeRenderer | RaysRenderer
    lattice_rows: int
    rank_rows: slice | None


def bin_by_two(images: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
    """``images (..., ny, nx)`` binned by 2 into ``(..., ny // 2, nx // 2)``: binned pixel ``k`` of an axis of
    ``n`` pixels is centred ``2 k - (n // 2 - 1)`` pixels from the axis centre (every binned grid is centred, as
    the unbinned one is) and is the average over a 2-pixel window there: a pair of pixels on an even axis,
    weights 1/4, 1/2, 1/4 on an odd one. ``reduce="any"`` (boolean masks): whether any pixel of the window is set.
    """
    binned_y = _bin_last_axis_by_two(images.transpose(-1, -2), reduce).transpose(-1, -2)
    return _bin_last_axis_by_two(binned_y, reduce)


def _bin_last_axis_by_two(images: torch.Tensor, reduce: str) -> torch.Tensor:
    """:func:`bin_by_two` along the last axis only."""
    n = images.shape[-1]
    m = n // 2
    if m == 0:
        raise ValueError(f"cannot bin an axis of {n} pixel by 2")
    taps = [images[..., i : i + 2 * m - 1 : 2] for i in range(2 + n % 2)]  # the window's pixels, left to right
    if reduce == "any":
        return functools.reduce(torch.logical_or, taps)
    if n % 2 == 0:
        return (taps[0] + taps[1]) / 2
    return taps[0] / 4 + taps[1] / 2 + taps[2] / 4


@dataclass
class FitResult:
    """What a finished fit hands to the outputs.

    ``volume``: the implicit volume in its best state (with ``fit.half_maps``, the first half's; ``half_volume``
    is the second's, else None); ``deformations``: estimated deformations with the gauge
    removed (see ``translation_xyz``); ``translation_xyz``: the volume translation (voxels) that replaces the
    removed common shift, i.e. the tomogram is ``rho(p - translation)``; ``density_scale``: multiply the field
    by it to get density in the units of the input (line integral per voxel length); ``report``: timings,
    curves, why it stopped.
    """

    volume: ImplicitVolume
    deformations: Deformations
    translation_xyz: np.ndarray
    density_scale: float
    report: dict = field(default_factory=dict)
    half_volume: ImplicitVolume | None = None


class Fitter:
    """Holds the data, the model parameters and the optimiser state of one reconstruction."""

    def __init__(
        self,
        series: TiltSeries,
        config: ReconstructConfig,
        init: Deformations | None = None,
        ctf_tilt_axis_deg: float | None = None,
    ):
        """``ctf_tilt_axis_deg``: the tilt axis on the images that orients the forward model's defocus gradient
        (``ctf.correction: model``); default the series' (:func:`icetide.ctf.tilt_axis_on_images_deg`)."""
        self.config = config
        fit = config.fit
        self.device = resolve_device(fit.device)
        torch.manual_seed(fit.seed)
        self.rank, self.world = distributed_rank()
        # The tilt order and the held-out pixels are drawn alike on every rank; the sampling (jitter, rays) of
        # each rank has its own stream. One process uses one generator for both.
        self.generator = torch.Generator().manual_seed(fit.seed)
        self.sampler = self.generator if self.world == 1 else torch.Generator().manual_seed(fit.seed + 7919 * self.rank)
        ny, nx = series.shape
        self.detector_shape = (ny, nx)
        thickness = config.thickness or default_thickness(series.shape)
        self.shape_zyx = (thickness, ny, nx)  # the tomogram
        pad = slab_padding_px(nx, thickness, float(np.abs(series.tilt_angles_deg).max())) \
            if config.specimen == "slab" else 0
        self.model_shape_zyx = (thickness, ny, nx + 2 * pad)  # where the density is modelled
        self.tilt_angles_deg = series.tilt_angles_deg
        # Tilt indices of a step live on the host (``_on_device`` copies them without waiting); so do the angles
        # the projector looks its matrices up by: no training step waits for the GPU.
        self.theta_host = deg2rad(series.tilt_angles_deg)
        self.theta = self.theta_host.to(self.device)
        self.angle_order = torch.as_tensor(np.argsort(series.tilt_angles_deg, kind="stable"), device=self.device)
        m = series.n_tilts

        images = torch.tensor(series.images, dtype=torch.float32)  # a copy: the input may be read-only
        # Normalise by the spread of the data so one set of learning rates fits every input scale; the
        # field then predicts projections / thickness of order one.
        self.data_scale = robust_spread(images)
        self.images = (images / self.data_scale).to(self.device)
        if (fit.half_maps == "series") != (series.half_images is not None):
            raise IcetideError("fit.half_maps: series needs the second half series (reconstruct --half-series), "
                               "and a second half series needs fit.half_maps: series")
        self.half_images = None if series.half_images is None else (
            torch.tensor(series.half_images, dtype=torch.float32) / self.data_scale
        ).to(self.device)
        self.density_scale = self.data_scale  # tomogram = field * data_scale (renderers divide by thickness)
        held = torch.rand(series.images.shape, generator=self.generator) < fit.validation_fraction
        self.validation_mask = held.to(self.device)
        # Held-out loss sum and pixel count of the current epoch's training steps (fit.validation: steps).
        self.held_out_in_steps = torch.zeros(2, dtype=torch.float64, device=self.device)
        self.epoch_rolled_back = False

        self.volume = self._new_volume()
        # Half maps: a second volume, and which pixels it explains (True) instead of the first one.
        self.half_volume = self._new_volume(HALF_GRID_SCALE) if fit.half_maps != "none" else None
        self.half_mask = _half_mask(fit.half_maps, self.angle_order, series.images.shape, self.generator)

        dc = config.deform
        if init is None:
            init = Deformations.identity(series.tilt_angles_deg, series.shape, dc.local_grid, dc.local_interpolation)
        self.interpolation = dc.local_interpolation
        start = init.tensors(self.device)
        # The known tilt-axis direction is part of the in-plane rotation (docs/CONVENTIONS.md): alpha = -psi.
        start["angles_rad"] = start["angles_rad"] - math.radians(series.tilt_axis_angle_deg)
        start["local_px"] = _regrid(start["local_px"], dc.local_grid, series.shape, init.local_interpolation)
        self.start = {k: v.clone() for k, v in start.items()}
        self.shifts = start["shifts_px"].clone().requires_grad_(dc.shifts)
        self.angles = start["angles_rad"].clone().requires_grad_(dc.rotations)
        self.local = start["local_px"].clone().requires_grad_(dc.local)
        # One rotation shared by all tilts: a mis-set tilt axis is common to every view, so it is estimated
        # without the per-tilt penalty (which would shrink it) and with its own, larger step.
        self.axis_offset = torch.zeros((), device=self.device, requires_grad=dc.axis_offset)
        self.log_gain = torch.zeros(m, device=self.device, requires_grad=dc.gain)
        # The intensity level added to the predictions, in units of data_scale: one per tilt or one in all.
        self.offset = torch.zeros(m if dc.offset == "per_tilt" else (), device=self.device,
                                  requires_grad=dc.offset != "none")
        weights = torch.cos(self.theta) if fit.tilt_weighting == "cos" else torch.ones_like(self.theta)
        self.tilt_weights = weights / weights.mean()
        if dc.local and dc.local_border_fixed and min(dc.local_grid) >= 3:
            # A constant or linear local field is a shift or a rotation: with the border ring held, the
            # local field carries only what the rigid motion cannot, so the split is identifiable.
            interior = torch.zeros(dc.local_grid, device=self.device)
            interior[1:-1, 1:-1] = 1
            self.local.register_hook(lambda grad: grad * interior)

        # Early stopping counts from the release of the last deformation on: the local fields, released late,
        # can lower a held-out loss that had stopped improving without them (docs/BENCHMARKS.md "Early stopping").
        self.release_epochs = fit.warmup_epochs + (fit.local_delay_epochs if dc.local else 0)
        self.binned_epochs = self._plan_binned_epochs(
            config.ctf.correction == "model" and series.defocus_A is not None
        )
        # The levels enter over the planned binned stage unless told otherwise (kept if that stage ends early).
        self.level_epochs = self.binned_epochs if fit.coarse_to_fine_epochs is None else fit.coarse_to_fine_epochs
        self.memory_budget = memory_budget_bytes(self.device, fit.max_memory_gb)
        mixed = fit.precision == "mixed" and self.device.type == "cuda"
        recompute = fit.recompute_field and fit.renderer == "lattice"
        point_bytes = field_bytes_per_point(config.volume, mixed, recompute)
        # What a step needs besides its field evaluations: per volume, its table 8 times (parameters, gradients,
        # Adam's two moments, a step's gradient buffers, half-precision copies) and, when recomputing, one
        # piece's activations; the series 3 times (images, masks, warped copies).
        fixed = sum(8 * 4 * v.encoding.table.numel() for v in self.volumes) + 3 * 4 * self.images.numel()
        if self.binned_epochs:
            fixed += self.images.numel()  # the binned series: a quarter of the size, 4 bytes per pixel
        if recompute:
            fixed += len(self.volumes) * RECOMPUTE_PIECE_VOXELS * field_bytes_per_point(config.volume, mixed)
        step_budget = None if self.memory_budget is None else max(0, self.memory_budget - fixed)
        per_volume = None if step_budget is None else step_budget // len(self.volumes)
        # The band planned for the unbinned lattice; each sampling scale keeps (and shrinks) its own.
        self.lattice_rows = fit.lattice_rows or auto_lattice_rows(self.model_shape_zyx, memory_bytes=per_volume,
                                                                  bytes_per_point=point_bytes)
        self.recompute_voxels = RECOMPUTE_PIECE_VOXELS if recompute else None
        self.scales = self._make_scales()
        # Tilts of a step are rendered in this many groups, gradients accumulated (same step, less memory).
        self.step_chunks = 1
        if fit.renderer == "rays" and step_budget is not None:
            points = self._evaluations_per_step() * point_bytes
            self.step_chunks = int(min(fit.tilts_per_step, max(1, math.ceil(points / max(step_budget, 1)))))
        self.memory_events: list[dict] = []
        # Adam's fused kernel on the CPU: one pass over the 2 M table entries instead of one per elementwise
        # operation (7x faster per step, docs/BENCHMARKS.md "Fused Adam on the CPU"); on CUDA the default one,
        # whose host synchronisations were measured (none per step).
        adam = functools.partial(torch.optim.Adam, fused=True) if self.device.type == "cpu" else torch.optim.Adam
        self.opt_volume = adam([p for v in self.volumes for p in v.parameters()], lr=fit.lr_volume)
        if dc.offset != "none":  # an intensity parameter: it learns with the volume, from the first epoch
            self.opt_volume.add_param_group({"params": [self.offset], "lr": fit.lr_offset, "name": "offset"})
        groups = []
        if dc.shifts:
            groups.append({"params": [self.shifts], "lr": fit.lr_shift_px, "name": "shift"})
        if dc.rotations:
            groups.append({"params": [self.angles], "lr": math.radians(fit.lr_rotation_deg), "name": "rotation"})
        if dc.axis_offset:
            groups.append({"params": [self.axis_offset], "lr": math.radians(fit.lr_axis_deg), "name": "axis"})
        if dc.local:
            groups.append({"params": [self.local], "lr": fit.lr_local_px, "name": "local"})
        if dc.gain:
            groups.append({"params": [self.log_gain], "lr": fit.lr_gain, "name": "gain"})
        self.opt_deform = adam(groups) if groups else None
        self.base_lrs = [g["lr"] for g in self.opt_volume.param_groups] + (
            [g["lr"] for g in self.opt_deform.param_groups] if self.opt_deform else []
        )
        self.epoch = 0
        self.ctf = self._forward_ctf(series, ctf_tilt_axis_deg)
        self.step = 0
        self.samples = 0
        self.best_val = math.inf
        self.best_state: dict | None = None
        self.bad_validations = 0
        # The binned stage's own early stopping, on the held-out pixels binned (see _validate_binned_epoch).
        self.best_binned_val = math.inf
        self.best_binned_state: dict | None = None
        self.bad_binned_validations = 0
        self._scale_override: _Scale | None = None
        self.curves: dict[str, list] = {"epoch": [], "train_loss": [], "val_loss": [], "elapsed_s": [],
                                        "binned_val_loss": []}
        self.elapsed_s = 0.0
        self.lr_factor = 1.0  # halved by every rollback, on top of the decay schedule
        self.rollbacks: list[dict] = []
        self.last_good: dict | None = None

    # ----------------------------------------------------------------- sampling scales
    def _plan_binned_epochs(self, ctf_model: bool) -> int:
        """How many epochs come first at the binned scale: ``fit.binned_epochs``, or for None
        ``DEFAULT_BINNED_EPOCHS`` (at most half of ``fit.epochs``) where binning applies and 0 elsewhere."""
        fit = self.config.fit
        applies = (fit.renderer == "lattice" and fit.half_maps != "pixels" and not ctf_model
                   and min(self.model_shape_zyx) >= 2)
        if fit.binned_epochs is None:
            return min(DEFAULT_BINNED_EPOCHS, fit.epochs // 2) if applies else 0
        if fit.binned_epochs and not applies:
            raise IcetideError("fit.binned_epochs needs the lattice renderer and a volume of at least 2 voxels on "
                               "every axis, and works neither with half_maps: pixels nor with the CTF forward model")
        return fit.binned_epochs

    def _make_scales(self) -> list[_Scale]:
        """The unbinned series and, with ``fit.binned_epochs``, the series binned by 2 (from the current images
        and masks; rebuilt when a checkpoint replaces the masks)."""
        fit = self.config.fit
        ny, nx = self.detector_shape
        scales = []
        for factor in (1, 2) if self.binned_epochs else (1,):
            def binned(t, reduce="mean"):
                return t if t is None or factor == 1 else bin_by_two(t, reduce)

            shape = (ny // factor, nx // factor)
            model_shape = tuple(n // factor for n in self.model_shape_zyx)
            rows = math.ceil(self.lattice_rows / factor)
            rank_rows = None
            if self.world > 1:
                # Data parallel: the lattice renderer splits the rows (each rank renders its band of every tilt;
                # a ray keeps its row), the rays renderer splits the tilts of each step.
                band = math.ceil(shape[0] / self.world)
                rank_rows = slice(min(shape[0], self.rank * band), min(shape[0], (self.rank + 1) * band))
                if fit.renderer == "lattice":
                    rows = band
            renderer = make_renderer(fit.renderer, model_shape, rows, fit.samples_per_voxel, shape[1],
                                     self.recompute_voxels, factor)
            scales.append(_Scale(
                factor, shape, binned(self.images), binned(self.half_images), binned(self.validation_mask, "any"),
                binned(self.half_mask, "any"),
                # Pixel centres, in unbinned pixels: binned pixel k lies 2 (k - (m - 1) / 2) from the centre.
                *(factor * centered_coords(n, device=self.device) for n in shape[::-1]),
                renderer, rows, rank_rows,
            ))
        return scales

    @property
    def scale(self) -> _Scale:
        """The sampling scale of the current epoch: binned during the first ``binned_epochs``."""
        if self._scale_override is not None:
            return self._scale_override
        return self.scales[-1] if self.epoch < self.binned_epochs else self.scales[0]

    @contextlib.contextmanager
    def _at_scale(self, scale: _Scale):
        """Work at ``scale`` whatever the epoch (the validation of the binned epoch just fitted)."""
        previous, self._scale_override = self._scale_override, scale
        try:
            yield
        finally:
            self._scale_override = previous

    def _validate_binned_epoch(self) -> float:
        """The held-out loss of the binned epoch just fitted, on the binned series; keeps the binned stage's best
        state and counts the validations that did not improve on it (after the warm-up)."""
        with self._at_scale(self.scales[-1]):
            val = self._epoch_validation_loss(self.epoch_rolled_back)
        if val < self.best_binned_val:
            self.best_binned_val, self.best_binned_state, self.bad_binned_validations = val, self.snapshot(), 0
        elif self.epoch > self.config.fit.warmup_epochs:
            self.bad_binned_validations += 1
        return val

    def _end_binned_stage(self) -> None:
        """End the binned stage now (at its planned end, or earlier when ``fit.patience`` validations in a row did
        not improve its held-out loss: noisy data whose noise the volume starts to fit), going on unbinned from
        its best state."""
        if self.bad_binned_validations and self.best_binned_state is not None:
            self.restore(self.best_binned_state)
        self.binned_epochs = self.epoch
        self.best_binned_state = None

    # ----------------------------------------------------------------- model pieces
    def _new_volume(self, grid_scale: float = 1.0) -> ImplicitVolume:
        """A freshly initialised implicit volume of the configuration (its encoding's base resolution times
        ``grid_scale``), on the device, with the kernel choice."""
        fit = self.config.fit
        settings = self.config.volume.model_dump()
        settings["base_resolution"] *= grid_scale
        volume = ImplicitVolume.from_config(VolumeConfig(**settings), self.model_shape_zyx)
        volume = volume.to(self.device)
        try:
            volume.set_execution(fit.kernel, fit.precision == "mixed" and self.device.type == "cuda")
        except RuntimeError as exc:
            raise IcetideError(f"fit.kernel: {exc}") from None
        return volume

    def _forward_ctf(self, series: TiltSeries, tilt_axis_deg: float | None) -> SeriesCtf | None:
        """The CTF of the forward model (``ctf.correction: model`` with a known defocus), else None. It filters
        whole predicted images, so it needs the lattice renderer with every row in one band, in one process."""
        settings = self.config.ctf
        if settings.correction != "model" or series.defocus_A is None:
            return None
        if series.pixel_size_A is None:
            raise IcetideError("the CTF forward model needs the pixel size (--pixel-size or the MRC header)")
        rows = self.scales[0].lattice_rows
        if self.config.fit.renderer != "lattice" or self.world > 1 or rows < self.detector_shape[0]:
            raise IcetideError(
                "the CTF forward model filters whole images: it needs the lattice renderer, one process and every "
                f"row in one band (here {rows} of {self.detector_shape[0]} rows fit); use phaseflip"
            )
        axis = series.tilt_axis_angle_deg if tilt_axis_deg is None else tilt_axis_deg
        return SeriesCtf(series.tilt_angles_deg, series.pixel_size_A, series.defocus_A, settings.microscope(),
                         axis, settings.defocus_hand, math.radians(settings.phase_tolerance_deg))

    @property
    def volumes(self) -> list[ImplicitVolume]:
        """The fitted volumes: one, or the two half volumes."""
        return [self.volume] if self.half_volume is None else [self.volume, self.half_volume]

    def _coords(self, tilts: torch.Tensor, pixel_rows: slice | None = None) -> torch.Tensor:
        """Ideal-projection coordinates of every pixel (or every pixel of the detector rows ``pixel_rows``) of
        the given tilts at the current scale, in its pixels, ``(B, P, 2)``."""
        scale = self.scale
        v = scale.v_px if pixel_rows is None else scale.v_px[pixel_rows]
        tilts = self._on_device(tilts)
        local = self.local[tilts] if self.config.deform.local else None
        c = deform_grid(
            scale.u_px, v, self.shifts[tilts], self.angles[tilts] + self.axis_offset, local, self.detector_shape,
            self.interpolation,
        )
        return c.flatten(1, 2) if scale.factor == 1 else c.flatten(1, 2) / scale.factor

    def _on_device(self, tilts: torch.Tensor) -> torch.Tensor:
        """Host tilt indices as an index tensor on the fit's device, copied without waiting for the device."""
        return tilts.to(self.device, non_blocking=True)

    @torch.no_grad()
    def _reach_px(self, steps: int = 0) -> float:
        """A bound on how far the deformations move a pixel, now and after ``steps`` more optimiser steps
        (pixels): ``|x' - x| <= |tau| + 2 |sin(alpha / 2)| (r + Phi) + Phi`` over every tilt (``r`` the detector's
        half-diagonal, ``Phi`` = 1.6 sqrt(2) max|phi| bounding the bicubic field with its overshoot), plus for
        each step twice what an Adam step of the current learning rates moves (about one learning rate per
        parameter; twice for the steps that overshoot it). One host synchronisation; a training epoch takes it
        once, for all its steps (see :meth:`_pixel_rows`)."""
        ny, nx = self.detector_shape
        radius = math.hypot(ny, nx) / 2
        reach = self.shifts.norm(dim=-1)
        phi = torch.zeros_like(reach)
        if self.config.deform.local:
            phi = 1.6 * math.sqrt(2) * self.local.abs().amax(dim=(1, 2, 3))
        turn = 2 * torch.sin((self.angles + self.axis_offset).abs().clamp(max=math.pi) / 2)
        bound, phi_max = torch.stack([(reach + turn * (radius + phi) + phi).max(), phi.max()]).tolist()
        if steps and self.opt_deform is not None and self.epoch >= self.config.fit.warmup_epochs:
            lr = {g["name"]: g["lr"] for g in self.opt_deform.param_groups}
            per_step = (math.sqrt(2) * lr.get("shift", 0.0)
                        + (lr.get("rotation", 0.0) + lr.get("axis", 0.0)) * (radius + phi_max)
                        + 3 * 1.6 * math.sqrt(2) * lr.get("local", 0.0))
            bound += 2 * steps * per_step
        return bound

    def _pixel_rows(self, rows: slice, reach_px: float) -> slice:
        """The detector rows whose pixels can see the lattice band ``rows`` when no pixel moves further than
        ``reach_px`` (:meth:`_reach_px`, unbinned pixels), plus 2 rows for the renderer's sub-voxel jitter and
        rounding; rows of the current scale. The other pixels fall outside the band and would not be scored;
        leaving them out saves their warping."""
        scale = self.scale
        ny = scale.shape[0]
        bound = min(reach_px / scale.factor + 2, ny)
        return slice(max(0, math.floor(rows.start - bound)), min(ny, math.ceil(rows.stop + bound)))

    def _penalty(self, tilts: torch.Tensor) -> torch.Tensor:
        """Paper eq. 7 over ``tilts`` plus, when weighted, the random-walk prior over every tilt."""
        dc = self.config.deform
        tilts = self._on_device(tilts)
        penalty = deformation_penalty(
            self.shifts[tilts] - self.start["shifts_px"][tilts],
            self.angles[tilts] - self.start["angles_rad"][tilts],
            (self.local[tilts] - self.start["local_px"][tilts]) if dc.local else None,
            (dc.penalty_rotation, dc.penalty_shift, dc.penalty_local),
            self.detector_shape,
            self.interpolation,
        )
        if dc.penalty_smooth > 0 and dc.shifts:
            penalty = penalty + dc.penalty_smooth * smoothness_penalty(self.shifts[self.angle_order])
        return penalty

    def _predict(self, tilts: torch.Tensor, jitter: bool, rows: slice | None = None, reach_px: float = math.inf):
        """``(values, valid, pick)`` for the pixels ``pick`` of ``tilts`` (host indices): random pixel indices
        (rays), the detector rows that can see the band ``rows`` when no pixel moves further than ``reach_px``
        (lattice, see :meth:`_pixel_rows`), or None (every pixel). With half maps each pixel's value comes from
        the volume of its half."""
        if rows is not None:
            pick = self._pixel_rows(rows, reach_px)
            whole = pick.start == 0 and pick.stop == self.scale.shape[0]
            values, valid = self._render(self._coords(tilts, pick), tilts, jitter, rows, whole)
        else:
            coords = self._coords(tilts)
            pick = None
            if self.config.fit.renderer == "rays" and jitter:
                n = min(self.config.fit.rays_per_tilt, coords.shape[1])
                pick = torch.stack([torch.randperm(coords.shape[1], generator=self.sampler)[:n] for _ in tilts])
                pick = pick.to(self.device, non_blocking=True)
                coords = torch.gather(coords, 1, pick[..., None].expand(-1, -1, 2))
            values, valid = self._render(coords, tilts, jitter, whole=pick is None)
        return self._of_own_half(values, tilts, pick), valid, pick

    def _of_own_half(self, values: torch.Tensor, tilts: torch.Tensor, pick) -> torch.Tensor:
        """``values (V, B, P)`` -> ``(B, P)``: each pixel's value from its half's volume (the only one if V = 1);
        with two half series every pixel has a value in each, and ``values`` is returned as it is."""
        if len(values) == 1:
            return values[0]
        half_mask = self.scale.half_mask
        if half_mask is None:
            return values
        return torch.where(self._pixels(half_mask, tilts, pick), values[1], values[0])

    def _pixels(self, per_pixel: torch.Tensor, tilts: torch.Tensor, pick) -> torch.Tensor:
        """``per_pixel (M, ny, nx)`` at the pixels ``pick`` of ``tilts`` (see :meth:`_predict`): ``(B, P)``."""
        chosen = per_pixel[self._on_device(tilts)]
        if isinstance(pick, slice):
            chosen = chosen[:, pick]
        chosen = chosen.reshape(len(tilts), -1)
        return torch.gather(chosen, 1, pick) if isinstance(pick, torch.Tensor) else chosen

    def gains(self) -> torch.Tensor:
        """Per-tilt intensity gains ``(M,)``, geometric mean 1 (the volume holds the overall scale)."""
        return torch.exp(self.log_gain - self.log_gain.mean())

    def _render(
        self, coords: torch.Tensor, tilts: torch.Tensor, jitter: bool, rows: slice | None = None, whole: bool = False
    ):
        """Predicted values ``(V, B, P)`` of every volume (``V`` = 1, or 2 with half maps) and the pixels
        valid for all of them ``(B, P)``. ``whole``: the pixels are every pixel of the tilts, in order (then the
        forward model's CTF, if any, applies)."""
        extra = {} if rows is None else {"rows": rows}  # the lattice renderer's band; a random one by default
        rendered = [
            self.scale.renderer.render(volume, coords, self.theta_host[tilts], self.sampler, jitter=jitter, **extra)
            for volume in self.volumes
        ]
        values = torch.stack([v for v, _ in rendered])
        valid = rendered[0][1] if len(rendered) == 1 else rendered[0][1] & rendered[1][1]
        if self.ctf is not None:
            if not whole:
                raise IcetideError("the CTF forward model needs whole images; this step predicted part of them")
            shape = self.detector_shape
            values = torch.stack([
                torch.stack([self.ctf(image.view(shape), int(m)).reshape(-1) for image, m in zip(per_volume, tilts)])
                for per_volume in values
            ])
        if self.config.deform.gain:
            values = values * self.gains()[self._on_device(tilts), None]
        if self.config.deform.offset == "per_tilt":
            values = values + self.offset[self._on_device(tilts), None]
        elif self.config.deform.offset == "common":
            values = values + self.offset
        return values, valid

    def _pixel_loss(self, values: torch.Tensor, obs: torch.Tensor, tilts: torch.Tensor) -> torch.Tensor:
        """Per-pixel data term ``(B, P)`` (``fit.loss``) times each tilt's loss weight; with two half series
        (``values`` and ``obs`` ``(2, B, P)``), the mean of the two halves' terms."""
        loss = pixel_loss(values, obs, self.config.fit.loss) * self.tilt_weights[self._on_device(tilts), None]
        return loss.mean(0) if loss.dim() == 3 else loss

    def _observed(self, tilts: torch.Tensor, pick: torch.Tensor | slice | None, held_out: bool):
        """Observed values and training (or ``held_out``) mask ``(B, P)`` of the pixels ``pick`` (see
        :meth:`_predict`)."""
        scale = self.scale
        obs, mask = self._pixels(scale.images, tilts, pick), self._pixels(scale.held_out, tilts, pick)
        if scale.half_images is not None:
            obs = torch.stack([obs, self._pixels(scale.half_images, tilts, pick)])
        return obs, (mask if held_out else ~mask)

    # ----------------------------------------------------------------- training
    def _set_learning_rates(self) -> None:
        fit = self.config.fit
        factor = fit.lr_decay_factor ** (self.epoch // fit.lr_decay_every) * self.lr_factor
        groups = list(self.opt_volume.param_groups) + (list(self.opt_deform.param_groups) if self.opt_deform else [])
        local_frozen = self.epoch < fit.warmup_epochs + fit.local_delay_epochs
        for g, base in zip(groups, self.base_lrs):
            g["lr"] = 0.0 if (g.get("name") == "local" and local_frozen) else base * factor

    def train_epoch(self) -> float:
        """One pass over every pixel of every tilt: the tilts in random order, and with the lattice renderer
        each band of rows of :meth:`_epoch_bands` in turn; returns the mean training loss of the finite steps.

        The steps never wait for the device (on CUDA: no host synchronisation); the epoch checks once, at its
        end, whether every step was finite. A non-finite step takes no gradient (it is zeroed on the device),
        and the epoch that had one is rolled back (see ``_roll_back``); NaN when every step of the epoch was.
        """
        fit = self.config.fit
        if self.last_good is None:
            self._keep_good()
        self._set_learning_rates()
        self._set_level_weights(self.epoch)
        release = self.epoch >= fit.warmup_epochs and self.opt_deform is not None
        order = torch.randperm(len(self.theta), generator=self.generator)
        steps = [(tilts, bands) for bands in self._epoch_bands() for tilts in order.split(fit.tilts_per_step)]
        self.held_out_in_steps.zero_()
        self.epoch_rolled_back = False
        reach = self._reach_px(len(steps)) if steps[0][1] is not None else math.inf
        records = []
        for tilts, bands in steps:
            data_loss, n_used = self._step_gradients(tilts, bands, reach)
            finite = self._finite_or_zeroed(data_loss)
            self.step += 1
            self.opt_volume.step()
            if release:
                self.opt_deform.step()
            records.append(torch.stack([data_loss.detach().double(), n_used.double(), *finite.double()]))
        losses, used, loss_ok, grads_ok = torch.stack(records).cpu().unbind(1)  # the epoch's one synchronisation
        good = (loss_ok > 0) & (grads_ok > 0)
        if not bool(good.all()):
            first = int(torch.nonzero(~good)[0, 0])
            self.epoch_rolled_back = True
            self._roll_back("non-finite loss" if not loss_ok[first] else "non-finite gradients",
                            self.step - len(steps) + first + 1)
        else:
            self.samples += int(used.sum())
        self.epoch += 1
        self._keep_good()
        return float(losses[good].mean()) if bool(good.any()) else math.nan

    def _set_level_weights(self, epoch: int) -> None:
        """Weights of the encoding's levels during ``epoch`` (0-based) under ``fit.coarse_to_fine_epochs`` (its
        plan, ``level_epochs``): the coarsest level from the start, the others entering one after another (BARF,
        Lin et al. 2021)."""
        epochs = self.level_epochs
        if epochs == 0:
            return
        n_levels = self.volume.encoding.n_levels
        reach = 1 + (n_levels - 1) * min(1.0, epoch / epochs)
        ramp = (reach - torch.arange(n_levels, dtype=torch.float32, device=self.device)).clamp(0, 1)
        weights = (1 - torch.cos(math.pi * ramp)) / 2
        for volume in self.volumes:
            volume.level_weights = None if bool((weights == 1).all()) else weights

    def _epoch_bands(self) -> list[list[slice] | None]:
        """The rows of each step of an epoch (lattice renderer): ``[None]`` (every row in one step) or bands.

        The rows (this rank's rows under torch.distributed) are cut into ``n`` bands of equal height, one Adam
        step each: as many as bands of at most ``lattice_rows`` rows need (one process), and in a binned epoch
        at least ``fit.binned_bands`` (more steps for the same field evaluations where a step is cheap and the
        volume coarse; docs/BENCHMARKS.md "Bands of the binned epochs"). The band edges are shifted by a random
        fraction of a band (so that band edges, where warped pixels fall outside the band and are not scored,
        move from epoch to epoch); the two partial end pieces form one step together. The steps come in random
        order; together they cover every row once.
        """
        if self.config.fit.renderer != "lattice":
            return [None]
        rank_rows = self.scale.rank_rows
        lo, hi = (0, self.scale.shape[0]) if rank_rows is None else (rank_rows.start, rank_rows.stop)
        least = self.config.fit.binned_bands if self.scale.factor > 1 else 1
        # Under torch.distributed a rank's rows beyond its memory are pieces of one step (_row_pieces), not steps.
        needed = 1 if rank_rows is not None else math.ceil((hi - lo) / self.scale.lattice_rows)
        n = min(hi - lo, max(least, needed))
        if n <= 1:
            return [None]
        shift = float(torch.rand((), generator=self.generator))
        edges = [lo + round((i + shift) * (hi - lo) / n) for i in range(n)]
        steps = [[slice(a, b)] for a, b in zip(edges[:-1], edges[1:])]
        steps.append([band for band in (slice(lo, edges[0]), slice(edges[-1], hi)) if band.stop > band.start])
        return [steps[i] for i in torch.randperm(len(steps), generator=self.generator).tolist()]

    def _step_gradients(
        self, tilts: torch.Tensor, bands: list[slice] | None = None, reach_px: float = math.inf
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradients of (mean data term over the used pixels + penalty) for ``tilts`` (host indices; lattice: in
        the rows ``bands``, warping the pixels within ``reach_px`` of them; None: every row, or this rank's band);
        returns the data loss and the number of pixels used, as device tensors. Runs in ``step_chunks`` groups
        of tilts and in bands of at most ``lattice_rows`` rows (the same gradients as one group, summed then
        divided by the pixel count); on running out of memory it shrinks the work and retries."""
        return self._retrying_on_out_of_memory(self._accumulate_gradients, tilts, bands, reach_px)

    def _row_pieces(self, bands: list[slice] | None) -> list[slice | None]:
        """``bands`` (lattice; None: every row) cut into pieces of at most ``lattice_rows`` rows; ``[None]``
        for the rays renderer."""
        if self.config.fit.renderer != "lattice":
            return [None]
        size = self.scale.lattice_rows
        return [slice(r, min(r + size, band.stop))
                for band in (bands or [slice(0, self.scale.shape[0])]) for r in range(band.start, band.stop, size)]

    def _accumulate_gradients(
        self, tilts: torch.Tensor, bands: list[slice] | None, reach_px: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self._zero_grads()
        total = torch.zeros((), device=self.device)
        count = torch.zeros((), device=self.device, dtype=torch.long)
        held_out = torch.zeros(2, dtype=torch.float64, device=self.device)
        mine, rank_rows = self._share(tilts)
        pieces = self._row_pieces(bands if bands is not None or rank_rows is None else [rank_rows])
        for rows in pieces:
            for chunk in mine.tensor_split(max(1, min(self.step_chunks, len(mine)))):
                if len(chunk) == 0:
                    continue
                values, valid, pick = self._predict(chunk, jitter=True, rows=rows, reach_px=reach_px)
                obs, train = self._observed(chunk, pick, held_out=False)
                use = valid & train
                pixel_loss = self._pixel_loss(values, obs, chunk)
                # where() rather than boolean indexing, whose result size the host would have to wait for
                loss_sum = torch.where(use, pixel_loss, 0.0).sum()
                loss_sum.backward()
                total += loss_sum.detach()
                count += use.sum()
                if self._validates_in_steps():
                    held = valid & ~train
                    held_loss = torch.where(held, pixel_loss.detach(), 0.0).sum()
                    held_out += torch.stack([held_loss.double(), held.sum().double()])
        self.held_out_in_steps += held_out  # only once the step succeeded (it is retried on running out of memory)
        if self.world > 1:
            total, count = self._all_reduce_gradients(total, count)
        n = count.clamp(min=1).to(total.dtype)
        for p in self._parameters():
            if p.grad is not None:
                p.grad.div_(n)
        penalty = self._penalty(tilts)
        if penalty.requires_grad:  # not when no deformation is estimated
            penalty.backward()
        return total / n, count

    def _retrying_on_out_of_memory(self, work: Callable, *args):
        """``work(*args)``, run again after :meth:`_shrink_work` each time it runs out of memory."""
        while True:
            try:
                return work(*args)
            except (torch.OutOfMemoryError, RuntimeError) as exc:
                if not _is_out_of_memory(exc):
                    raise
                self._shrink_work()

    def _zero_grads(self) -> None:
        self.opt_volume.zero_grad(set_to_none=True)
        if self.opt_deform is not None:
            self.opt_deform.zero_grad(set_to_none=True)

    def _share(self, tilts: torch.Tensor) -> tuple[torch.Tensor, slice | None]:
        """This rank's part of a step: its tilts (rays) or its band of rows of every tilt (lattice)."""
        if self.world == 1:
            return tilts, None
        if self.config.fit.renderer == "lattice":
            return tilts, self.scale.rank_rows
        return tilts.tensor_split(self.world)[self.rank], None

    def _all_reduce_gradients(self, total: torch.Tensor, count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum the gradients, the data-term sums and the pixel counts of every rank (one all-reduce)."""
        import torch.distributed as dist

        params = self._parameters()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads] + [total.reshape(1), count.to(total.dtype).reshape(1)])
        dist.all_reduce(flat)
        offset = 0
        for p, g in zip(params, grads):
            p.grad = flat[offset: offset + g.numel()].view_as(p).clone()
            offset += g.numel()
        return flat[-2], flat[-1].round().long()

    def _shrink_work(self) -> None:
        """After an out-of-memory error: free what the failed step held, then halve the lattice band of the
        current scale (down to 4 rows) or else split the step's tilts into twice as many groups; recorded in
        ``memory_events``."""
        self._zero_grads()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        fit = self.config.fit
        scale = self.scale
        if fit.renderer == "lattice" and scale.lattice_rows > 4:
            scale.lattice_rows = max(4, scale.lattice_rows // 2)
        elif self.step_chunks < fit.tilts_per_step:
            self.step_chunks = min(fit.tilts_per_step, self.step_chunks * 2)
        else:
            raise IcetideError(
                f"out of memory on {self.device} even with the smallest batch (one tilt"
                + (", 4-row lattice bands" if fit.renderer == "lattice" else "")
                + "); use a smaller volume (bin the data) or free memory"
            )
        self.memory_events.append({"epoch": self.epoch + 1, "step": self.step + 1,
                                   "lattice_rows": scale.lattice_rows, "binned": scale.factor,
                                   "step_chunks": self.step_chunks})
        log.warning("out of memory on %s at epoch %d: retrying with %d-row lattice bands, the tilts of a step in %d "
                    "groups", self.device, self.epoch + 1, scale.lattice_rows, self.step_chunks)

    def _finite_or_zeroed(self, loss: torch.Tensor) -> torch.Tensor:
        """``(loss finite, gradients finite)`` of the step just back-propagated, as device booleans; when either
        is not, every gradient is zeroed on the device (no host synchronisation), so the optimiser steps that
        follow keep the parameters finite until the epoch's end rolls the epoch back.

        Only non-finite values count: Adam moves each parameter by about its learning rate whatever the
        gradient's size, so a large finite gradient norm is no sign of divergence.
        """
        grads = [p.grad for p in self._parameters() if p.grad is not None]
        finite = torch.stack([torch.isfinite(loss.detach()), torch.isfinite(torch.nn.utils.get_total_norm(grads))])
        bad = ~finite.all()
        for g in grads:
            g.masked_fill_(bad, 0.0)
        return finite

    def _parameters(self) -> list[torch.Tensor]:
        return [p for v in self.volumes for p in v.parameters()] + [
            t for t in (self.shifts, self.angles, self.axis_offset, self.local, self.log_gain, self.offset)
            if t.requires_grad
        ]

    def _keep_good(self) -> None:
        """Remember the current state as the one a non-finite step rolls back to (CPU: ~3 ms, 3% of a default fit)."""
        self.last_good = {
            "model": self.snapshot(),
            # deep copies: the optimisers update their state tensors in place
            "opt_volume": copy.deepcopy(self.opt_volume.state_dict()),
            "opt_deform": copy.deepcopy(self.opt_deform.state_dict()) if self.opt_deform else None,
            "samples": self.samples,
        }

    def _roll_back(self, reason: str, step: int) -> None:
        """Undo the epoch whose step ``step`` failed: back to the last good state (the epoch's start) with every
        learning rate halved.

        Raises ``_NumericalFailure`` instead once ``max_rollbacks`` rollbacks have been spent.
        """
        self.restore(self.last_good["model"])
        # load_state_dict keeps the given tensors, so hand it copies to keep the last good state intact
        self.opt_volume.load_state_dict(copy.deepcopy(self.last_good["opt_volume"]))
        if self.opt_deform is not None:
            self.opt_deform.load_state_dict(copy.deepcopy(self.last_good["opt_deform"]))
        where = f"{reason} at epoch {self.epoch + 1}, step {step}"
        if len(self.rollbacks) >= self.config.fit.max_rollbacks:
            raise _NumericalFailure(f"{where} after {len(self.rollbacks)} rollbacks")
        self.lr_factor *= 0.5
        event = {"epoch": self.epoch + 1, "step": step, "reason": reason, "lr_factor": self.lr_factor}
        self.rollbacks.append(event)
        log.warning("%s: epoch rolled back, learning rates halved", where)
        self._set_learning_rates()

    def _validates_in_steps(self) -> bool:
        """Whether the training steps score the held-out pixels (``fit.validation: steps``, lattice renderer)."""
        fit = self.config.fit
        return fit.validation == "steps" and fit.renderer == "lattice" and fit.validation_fraction > 0

    def _epoch_validation_loss(self, rolled_back: bool) -> float:
        """The validation loss after an epoch: the held-out pixels' mean data term as the epoch's training steps
        predicted them (``fit.validation: steps``), or by :meth:`validation_loss` (a separate pass; also after an
        epoch that was rolled back, whose steps no longer count)."""
        if not self._validates_in_steps() or rolled_back:
            return self.validation_loss()
        return self._held_out_mean(*self.held_out_in_steps)

    def validation_loss(self) -> float:
        """Mean data term (fit.loss) on the held-out pixels of every tilt (no jitter); shrinks the work and retries
        on running out of memory, as training steps do."""
        return self._retrying_on_out_of_memory(self._validation_loss)

    @torch.no_grad()
    def _validation_loss(self) -> float:
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        count = torch.zeros((), dtype=torch.float64, device=self.device)
        group = max(1, self.config.fit.tilts_per_step // self.step_chunks)
        reach = self._reach_px()
        for tilts in torch.arange(len(self.theta)).split(group):
            mine, rows = self._share(tilts)
            if len(mine) == 0:
                continue
            if self.config.fit.renderer == "rays":
                predictions = [self._predict_heldout_rays(mine)]
            else:
                # Every band of rows in turn, so that the held-out pixels of the whole detector are scored.
                pieces = self._row_pieces([rows] if rows is not None else None)
                predictions = [self._predict(mine, jitter=False, rows=band, reach_px=reach) for band in pieces]
            for values, valid, pick in predictions:
                obs, held = self._observed(mine, pick, held_out=True)
                use = valid & held
                total += torch.where(use, self._pixel_loss(values, obs, mine), 0.0).sum().double()
                count += use.sum()
        return self._held_out_mean(total, count)

    def _held_out_mean(self, total: torch.Tensor, count: torch.Tensor) -> float:
        """``total / count`` (0 pixels: the total) of a held-out loss sum and pixel count (float64 device
        scalars), both summed over every rank first."""
        if self.world > 1:
            import torch.distributed as dist

            both = torch.stack([total, count])
            dist.all_reduce(both)
            total, count = both[0], both[1]
        return float(total) / max(float(count), 1.0)

    def _predict_heldout_rays(self, tilts: torch.Tensor):
        mask = self.scale.held_out[self._on_device(tilts)].reshape(len(tilts), -1)
        n = int(mask.sum(1).min())
        pick = torch.stack([torch.nonzero(row)[:n, 0] for row in mask])
        coords = torch.gather(self._coords(tilts), 1, pick[..., None].expand(-1, -1, 2))
        values, valid = self._render(coords, tilts, jitter=False)
        return self._of_own_half(values, tilts, pick), valid, pick

    def snapshot(self) -> dict:
        """The model state (volume state dict and deformation tensors), detached copies."""
        return {
            "volume": copy.deepcopy(self.volume.state_dict()),
            "half_volume": None if self.half_volume is None else copy.deepcopy(self.half_volume.state_dict()),
            "shifts_px": self.shifts.detach().clone(),
            "angles_rad": self.angles.detach().clone(),
            "axis_offset_rad": self.axis_offset.detach().clone(),
            "log_gain": self.log_gain.detach().clone(),
            "offset": self.offset.detach().clone(),
            "local_px": self.local.detach().clone(),
        }

    def restore(self, snap: dict) -> None:
        self.volume.load_state_dict(snap["volume"])
        if self.half_volume is not None:
            self.half_volume.load_state_dict(snap["half_volume"])
        with torch.no_grad():
            self.shifts.copy_(snap["shifts_px"])
            self.angles.copy_(snap["angles_rad"])
            self.axis_offset.copy_(snap["axis_offset_rad"])
            self.log_gain.copy_(snap["log_gain"])
            # checkpoints made before offsets existed have none
            self.offset.copy_(torch.as_tensor(snap.get("offset", 0.0)))
            self.local.copy_(snap["local_px"])

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        return {
            "model": self.snapshot(),
            "opt_volume": self.opt_volume.state_dict(),
            "opt_deform": self.opt_deform.state_dict() if self.opt_deform else None,
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "validation_mask": self.validation_mask.cpu(),
            "half_mask": None if self.half_mask is None else self.half_mask.cpu(),
            "epoch": self.epoch,
            "step": self.step,
            "samples": self.samples,
            "best_val": self.best_val,
            "best_state": self.best_state,
            "bad_validations": self.bad_validations,
            "curves": self.curves,
            "elapsed_s": self.elapsed_s,
            "lr_factor": self.lr_factor,
            "rollbacks": self.rollbacks,
            "binned_epochs": self.binned_epochs,
            "level_epochs": self.level_epochs,
            "best_binned_val": self.best_binned_val,
            "best_binned_state": self.best_binned_state,
            "bad_binned_validations": self.bad_binned_validations,
            "tilt_axis_offset_deg": math.degrees(float(self.axis_offset.detach())),
            "tilt_gains": self.gains().detach().cpu().tolist(),
            "config": self.config.model_dump(mode="json"),
        }

    def load_state_dict(self, state: dict) -> None:
        if state["config"] != self.config.model_dump(mode="json"):
            changed = _first_difference(state["config"], self.config.model_dump(mode="json"))
            resumable = ("fit.epochs", "fit.max_minutes", "fit.device", "fit.checkpoint_minutes", "fit.max_rollbacks",
                         "fit.max_memory_gb")
            if changed not in resumable:
                raise IcetideError(f"checkpoint was made with different settings ({changed}); cannot resume")
        self.restore(state["model"])
        self.opt_volume.load_state_dict(state["opt_volume"])
        if self.opt_deform is not None and state["opt_deform"] is not None:
            self.opt_deform.load_state_dict(state["opt_deform"])
        self.generator.set_state(state["generator"])
        if self.world > 1:  # the checkpoint holds one rank's sampling stream; give each rank a fresh one
            self.sampler.manual_seed(self.config.fit.seed + 7919 * self.rank + 104729 * int(state["epoch"]))
        torch.set_rng_state(state["torch_rng"])
        self.validation_mask = state["validation_mask"].to(self.device)
        if self.half_mask is not None:
            self.half_mask = state["half_mask"].to(self.device)
        # The plan the fit started with (it depends on fit.epochs, which a resumed fit may change); checkpoints
        # written before binned epochs existed had none.
        self.binned_epochs = state.get("binned_epochs", 0)
        self.level_epochs = state.get("level_epochs", self.config.fit.coarse_to_fine_epochs or 0)
        self.best_binned_val = state.get("best_binned_val", math.inf)
        self.best_binned_state = state.get("best_binned_state")
        self.bad_binned_validations = state.get("bad_binned_validations", 0)
        self.scales = self._make_scales()
        for key in ("epoch", "step", "samples", "best_val", "best_state", "bad_validations", "curves", "elapsed_s"):
            setattr(self, key, state[key])
        # checkpoints written before rollbacks existed have neither key
        self.lr_factor = state.get("lr_factor", 1.0)
        self.rollbacks = state.get("rollbacks", [])
        self.last_good = None

    def save_checkpoint(self, path: Path) -> None:
        if self.rank != 0:  # the ranks hold the same state; one file
            return
        with atomic_path(path) as tmp:
            torch.save(self.state_dict(), tmp)

    def load_checkpoint(self, path: Path) -> None:
        if not Path(path).is_file():
            raise IcetideError(f"{path}: no checkpoint to resume from")
        try:
            state = torch.load(path, map_location=self.device, weights_only=False)
        except Exception as exc:
            raise IcetideError(f"{path}: unreadable checkpoint ({exc})") from None
        self.load_state_dict(state)

    # ----------------------------------------------------------------- the loop
    def run(
        self,
        checkpoint_path: Path | None = None,
        on_epoch: Callable[[dict], None] | None = None,
    ) -> FitResult:
        """Fit until the epoch budget, the time budget, early stopping or a numerical failure ends it.

        Returns the best state (by validation loss, else the last good one). Raises ``IcetideError`` when the
        steps failed before any could be taken.
        """
        fit = self.config.fit
        deadline = None if fit.max_minutes is None else fit.max_minutes * 60
        last_ckpt = time.monotonic()
        stop_reason = "epochs"
        interrupted = {"signal": None}

        def _on_signal(signum, frame):
            interrupted["signal"] = signum

        handlers = {}
        if checkpoint_path is not None:
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    handlers[sig] = signal.signal(sig, _on_signal)
                except ValueError:  # not in the main thread
                    pass
        t_start = time.monotonic() - self.elapsed_s
        try:
            while self.epoch < fit.epochs:
                try:
                    train_loss = self.train_epoch()
                except _NumericalFailure as failure:
                    if self.last_good["samples"] == 0:
                        raise IcetideError(
                            f"the fit never took a finite step ({failure}); lower the learning rates"
                        ) from None
                    stop_reason = f"numerical failure: {failure}"
                    break
                val_loss = binned_val_loss = math.nan
                validate = (self.epoch % fit.validate_every == 0 or self.epoch == fit.epochs) \
                    and fit.validation_fraction > 0
                binned = self.epoch <= self.binned_epochs  # the epoch just fitted
                if binned:
                    # Its loss is not comparable with the unbinned one's: the binned stage stops on its own.
                    if validate:
                        binned_val_loss = self._validate_binned_epoch()
                    if self.bad_binned_validations >= fit.patience or self.epoch == self.binned_epochs:
                        self._end_binned_stage()
                elif validate:
                    val_loss = self._epoch_validation_loss(self.epoch_rolled_back)
                    if val_loss < self.best_val:
                        self.best_val, self.best_state, self.bad_validations = val_loss, self.snapshot(), 0
                    elif self.epoch > self.release_epochs:
                        self.bad_validations += 1
                self.elapsed_s = time.monotonic() - t_start
                for key, value in zip(self.curves, (self.epoch, train_loss, val_loss, self.elapsed_s, binned_val_loss)):
                    self.curves[key].append(value)
                if on_epoch is not None:
                    on_epoch({"epoch": self.epoch, "train_loss": train_loss, "val_loss": val_loss,
                              "elapsed_s": self.elapsed_s, "samples": self.samples, "binned": binned})
                if self.bad_validations >= fit.patience:
                    stop_reason = "early stopping (validation loss stopped improving)"
                    break
                out_of_time = deadline is not None and self.elapsed_s >= deadline
                signum = interrupted["signal"] or 0
                if self.world > 1:  # every rank must stop at the same epoch
                    import torch.distributed as dist

                    flags = torch.tensor([float(out_of_time), float(signum)], device=self.device)
                    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
                    out_of_time, signum = bool(flags[0]), int(flags[1])
                if out_of_time:
                    stop_reason = "time budget (--max-minutes)"
                    break
                if signum:
                    stop_reason = f"interrupted by signal {signum}"
                    break
                if checkpoint_path is not None and time.monotonic() - last_ckpt >= fit.checkpoint_minutes * 60:
                    self.save_checkpoint(checkpoint_path)
                    last_ckpt = time.monotonic()
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        if checkpoint_path is not None:
            self.save_checkpoint(checkpoint_path)
        return self._result(stop_reason)

    def _result(self, stop_reason: str) -> FitResult:
        # The best unbinned state; a fit that ended within its binned stage returns that stage's best.
        best = self.best_state if self.best_state is not None else self.best_binned_state
        if best is not None:
            self.restore(best)
        shifts = self.shifts.detach().cpu().numpy().astype(np.float64)
        residual, translation = remove_gauge(shifts, self.tilt_angles_deg)
        deformations = Deformations(
            self.tilt_angles_deg,
            residual,
            np.rad2deg((self.angles + self.axis_offset).detach().cpu().numpy().astype(np.float64)),
            self.local.detach().cpu().numpy().astype(np.float64),
            self.detector_shape,
            self.interpolation,
            {"gauge": "common shift removed; the tomogram is translated by gauge_translation_xyz_vox instead",
             "gauge_translation_xyz_vox": translation.tolist()},
        )
        best_epoch = None
        if self.curves["val_loss"]:
            vals = np.asarray(self.curves["val_loss"], dtype=float)
            if np.isfinite(vals).any():
                best_epoch = int(self.curves["epoch"][int(np.nanargmin(vals))])
        if best_epoch is not None and self.best_state is not None:
            self._set_level_weights(best_epoch - 1)  # the weights the best state was trained with
        report = {
            "stop_reason": stop_reason,
            "rollbacks": self.rollbacks,
            "tilt_axis_offset_deg": math.degrees(float(self.axis_offset.detach())),
            "tilt_gains": self.gains().detach().cpu().tolist(),
            "intensity_offset": (self.offset.detach().cpu() * self.data_scale).tolist(),
            "epochs": self.epoch,
            "steps": self.step,
            "best_epoch": best_epoch,
            "best_validation_loss": None if not math.isfinite(self.best_val) else self.best_val,
            "fit_seconds": self.elapsed_s,
            "pixels_per_s": self.samples / max(self.elapsed_s, 1e-9),
            "field_evaluations_per_step": self._evaluations_per_step(),
            "curves": self.curves,
            "device": str(self.device),
            "encoding_kernel": self.volume.encoding.kernel_for(self.device),
            "mixed_precision": self.volume.mixed_precision,
            "data_scale": self.data_scale,
            "volume_shape_zyx": list(self.shape_zyx),
            "model_shape_zyx": list(self.model_shape_zyx),
            "lattice_rows": self.scales[0].lattice_rows if self.config.fit.renderer == "lattice" else None,
            "binned_epochs": self.binned_epochs,
            "coarse_to_fine_epochs": self.level_epochs,
            "step_chunks": self.step_chunks,
            "memory_budget_mb": None if self.memory_budget is None else self.memory_budget / 2**20,
            "memory_events": self.memory_events,
            "versions": {"torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version()},
            "seed": self.config.fit.seed,
            **_peak_memory_mb(self.device),
        }
        return FitResult(self.volume, deformations, translation, self.density_scale, report, self.half_volume)

    def _evaluations_per_step(self) -> int:
        nz, ny, nx = self.model_shape_zyx
        fit = self.config.fit
        if fit.renderer == "lattice":
            return nz * min(self.scales[0].lattice_rows, ny) * nx
        theta_max = float(self.theta.abs().max())
        return fit.tilts_per_step * fit.rays_per_tilt * self.scales[0].renderer.n_samples(torch.tensor(theta_max))


# Sharpness of the softplus that keeps the predicted counts of the Poisson deviance positive (in units of the
# data's spread): mu = softplus(k v) / k equals v beyond a few 1/k and still passes a gradient below 0, where a
# clamp would freeze the pixels a fresh, near-zero volume predicts as negative.
POISSON_SHARPNESS = 10.0


def pixel_loss(values: torch.Tensor, obs: torch.Tensor, loss: str) -> torch.Tensor:
    """The data term of each pixel: ``|values - obs|`` (l1), ``(values - obs)^2`` (l2), or the Poisson deviance
    (halved) ``mu - obs - obs log(mu / obs)`` with ``mu = softplus(k values) / k`` (``k`` =
    ``POISSON_SHARPNESS``) and ``0 log 0 = 0`` (poisson: zero where ``mu = obs``, positive elsewhere; its
    minimiser over ``mu`` is the Poisson maximum likelihood, and it is invariant, up to a factor, to the scale
    the data were divided by)."""
    if loss == "l1":
        return (values - obs).abs()
    if loss == "l2":
        return (values - obs).square()
    mu = torch.nn.functional.softplus(values, beta=POISSON_SHARPNESS)
    counts = obs.clamp(min=0)
    return mu - counts - torch.xlogy(counts, mu) + torch.xlogy(counts, counts)


def _half_mask(
    split: str, angle_order: torch.Tensor, shape: tuple[int, int, int], generator: torch.Generator
) -> torch.Tensor | None:
    """Which pixels ``(M, ny, nx)`` the second half volume explains, on the device of ``angle_order`` (the tilts
    sorted by angle): every other tilt in angle order (``tilts``), a random half of the pixels (``pixels``), or
    None (``none``; ``series``, where each volume explains every pixel of its own half series)."""
    if split in ("none", "series"):
        return None
    if split == "tilts":
        mask = torch.zeros(shape, dtype=torch.bool, device=angle_order.device)
        mask[angle_order[1::2]] = True
        return mask
    return (torch.rand(shape, generator=generator) < 0.5).to(angle_order.device)


def _regrid(local_px: torch.Tensor, grid: tuple[int, int], detector_shape, interpolation: str) -> torch.Tensor:
    """Resample local fields ``(M, 2, N1, N2)`` onto another control grid over the same detector span."""
    if tuple(local_px.shape[-2:]) == tuple(grid):
        return local_px
    ny, nx = detector_shape
    u = torch.linspace(-(nx - 1) / 2, (nx - 1) / 2, grid[1], device=local_px.device)
    v = torch.linspace(-(ny - 1) / 2, (ny - 1) / 2, grid[0], device=local_px.device)
    return local_displacement_grid(local_px, u, v, detector_shape, interpolation).permute(0, 3, 1, 2).contiguous()


def _first_difference(a, b, prefix: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
    return prefix.rstrip(".")

