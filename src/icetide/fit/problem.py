"""The fitting problem: the observed series as the fit sees it.

The images divided by their robust spread (:func:`robust_spread`, so one set of learning rates fits every input
scale), the held-out pixels, the half-map masks, each tilt's loss weight, and the series at each sampling scale
(:class:`SamplingScale`: unbinned, and binned by 2 for the first epochs, :func:`bin_by_two`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from ..config import ReconstructConfig
from ..data import TiltSeries
from ..errors import IcetideError
from ..geometry import centered_coords, deg2rad
from ..render import RENDERERS, LatticeRenderer, RaysRenderer, make_renderer

__all__ = ["Problem", "SamplingScale", "bin_by_two", "half_mask", "robust_spread"]


def robust_spread(images: torch.Tensor, clip_mads: float = 10.0, keep_fraction: float = 0.99) -> float:
    """Standard deviation of ``images`` after clipping values further than ``clip_mads`` scaled MADs from the
    median (hot pixels, dead areas, gold beads do not set the scale), the clip never tighter than the central
    ``keep_fraction`` of the values; equals the plain standard deviation when nothing lies that far out.
    Estimated on at most 4 M evenly spaced pixels.

    The quantile floor matters for sparse images, an object in a mostly empty field (a needle in vacuum): there
    the median and the MAD describe the empty background, and a MAD clip alone cuts the object itself down to
    the background noise, which throws off every learning rate."""
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


def half_mask(
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


@dataclass
class SamplingScale:
    """The series as the epochs of one sampling scale see it: unbinned (``factor`` 1) or binned by 2
    (``fit.binned_epochs``). Tensors ``(M, ny, nx)`` at this scale; ``u_px``, ``v_px``: its pixel centres in
    unbinned detector pixels (where the deformations act); ``lattice_rows`` (shrunk when a step runs out of
    memory) and ``rank_rows`` in its rows."""

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

    def pixels(self, per_pixel: torch.Tensor, tilts: torch.Tensor, pick) -> torch.Tensor:
        """``per_pixel (M, ny, nx)`` (on the device) at the pixels ``pick`` of ``tilts`` (device indices):
        random pixel indices ``(B, P)``, a slice of rows, or None (every pixel); ``(B, P)``."""
        chosen = per_pixel[tilts]
        if isinstance(pick, slice):
            chosen = chosen[:, pick]
        chosen = chosen.reshape(len(tilts), -1)
        return torch.gather(chosen, 1, pick) if isinstance(pick, torch.Tensor) else chosen

    def observed(self, tilts: torch.Tensor, pick, held_out: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Observed values ``(B, P)`` (``(2, B, P)`` with two half series) and the training (or ``held_out``)
        mask ``(B, P)`` of the pixels ``pick`` of ``tilts`` (device indices)."""
        obs, mask = self.pixels(self.images, tilts, pick), self.pixels(self.held_out, tilts, pick)
        if self.half_images is not None:
            obs = torch.stack([obs, self.pixels(self.half_images, tilts, pick)])
        return obs, (mask if held_out else ~mask)

    def pixel_rows(self, rows: slice, reach_px: float) -> slice:
        """The detector rows whose pixels can see the lattice band ``rows`` when no pixel moves further than
        ``reach_px`` (unbinned pixels), plus 2 rows for the renderer's sub-voxel jitter and rounding; rows of this
        scale. The other pixels fall outside the band and would not be scored; leaving them out saves their
        warping (docs/BENCHMARKS.md "Lattice bands: warping only the rows that can see the band")."""
        ny = self.shape[0]
        bound = min(reach_px / self.factor + 2, ny)
        return slice(max(0, math.floor(rows.start - bound)), min(ny, math.ceil(rows.stop + bound)))


