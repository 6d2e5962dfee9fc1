"""The fitter: one reconstruction's parts put together, and its training steps.

It holds the problem (:class:`Problem`), the volumes, the deformations (:class:`DeformationModel`), the forward
model (:class:`ForwardModel`), the two optimisers and the schedule's state, and runs an epoch (:meth:`train_epoch`)
and a validation (:meth:`validation_loss`). The loop over epochs is :func:`icetide.fit.loop.run_fit`, which
returns the result (:mod:`icetide.fit.result`).
"""

from __future__ import annotations

import copy
import gc
import logging
import math
from pathlib import Path
from typing import Callable

import torch

from ..config import ReconstructConfig
from ..data import TiltSeries
from ..deform import Deformations
from ..errors import IcetideError
from ..geometry import default_thickness, slab_padding_px
from ..render import RENDERERS
from ..runtime import distributed_rank, resolve_device
from ..volume import ImplicitVolume
from .checkpoint import read_checkpoint, write_checkpoint
from .deformation_model import DeformationModel
from .forward import ForwardModel, forward_ctf
from .memory import is_out_of_memory, plan_memory
from .problem import Problem, SamplingScale, half_mask
from .ranks import all_reduce_gradients, summed_mean
from .optimisers import Optimisers
from .schedule import EarlyStopping, level_weights, plan_binned_epochs
from .numerics import NumericalFailure, finite_or_zeroed

__all__ = ["Fitter"]

log = logging.getLogger("icetide.fit")

