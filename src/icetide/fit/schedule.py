"""The fit's schedule: pure functions of the epoch, and the early-stopping rule.

- Learning rates: each group's base rate times ``lr_decay_factor`` every ``lr_decay_every`` epochs, times the
  rollbacks' factor; the deformations are frozen for ``warmup_epochs`` (the fitter does not step them) and the
  local fields for ``local_delay_epochs`` more.
- Binned stage: the first ``binned_epochs`` fit the series binned by 2 (:func:`plan_binned_epochs`).
- Level weights: the encoding's levels enter one after another over ``coarse_to_fine_epochs``
  (:func:`level_weights`; BARF, Lin et al. 2021).
- Early stopping (:class:`EarlyStopping`): one object for the binned stage, one for the unbinned fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..config import FitSettings
from ..errors import IcetideError

__all__ = ["DEFAULT_BINNED_EPOCHS", "EarlyStopping", "learning_rates", "level_weights", "plan_binned_epochs"]

# Binned epochs of fit.binned_epochs: None (docs/BENCHMARKS.md "Coarse-to-fine sampling").
DEFAULT_BINNED_EPOCHS = 80


def plan_binned_epochs(fit: FitSettings, renderer_bins: bool, ctf_model: bool,
                       model_shape_zyx: tuple[int, int, int]) -> int:
    """How many epochs come first at the binned scale: ``fit.binned_epochs``, or for None
    ``DEFAULT_BINNED_EPOCHS`` (at most half of ``fit.epochs``) where binning applies (a renderer that bins, no
    per-pixel half maps, no CTF forward model, at least 2 voxels on every axis) and 0 elsewhere."""
    applies = renderer_bins and fit.half_maps != "pixels" and not ctf_model and min(model_shape_zyx) >= 2
    if fit.binned_epochs is None:
        return min(DEFAULT_BINNED_EPOCHS, fit.epochs // 2) if applies else 0
    if fit.binned_epochs and not applies:
        raise IcetideError("fit.binned_epochs needs the lattice renderer and a volume of at least 2 voxels on "
                           "every axis, and works neither with half_maps: pixels nor with the CTF forward model")
    return fit.binned_epochs


def learning_rates(
    base: list[float], names: list[str | None], epoch: int, fit: FitSettings, lr_factor: float
) -> list[float]:
    """The learning rate of each parameter group (base rates ``base``, group names ``names``) during ``epoch``
    (0-based); ``lr_factor``: the rollbacks' factor."""
    factor = fit.lr_decay_factor ** (epoch // fit.lr_decay_every) * lr_factor
    local_frozen = epoch < fit.warmup_epochs + fit.local_delay_epochs
    return [0.0 if (name == "local" and local_frozen) else rate * factor for rate, name in zip(base, names)]


def level_weights(epoch: int, level_epochs: int, n_levels: int, device: torch.device) -> torch.Tensor | None:
    """Weights ``(n_levels,)`` of the encoding's levels during ``epoch`` (0-based) when they enter over
    ``level_epochs``: the coarsest from the start, each next one rising from 0 to 1 in turn (a cosine ramp).
    None once every weight is 1."""
    reach = 1 + (n_levels - 1) * min(1.0, epoch / level_epochs)
    ramp = (reach - torch.arange(n_levels, dtype=torch.float32, device=device)).clamp(0, 1)
    weights = (1 - torch.cos(math.pi * ramp)) / 2
    return None if bool((weights == 1).all()) else weights


@dataclass
class EarlyStopping:
    """The best held-out loss so far, the state that gave it, and how many counted validations in a row did not
    improve on it; ``patience`` of those end the stage."""

    patience: int
    best: float = math.inf
    best_state: dict | None = None
    bad: int = 0

    def update(self, loss: float, snapshot: Callable[[], dict], counts: bool) -> None:
        """Record a validation: keep ``snapshot()`` when ``loss`` is the best so far, else count it as bad when
        ``counts`` (after the warm-up or the release of the last deformation)."""
        if loss < self.best:
            self.best, self.best_state, self.bad = loss, snapshot(), 0
        elif counts:
            self.bad += 1

    @property
    def done(self) -> bool:
        return self.bad >= self.patience

    def state_dict(self, name: str = "") -> dict:
        """The checkpoint's keys ``best_{name}val``, ``best_{name}state``, ``bad_{name}validations``."""
        return {f"best_{name}val": self.best, f"best_{name}state": self.best_state,
                f"bad_{name}validations": self.bad}

    def load_state_dict(self, state: dict, name: str = "") -> None:
        self.best, self.best_state, self.bad = (state[f"best_{name}val"], state[f"best_{name}state"],
                                                state[f"bad_{name}validations"])
