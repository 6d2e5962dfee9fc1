"""The per-tilt deformations being fitted (paper eq. 2), as one object owning its tensors.

Shifts ``(M, 2)`` px, in-plane rotations ``(M,)`` rad (the known tilt axis included: ``alpha = -psi``,
docs/CONVENTIONS.md), local fields ``(M, 2, N1, N2)`` px on a control grid, one tilt-axis offset shared by all
tilts (rad), per-tilt log gains and the intensity offset. It knows its start (the deviation from which paper eq. 7
penalises), its parameter groups, where it moves the pixels (:meth:`coords`) and how far at most
(:meth:`reach_px`), and it hands the result back as :class:`icetide.deform.Deformations`.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..config import DeformSettings, FitSettings
from ..deform import (
    Deformations, deform_grid, deformation_penalty, local_displacement_grid, remove_gauge, smoothness_penalty,
)

__all__ = ["DeformationModel"]


class DeformationModel:
    """The deformations of ``M`` tilts on a ``detector_shape = (ny, nx)`` detector, on ``device``, starting from
    ``init`` (unbinned pixels; its local fields are resampled onto ``settings.local_grid``). ``tilt_axis_deg``:
    the known tilt-axis direction, folded into the rotations."""

    def __init__(self, init: Deformations, settings: DeformSettings, tilt_axis_deg: float,
                 detector_shape: tuple[int, int], device: torch.device):
        self.settings = settings
        self.detector_shape = tuple(detector_shape)
        # The function that warps the pixel grid (:func:`icetide.deform.deform_grid`); another implementation of
        # the same signature can be put in its place (benchmarks/local_field.py compares two).
        self.warp = deform_grid
        self.interpolation = settings.local_interpolation
        start = init.tensors(device)
        start["angles_rad"] = start["angles_rad"] - math.radians(tilt_axis_deg)
        start["local_px"] = _regrid(start["local_px"], settings.local_grid, self.detector_shape,
                                    init.local_interpolation)
        self.start = {k: v.clone() for k, v in start.items()}
        m = len(start["shifts_px"])
        self.shifts = start["shifts_px"].clone().requires_grad_(settings.shifts)
        self.angles = start["angles_rad"].clone().requires_grad_(settings.rotations)
        self.local = start["local_px"].clone().requires_grad_(settings.local)
        # One rotation shared by all tilts: a mis-set tilt axis is common to every view, so it is estimated
        # without the per-tilt penalty (which would shrink it) and with its own, larger step.
        self.axis_offset = torch.zeros((), device=device, requires_grad=settings.axis_offset)
        self.log_gain = torch.zeros(m, device=device, requires_grad=settings.gain)
        # The intensity level added to the predictions, in units of data_scale: one per tilt or one in all.
        self.offset = torch.zeros(m if settings.offset == "per_tilt" else (), device=device,
                                  requires_grad=settings.offset != "none")
        if settings.local and settings.local_border_fixed and min(settings.local_grid) >= 3:
            # A constant or linear local field is a shift or a rotation: with the border ring held, the
            # local field carries only what the rigid motion cannot, so the split is identifiable.
            interior = torch.zeros(settings.local_grid, device=device)
            interior[1:-1, 1:-1] = 1
            self.local.register_hook(lambda grad: grad * interior)

    # ----------------------------------------------------------------- parameters
    def parameters(self) -> list[torch.Tensor]:
        """The tensors being estimated, in a fixed order."""
        return [t for t in (self.shifts, self.angles, self.axis_offset, self.local, self.log_gain, self.offset)
                if t.requires_grad]

    def intensity_group(self, fit: FitSettings) -> dict | None:
        """The intensity offset's parameter group (it learns with the volume, from the first epoch), or None."""
        if self.settings.offset == "none":
            return None
        return {"params": [self.offset], "lr": fit.lr_offset, "name": "offset"}

    def parameter_groups(self, fit: FitSettings) -> list[dict]:
        """The deformations' parameter groups (named), released after the warm-up."""
        s = self.settings
        groups = []
        if s.shifts:
            groups.append({"params": [self.shifts], "lr": fit.lr_shift_px, "name": "shift"})
        if s.rotations:
            groups.append({"params": [self.angles], "lr": math.radians(fit.lr_rotation_deg), "name": "rotation"})
        if s.axis_offset:
            groups.append({"params": [self.axis_offset], "lr": math.radians(fit.lr_axis_deg), "name": "axis"})
        if s.local:
            groups.append({"params": [self.local], "lr": fit.lr_local_px, "name": "local"})
        if s.gain:
            groups.append({"params": [self.log_gain], "lr": fit.lr_gain, "name": "gain"})
        return groups

    def snapshot(self) -> dict[str, torch.Tensor]:
        """Detached copies of the tensors."""
        return {
            "shifts_px": self.shifts.detach().clone(),
            "angles_rad": self.angles.detach().clone(),
            "axis_offset_rad": self.axis_offset.detach().clone(),
            "log_gain": self.log_gain.detach().clone(),
            "offset": self.offset.detach().clone(),
            "local_px": self.local.detach().clone(),
        }

    @torch.no_grad()
    def restore(self, snap: dict[str, torch.Tensor]) -> None:
        self.shifts.copy_(snap["shifts_px"])
        self.angles.copy_(snap["angles_rad"])
        self.axis_offset.copy_(snap["axis_offset_rad"])
        self.log_gain.copy_(snap["log_gain"])
        self.offset.copy_(snap["offset"])
        self.local.copy_(snap["local_px"])

    # ----------------------------------------------------------------- the forward model's part
    def coords(self, u_px: torch.Tensor, v_px: torch.Tensor, factor: int, tilts: torch.Tensor) -> torch.Tensor:
        """Ideal-projection coordinates ``(B, P, 2)`` of the pixel centres ``u_px (nx,)``, ``v_px (ny,)``
        (unbinned pixels) of ``tilts`` (device indices), in pixels of the scale binned by ``factor``."""
        local = self.local[tilts] if self.settings.local else None
        c = self.warp(u_px, v_px, self.shifts[tilts], self.angles[tilts] + self.axis_offset, local,
                        self.detector_shape, self.interpolation)
        return c.flatten(1, 2) if factor == 1 else c.flatten(1, 2) / factor

    def gains(self) -> torch.Tensor:
        """Per-tilt intensity gains ``(M,)``, geometric mean 1 (the volume holds the overall scale)."""
        return torch.exp(self.log_gain - self.log_gain.mean())

    def apply_intensity(self, values: torch.Tensor, tilts: torch.Tensor) -> torch.Tensor:
        """``values (..., B, P)`` of ``tilts`` (device indices) with each tilt's gain and offset applied."""
        if self.settings.gain:
            values = values * self.gains()[tilts, None]
        if self.settings.offset == "per_tilt":
            values = values + self.offset[tilts, None]
        elif self.settings.offset == "common":
            values = values + self.offset
        return values

    def penalty(self, tilts: torch.Tensor, angle_order: torch.Tensor) -> torch.Tensor:
        """Paper eq. 7 over ``tilts`` (device indices) plus, when weighted, the random-walk prior over every tilt
        in ``angle_order``."""
        s = self.settings
        penalty = deformation_penalty(
            self.shifts[tilts] - self.start["shifts_px"][tilts],
            self.angles[tilts] - self.start["angles_rad"][tilts],
            (self.local[tilts] - self.start["local_px"][tilts]) if s.local else None,
            (s.penalty_rotation, s.penalty_shift, s.penalty_local),
            self.detector_shape,
            self.interpolation,
        )
        if s.penalty_smooth > 0 and s.shifts:
            penalty = penalty + s.penalty_smooth * smoothness_penalty(self.shifts[angle_order])
        return penalty

    @torch.no_grad()
    def reach_px(self, learning_rates: dict[str, float] | None = None, steps: int = 0) -> float:
        """A bound on how far the deformations move a pixel, now and after ``steps`` more optimiser steps at
        ``learning_rates`` (by group name; None: the deformations are not stepped), pixels:
        ``|x' - x| <= |tau| + 2 |sin(alpha / 2)| (r + Phi) + Phi`` over every tilt (``r`` the detector's
        half-diagonal, ``Phi`` = 1.6 sqrt(2) max|phi| bounding the bicubic field with its overshoot), plus for
        each step twice what an Adam step moves (about one learning rate per parameter; twice for the steps that
        overshoot it). One host synchronisation; a training epoch takes it once, for all its steps."""
        ny, nx = self.detector_shape
        radius = math.hypot(ny, nx) / 2
        reach = self.shifts.norm(dim=-1)
        phi = torch.zeros_like(reach)
        if self.settings.local:
            phi = 1.6 * math.sqrt(2) * self.local.abs().amax(dim=(1, 2, 3))
        turn = 2 * torch.sin((self.angles + self.axis_offset).abs().clamp(max=math.pi) / 2)
        bound, phi_max = torch.stack([(reach + turn * (radius + phi) + phi).max(), phi.max()]).tolist()
        if steps and learning_rates is not None:
            lr = learning_rates
            per_step = (math.sqrt(2) * lr.get("shift", 0.0)
                        + (lr.get("rotation", 0.0) + lr.get("axis", 0.0)) * (radius + phi_max)
                        + 3 * 1.6 * math.sqrt(2) * lr.get("local", 0.0))
            bound += 2 * steps * per_step
        return bound

    # ----------------------------------------------------------------- the result
    def estimate(self, tilt_angles_deg: np.ndarray) -> tuple[Deformations, np.ndarray]:
        """The estimated deformations with the gauge removed (the common shift that a translation of the volume
        explains), and that translation ``(3,)`` (x, y, z voxels): the tomogram is ``rho(p - translation)``."""
        shifts = self.shifts.detach().cpu().numpy().astype(np.float64)
        residual, translation = remove_gauge(shifts, tilt_angles_deg)
        deformations = Deformations(
            tilt_angles_deg,
            residual,
            np.rad2deg((self.angles + self.axis_offset).detach().cpu().numpy().astype(np.float64)),
            self.local.detach().cpu().numpy().astype(np.float64),
            self.detector_shape,
            self.interpolation,
            {"gauge": "common shift removed; the tomogram is translated by gauge_translation_xyz_vox instead",
             "gauge_translation_xyz_vox": translation.tolist()},
        )
        return deformations, translation


def _regrid(local_px: torch.Tensor, grid: tuple[int, int], detector_shape, interpolation: str) -> torch.Tensor:
    """Resample local fields ``(M, 2, N1, N2)`` onto another control grid over the same detector span."""
    if tuple(local_px.shape[-2:]) == tuple(grid):
        return local_px
    ny, nx = detector_shape
    u = torch.linspace(-(nx - 1) / 2, (nx - 1) / 2, grid[1], device=local_px.device)
    v = torch.linspace(-(ny - 1) / 2, (ny - 1) / 2, grid[0], device=local_px.device)
    return local_displacement_grid(local_px, u, v, detector_shape, interpolation).permute(0, 3, 1, 2).contiguous()