# The second half volume's encoding grids are finer by this factor: half volumes on identical grids share the
# grids' interpolation artefacts, which correlate them at high frequency (docs/RESULTS.md, half maps).
HALF_GRID_SCALE = 1.13


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
        fit, dc = config.fit, config.deform
        self.device = resolve_device(fit.device)
        torch.manual_seed(fit.seed)
        self.rank, self.world = distributed_rank()
        # The tilt order and the held-out pixels are drawn alike on every rank; the sampling (jitter, rays) of
        # each rank has its own stream. One process uses one generator for both.
        self.generator = torch.Generator().manual_seed(fit.seed)
        self.sampler = self.generator if self.world == 1 else torch.Generator().manual_seed(fit.seed + 7919 * self.rank)
        ny, nx = series.shape
        thickness = config.thickness or default_thickness(series.shape)
        self.shape_zyx = (thickness, ny, nx)  # the tomogram
        pad = slab_padding_px(nx, thickness, float(abs(series.tilt_angles_deg).max())) \
            if config.specimen == "slab" else 0
        self.model_shape_zyx = (thickness, ny, nx + 2 * pad)  # where the density is modelled
        self.problem = Problem(series, config, self.device, self.generator)
        self.volume = new_volume(config, self.model_shape_zyx, self.device)
        # Half maps: a second volume, and which pixels it explains (True) instead of the first one.
        self.half_volume = new_volume(config, self.model_shape_zyx, self.device, HALF_GRID_SCALE) if fit.half_maps != "none" else None
        self.problem.half_mask = half_mask(fit.half_maps, self.problem.angle_order, series.images.shape,
                                           self.generator)
        if init is None:
            init = Deformations.identity(series.tilt_angles_deg, series.shape, dc.local_grid, dc.local_interpolation)
        self.deformations = DeformationModel(init, dc, series.tilt_axis_angle_deg, series.shape, self.device)

        renderer = RENDERERS[fit.renderer]
        # Early stopping counts from the release of the last deformation on: the local fields, released late,
        # can lower a held-out loss that had stopped improving without them (docs/BENCHMARKS.md "Early stopping").
        self.release_epochs = fit.warmup_epochs + (fit.local_delay_epochs if dc.local else 0)
        ctf_model = config.ctf.correction == "model" and series.defocus_A is not None
        self.binned_epochs = plan_binned_epochs(fit, renderer.bins, ctf_model, self.model_shape_zyx)
        # The levels enter over the planned binned stage unless told otherwise (kept if that stage ends early).
        self.level_epochs = self.binned_epochs if fit.coarse_to_fine_epochs is None else fit.coarse_to_fine_epochs
        self.memory = plan_memory(config, self.device, self.model_shape_zyx,
                                  [v.encoding.table.numel() for v in self.volumes], self.problem.images.numel(),
                                  bool(self.binned_epochs), renderer.recomputes_activations)
        self.scales = self._make_scales()
        # Tilts of a step are rendered in this many groups, gradients accumulated (same step, less memory).
        self.step_chunks = self.scales[0].renderer.tilt_groups(
            self.memory.step_bytes, self.memory.point_bytes, fit.tilts_per_step, fit.rays_per_tilt,
            float(self.problem.theta.abs().max()))
        self.memory_events: list[dict] = []
        self.optimisers = Optimisers([p for v in self.volumes for p in v.parameters()],
                                     self.deformations.intensity_group(fit), self.deformations.parameter_groups(fit),
                                     fit, self.device)
        self.forward = ForwardModel(self.volumes, self.deformations, self.problem, self.sampler, fit.loss,
                                    fit.rays_per_tilt, forward_ctf(series, config.ctf, self.scales[0], self.world,
                                                                ctf_tilt_axis_deg))
        self.epoch = self.step = self.samples = 0
        self.stopping = EarlyStopping(fit.patience)
        # The binned stage's own early stopping, on the held-out pixels binned (see _validate_binned_epoch).
        self.binned_stopping = EarlyStopping(fit.patience)
        self.curves: dict[str, list] = {"epoch": [], "train_loss": [], "val_loss": [], "elapsed_s": [],
                                        "binned_val_loss": []}
        self.elapsed_s = 0.0
        self.lr_factor = 1.0  # halved by every rollback, on top of the decay schedule
        self.rollbacks: list[dict] = []
        self.last_good: dict | None = None
        # Held-out loss sum and pixel count of the current epoch's training steps (fit.validation: steps).
        self.held_out_in_steps = torch.zeros(2, dtype=torch.float64, device=self.device)
        self.epoch_rolled_back = False

    # ----------------------------------------------------------------- parts
    def _make_scales(self) -> list[SamplingScale]:
        return self.problem.scales(self.config, self.model_shape_zyx, self.memory.lattice_rows,
                                   bool(self.binned_epochs), self.memory.recompute_voxels, self.rank, self.world)

    @property
    def volumes(self) -> list[ImplicitVolume]:
        """The fitted volumes: one, or the two half volumes."""
        return [self.volume] if self.half_volume is None else [self.volume, self.half_volume]

    @property
    def density_scale(self) -> float:
        """Multiply the field by it to get density in the units of the input (the data's spread)."""
        return self.problem.data_scale

    @property
    def scale(self) -> SamplingScale:
        """The sampling scale of the current epoch: binned during the first ``binned_epochs``."""
        return self.scales[-1] if self.epoch < self.binned_epochs else self.scales[0]

    def parameters(self) -> list[torch.Tensor]:
        """Every tensor being estimated: the volumes' parameters, then the deformations'."""
        return [p for v in self.volumes for p in v.parameters()] + self.deformations.parameters()

    def reach_px(self, steps: int = 0) -> float:
        """How far the deformations move a pixel at most, now and after ``steps`` more optimiser steps
        (:meth:`DeformationModel.reach_px`; the deformations move only once released)."""
        released = self.optimisers.deform is not None and self.epoch >= self.config.fit.warmup_epochs
        return self.deformations.reach_px(self.optimisers.deform_rates() if released else None, steps)

    # ----------------------------------------------------------------- schedule
    def set_level_weights(self, epoch: int) -> None:
        """The encoding's level weights during ``epoch`` (0-based), when the levels enter over ``level_epochs``."""
        if self.level_epochs == 0:
            return
        weights = level_weights(epoch, self.level_epochs, self.volume.encoding.n_levels, self.device)
        for volume in self.volumes:
            volume.level_weights = weights

    # ----------------------------------------------------------------- training
    def train_epoch(self) -> float:
        """One pass over every pixel of every tilt: the tilts in random order, and with a renderer that predicts
        whole rows each band of :meth:`epoch_bands` in turn; returns the mean training loss of the finite steps.

        The steps never wait for the device (on CUDA: no host synchronisation); the epoch checks once, at its
        end, whether every step was finite. A non-finite step takes no gradient (it is zeroed on the device),
        and the epoch that had one is rolled back (see ``_roll_back``); NaN when every step of the epoch was.
        """
        fit = self.config.fit
        scale = self.scale
        if self.last_good is None:
            self._keep_good()
        self.optimisers.set_learning_rates(self.epoch, fit, self.lr_factor)
        self.set_level_weights(self.epoch)
        release = self.epoch >= fit.warmup_epochs
        order = torch.randperm(self.problem.n_tilts, generator=self.generator)
        steps = [(tilts, bands) for bands in self.epoch_bands(scale) for tilts in order.split(fit.tilts_per_step)]
        self.held_out_in_steps.zero_()
        self.epoch_rolled_back = False
        reach = self.reach_px(len(steps)) if steps[0][1] is not None else math.inf
        records = []
        for tilts, bands in steps:
            data_loss, n_used = self.step_gradients(scale, tilts, bands, reach)
            finite = finite_or_zeroed(data_loss, self.parameters())
            self.step += 1
            self.optimisers.step(release)
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

    def epoch_bands(self, scale: SamplingScale) -> list[list[slice] | None]:
        """The rows of each step of an epoch at ``scale`` (:meth:`icetide.render.LatticeRenderer.epoch_bands`):
        this rank's rows, at least ``fit.binned_bands`` bands in a binned epoch (more steps for the same field
        evaluations where a step is cheap and the volume coarse; docs/BENCHMARKS.md "Bands of the binned
        epochs")."""
        rank_rows = scale.rank_rows
        lo, hi = (0, scale.shape[0]) if rank_rows is None else (rank_rows.start, rank_rows.stop)
        least = self.config.fit.binned_bands if scale.factor > 1 else 1
        return scale.renderer.epoch_bands(lo, hi, scale.lattice_rows, least, rank_rows is not None, self.generator)

    def step_gradients(
        self, scale: SamplingScale, tilts: torch.Tensor, bands: list[slice] | None = None, reach_px: float = math.inf
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradients of (mean data term over the used pixels + penalty) for ``tilts`` (host indices) at ``scale``
        (rows ``bands``, warping the pixels within ``reach_px`` of them; None: every row, or this rank's band);
        returns the data loss and the number of pixels used, as device tensors. Runs in ``step_chunks`` groups
        of tilts and in pieces of at most ``lattice_rows`` rows (the same gradients as one group, summed then
        divided by the pixel count); on running out of memory it shrinks the work and retries."""
        return self._retrying_on_out_of_memory(scale, self._accumulate_gradients, scale, tilts, bands, reach_px)

    def _accumulate_gradients(
        self, scale: SamplingScale, tilts: torch.Tensor, bands: list[slice] | None, reach_px: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.optimisers.zero_grad()
        total = torch.zeros((), device=self.device)
        count = torch.zeros((), device=self.device, dtype=torch.long)
        held_out = torch.zeros(2, dtype=torch.float64, device=self.device)
        mine, rank_rows = scale.renderer.share(tilts, self.rank, self.world, scale.rank_rows)
        pieces = scale.renderer.row_pieces(bands if bands is not None or rank_rows is None else [rank_rows],
                                           scale.shape[0], scale.lattice_rows)
        for rows in pieces:
            for chunk in mine.tensor_split(max(1, min(self.step_chunks, len(mine)))):
                if len(chunk) == 0:
                    continue
                values, valid, pick = self.forward.predict(scale, chunk, jitter=True, rows=rows, reach_px=reach_px)
                obs, train = scale.observed(self.forward.on_device(chunk), pick, held_out=False)
                use = valid & train
                data_term = self.forward.data_term(values, obs, chunk)
                # where() rather than boolean indexing, whose result size the host would have to wait for
                loss_sum = torch.where(use, data_term, 0.0).sum()
                loss_sum.backward()
                total += loss_sum.detach()
                count += use.sum()
                if self._validates_in_steps(scale):
                    held = valid & ~train
                    held_loss = torch.where(held, data_term.detach(), 0.0).sum()
                    held_out += torch.stack([held_loss.double(), held.sum().double()])
        self.held_out_in_steps += held_out  # only once the step succeeded (it is retried on running out of memory)
        if self.world > 1:
            total, count = all_reduce_gradients(self.parameters(), total, count)
        n = count.clamp(min=1).to(total.dtype)
        for p in self.parameters():
            if p.grad is not None:
                p.grad.div_(n)
        penalty = self.deformations.penalty(self.forward.on_device(tilts), self.problem.angle_order)
        if penalty.requires_grad:  # not when no deformation is estimated
            penalty.backward()
        return total / n, count

    def _retrying_on_out_of_memory(self, scale: SamplingScale, work: Callable, *args):
        """``work(*args)``, run again after :meth:`_shrink_work` each time it runs out of memory."""
        while True:
            try:
                return work(*args)
            except (torch.OutOfMemoryError, RuntimeError) as exc:
                if not is_out_of_memory(exc):
                    raise
                self._shrink_work(scale)

    def _shrink_work(self, scale: SamplingScale) -> None:
        """After an out-of-memory error: free what the failed step held, then halve ``scale``'s band of rows
        (down to 4 rows) or else split the step's tilts into twice as many groups; recorded in
        ``memory_events``."""
        self.optimisers.zero_grad()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        fit = self.config.fit
        whole_rows = scale.renderer.predicts_whole_rows
        if whole_rows and scale.lattice_rows > 4:
            scale.lattice_rows = max(4, scale.lattice_rows // 2)
        elif self.step_chunks < fit.tilts_per_step:
            self.step_chunks = min(fit.tilts_per_step, self.step_chunks * 2)
        else:
            raise IcetideError(
                f"out of memory on {self.device} even with the smallest batch (one tilt"
                + (", 4-row lattice bands" if whole_rows else "")
                + "); use a smaller volume (bin the data) or free memory"
            )
        self.memory_events.append({"epoch": self.epoch + 1, "step": self.step + 1,
                                   "lattice_rows": scale.lattice_rows, "binned": scale.factor,
                                   "step_chunks": self.step_chunks})
        log.warning("out of memory on %s at epoch %d: retrying with %d-row lattice bands, the tilts of a step in %d "
                    "groups", self.device, self.epoch + 1, scale.lattice_rows, self.step_chunks)

    # ----------------------------------------------------------------- rollback
    def _keep_good(self) -> None:
        """Remember the current state as the one a non-finite step rolls back to."""
        self.last_good = {"model": self.snapshot(), "optimisers": self.optimisers.state_dict(copies=True),
                          "samples": self.samples}

    def _roll_back(self, reason: str, step: int) -> None:
        """Undo the epoch whose step ``step`` failed: back to the last good state (the epoch's start) with every
        learning rate halved.

        Raises ``NumericalFailure`` instead once ``max_rollbacks`` rollbacks have been spent.
        """
        self.restore(self.last_good["model"])
        # load_state_dict keeps the given tensors, so hand it copies to keep the last good state intact
        self.optimisers.load_state_dict(self.last_good["optimisers"], copies=True)
        where = f"{reason} at epoch {self.epoch + 1}, step {step}"
        if len(self.rollbacks) >= self.config.fit.max_rollbacks:
            raise NumericalFailure(f"{where} after {len(self.rollbacks)} rollbacks")
        self.lr_factor *= 0.5
        event = {"epoch": self.epoch + 1, "step": step, "reason": reason, "lr_factor": self.lr_factor}
        self.rollbacks.append(event)
        log.warning("%s: epoch rolled back, learning rates halved", where)
        self.optimisers.set_learning_rates(self.epoch, self.config.fit, self.lr_factor)

    # ----------------------------------------------------------------- validation
    def _validates_in_steps(self, scale: SamplingScale) -> bool:
        """Whether the training steps score the held-out pixels (``fit.validation: steps``, a renderer that
        predicts every pixel of its rows)."""
        fit = self.config.fit
        return fit.validation == "steps" and scale.renderer.predicts_whole_rows and fit.validation_fraction > 0

    def epoch_validation_loss(self, scale: SamplingScale, rolled_back: bool) -> float:
        """The validation loss after an epoch at ``scale``: the held-out pixels' mean data term as the epoch's
        training steps predicted them (``fit.validation: steps``), or by :meth:`validation_loss` (a separate
        pass; also after an epoch that was rolled back, whose steps no longer count)."""
        if not self._validates_in_steps(scale) or rolled_back:
            return self.validation_loss(scale)
        return summed_mean(*self.held_out_in_steps, self.world)

    def validation_loss(self, scale: SamplingScale | None = None) -> float:
        """Mean data term (fit.loss) on the held-out pixels of every tilt at ``scale`` (default: the current
        epoch's; no jitter); shrinks the work and retries on running out of memory, as training steps do."""
        scale = self.scale if scale is None else scale
        return self._retrying_on_out_of_memory(scale, self._validation_loss, scale)

    @torch.no_grad()
    def _validation_loss(self, scale: SamplingScale) -> float:
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        count = torch.zeros((), dtype=torch.float64, device=self.device)
        group = max(1, self.config.fit.tilts_per_step // self.step_chunks)
        reach = self.reach_px()
        for tilts in torch.arange(self.problem.n_tilts).split(group):
            mine, rows = scale.renderer.share(tilts, self.rank, self.world, scale.rank_rows)
            if len(mine) == 0:
                continue
            # Every band of rows in turn, so that the held-out pixels of the whole detector are scored.
            for band in scale.renderer.row_pieces([rows] if rows is not None else None, scale.shape[0],
                                                  scale.lattice_rows):
                values, valid, pick = self.forward.predict(scale, mine, jitter=False, rows=band, reach_px=reach,
                                                           held_out=True)
                obs, held = scale.observed(self.forward.on_device(mine), pick, held_out=True)
                use = valid & held
                total += torch.where(use, self.forward.data_term(values, obs, mine), 0.0).sum().double()
                count += use.sum()
        return summed_mean(total, count, self.world)

    # ----------------------------------------------------------------- state
    def snapshot(self) -> dict:
        """The model state (volume state dicts and deformation tensors), detached copies."""
        return {
            "volume": copy.deepcopy(self.volume.state_dict()),
            "half_volume": None if self.half_volume is None else copy.deepcopy(self.half_volume.state_dict()),
            **self.deformations.snapshot(),
        }

    def restore(self, snap: dict) -> None:
        self.volume.load_state_dict(snap["volume"])
        if self.half_volume is not None:
            self.half_volume.load_state_dict(snap["half_volume"])
        self.deformations.restore(snap)

    def state_dict(self) -> dict:
        """Everything a resumed fit needs (:mod:`icetide.fit.checkpoint` lists the keys)."""
        return {
            "model": self.snapshot(),
            **self.optimisers.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "validation_mask": self.problem.validation_mask.cpu(),
            "half_mask": None if self.problem.half_mask is None else self.problem.half_mask.cpu(),
            "epoch": self.epoch, "step": self.step, "samples": self.samples, "elapsed_s": self.elapsed_s,
            "curves": self.curves, "lr_factor": self.lr_factor, "rollbacks": self.rollbacks,
            "binned_epochs": self.binned_epochs, "level_epochs": self.level_epochs,
            **self.stopping.state_dict(), **self.binned_stopping.state_dict("binned_"),
            "tilt_axis_offset_deg": math.degrees(float(self.deformations.axis_offset.detach())),
            "tilt_gains": self.deformations.gains().detach().cpu().tolist(),
            "config": self.config.model_dump(mode="json"),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (a :meth:`state_dict` in the current checkpoint format)."""
        self.restore(state["model"])
        self.optimisers.load_state_dict(state)
        self.generator.set_state(state["generator"])
        if self.world > 1:  # the checkpoint holds one rank's sampling stream; give each rank a fresh one
            self.sampler.manual_seed(self.config.fit.seed + 7919 * self.rank + 104729 * int(state["epoch"]))
        torch.set_rng_state(state["torch_rng"])
        self.problem.validation_mask = state["validation_mask"].to(self.device)
        if self.problem.half_mask is not None:
            self.problem.half_mask = state["half_mask"].to(self.device)
        # The plan the fit started with (it depends on fit.epochs, which a resumed fit may change).
        self.binned_epochs, self.level_epochs = state["binned_epochs"], state["level_epochs"]
        self.stopping.load_state_dict(state)
        self.binned_stopping.load_state_dict(state, "binned_")
        self.scales = self._make_scales()
        for key in ("epoch", "step", "samples", "curves", "elapsed_s", "lr_factor", "rollbacks"):
            setattr(self, key, state[key])
        self.last_good = None

    def save_checkpoint(self, path: Path) -> None:
        if self.rank == 0:  # the ranks hold the same state; one file
            write_checkpoint(self.state_dict(), path)

    def load_checkpoint(self, path: Path) -> None:
        self.load_state_dict(read_checkpoint(path, self.config, self.device))


def new_volume(config: ReconstructConfig, shape_zyx: tuple[int, int, int], device: torch.device,
               grid_scale: float = 1.0) -> ImplicitVolume:
    """A freshly initialised implicit volume of ``config.volume`` over ``shape_zyx`` (its encoding's base
    resolution times ``grid_scale``), on ``device``, with the kernel and precision of ``config.fit``."""
    fit = config.fit
    settings = config.volume.model_copy(update={"base_resolution": config.volume.base_resolution * grid_scale})
    volume = ImplicitVolume.from_config(settings, shape_zyx).to(device)
    try:
        volume.set_execution(fit.kernel, fit.precision == "mixed" and device.type == "cuda")
    except RuntimeError as exc:
        raise IcetideError(f"fit.kernel: {exc}") from None
    return volume