class Problem:
    """The observed series on the fit's device: ``images (M, ny, nx)`` divided by ``data_scale``,
    ``half_images`` (the second half series, or None), ``validation_mask`` (held-out pixels), ``half_mask``
    (see :func:`half_mask`), ``theta`` (tilt angles, rad, on the device; ``theta_host`` on the host, where the
    projector looks its matrices up without waiting for the device), ``angle_order`` and ``tilt_weights``."""

    def __init__(self, series: TiltSeries, config: ReconstructConfig, device: torch.device,
                 generator: torch.Generator):
        fit = config.fit
        self.device = device
        self.detector_shape = tuple(series.shape)
        self.tilt_angles_deg = series.tilt_angles_deg
        self.theta_host = deg2rad(series.tilt_angles_deg)
        self.theta = self.theta_host.to(device)
        self.angle_order = torch.as_tensor(np.argsort(series.tilt_angles_deg, kind="stable"), device=device)
        images = torch.tensor(series.images, dtype=torch.float32)  # a copy: the input may be read-only
        # Normalise by the spread of the data so one set of learning rates fits every input scale; the
        # field then predicts projections / thickness of order one.
        self.data_scale = robust_spread(images)
        self.images = (images / self.data_scale).to(device)
        if (fit.half_maps == "series") != (series.half_images is not None):
            raise IcetideError("fit.half_maps: series needs the second half series (reconstruct --half-series), "
                               "and a second half series needs fit.half_maps: series")
        self.half_images = None if series.half_images is None else (
            torch.tensor(series.half_images, dtype=torch.float32) / self.data_scale
        ).to(device)
        held = torch.rand(series.images.shape, generator=generator) < fit.validation_fraction
        self.validation_mask = held.to(device)
        self.half_mask: torch.Tensor | None = None  # set by the fitter after its volumes (same random stream)
        weights = torch.cos(self.theta) if fit.tilt_weighting == "cos" else torch.ones_like(self.theta)
        self.tilt_weights = weights / weights.mean()

    @property
    def n_tilts(self) -> int:
        return len(self.theta)

    def scales(
        self, config: ReconstructConfig, model_shape_zyx: tuple[int, int, int], lattice_rows: int, binned: bool,
        recompute_voxels: int | None, rank: int, world: int,
    ) -> list[SamplingScale]:
        """The unbinned series and, when ``binned``, the series binned by 2, each with its renderer (from the
        current images and masks; rebuilt when a checkpoint replaces the masks)."""
        fit = config.fit
        ny, nx = self.detector_shape
        scales = []
        for factor in (1, 2) if binned else (1,):
            def at_scale(t, reduce="mean"):
                return t if t is None or factor == 1 else bin_by_two(t, reduce)

            shape = (ny // factor, nx // factor)
            model_shape = tuple(n // factor for n in model_shape_zyx)
            rows = math.ceil(lattice_rows / factor)
            rank_rows = None
            if world > 1:
                # Data parallel: a renderer that predicts whole rows splits the rows (each rank renders its band
                # of every tilt); the rays renderer splits the tilts of each step (see its ``share``).
                band = math.ceil(shape[0] / world)
                rank_rows = slice(min(shape[0], rank * band), min(shape[0], (rank + 1) * band))
                if RENDERERS[fit.renderer].predicts_whole_rows:
                    rows = band
            renderer = make_renderer(fit.renderer, model_shape, band_rows=rows,
                                     samples_per_voxel=fit.samples_per_voxel, detector_nx=shape[1],
                                     recompute_voxels=recompute_voxels, step=factor)
            scales.append(SamplingScale(
                factor, shape, at_scale(self.images), at_scale(self.half_images),
                at_scale(self.validation_mask, "any"), at_scale(self.half_mask, "any"),
                # Pixel centres, in unbinned pixels: binned pixel k lies 2 (k - (m - 1) / 2) from the centre.
                *(factor * centered_coords(n, device=self.device) for n in shape[::-1]),
                renderer, rows, rank_rows,
            ))
        return scales
