"""The fit's two Adam optimisers: one for the volumes (and the intensity offset, which learns with them from the
first epoch), one for the deformations (stepped only once released after the warm-up)."""

from __future__ import annotations

import copy
import functools

import torch

from ..config import FitSettings
from .schedule import learning_rates

__all__ = ["Optimisers"]


class Optimisers:
    """``volume``: Adam over ``volume_params`` (plus ``intensity_group`` if any); ``deform``: Adam over the named
    ``deform_groups``, None without any. Each group's learning rate at creation is its base rate."""

    def __init__(self, volume_params: list[torch.Tensor], intensity_group: dict | None, deform_groups: list[dict],
                 fit: FitSettings, device: torch.device):
        # Adam's fused kernel on the CPU: one pass over the table entries instead of one per elementwise operation
        # (docs/BENCHMARKS.md "Fused Adam on the CPU"); on CUDA the default one, free of host synchronisations.
        adam = functools.partial(torch.optim.Adam, fused=True) if device.type == "cpu" else torch.optim.Adam
        self.volume = adam(volume_params, lr=fit.lr_volume)
        if intensity_group is not None:
            self.volume.add_param_group(intensity_group)
        self.deform = adam(deform_groups) if deform_groups else None
        self.base_lrs = [g["lr"] for g in self.groups()]

    def groups(self) -> list[dict]:
        """Every parameter group, the volume optimiser's first."""
        return list(self.volume.param_groups) + (list(self.deform.param_groups) if self.deform else [])

    def deform_rates(self) -> dict[str, float]:
        """The deformation groups' current learning rates by name."""
        return {g["name"]: g["lr"] for g in self.deform.param_groups} if self.deform else {}

    def set_learning_rates(self, epoch: int, fit: FitSettings, lr_factor: float) -> None:
        """The learning rates of ``epoch`` (:func:`icetide.fit.schedule.learning_rates`)."""
        groups = self.groups()
        for g, rate in zip(groups, learning_rates(self.base_lrs, [g.get("name") for g in groups], epoch, fit,
                                                  lr_factor)):
            g["lr"] = rate

    def zero_grad(self) -> None:
        self.volume.zero_grad(set_to_none=True)
        if self.deform is not None:
            self.deform.zero_grad(set_to_none=True)

    def step(self, release: bool) -> None:
        """One step of the volumes and, when ``release``, of the deformations."""
        self.volume.step()
        if release and self.deform is not None:
            self.deform.step()

    def state_dict(self, copies: bool = False) -> dict:
        """``{"opt_volume": ..., "opt_deform": ...}``; ``copies``: deep copies (the optimisers update their state
        tensors in place)."""
        state = {"opt_volume": self.volume.state_dict(),
                 "opt_deform": self.deform.state_dict() if self.deform else None}
        return copy.deepcopy(state) if copies else state

    def load_state_dict(self, state: dict, copies: bool = False) -> None:
        """Load a :meth:`state_dict`; ``copies``: load deep copies, keeping ``state`` intact."""
        state = copy.deepcopy(state) if copies else state
        self.volume.load_state_dict(state["opt_volume"])
        if self.deform is not None and state["opt_deform"] is not None:
            self.deform.load_state_dict(state["opt_deform"])
