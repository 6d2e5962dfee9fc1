"""Image formation of a simulated acquisition beyond the line integral: the CTF and radiation damage.

The specimen is cut into layers thin enough that the defocus spread within one (``pixel x thickness /
cos(theta)``) moves the CTF phase at Nyquist by at most ``pi / 16``; each layer's projection gets the CTF at its
own defocus, which varies across the tilted image (:func:`icetide.ctf.filter_tilted`), and the layers are
summed (the projection approximation per layer, no multislice propagation). Radiation damage attenuates the
signal of each tilt by :func:`icetide.ctf.exposure_attenuation` of the exposure accumulated before it, the
views taken in a dose-symmetric order. Noise is added afterwards, by the caller.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..ctf import (
    Microscope, defocus_step_A, dose_symmetric_order, exposure_attenuation, filter_tilted, pre_exposure_from_order,
)
from ..errors import IcetideError

__all__ = [
    "Optics", "SIMULATION_PHASE_TOLERANCE_RAD", "draw_defocus_A", "optics_layers", "optics_image_formation",
    "optics_pre_exposure",
]

# Finer than the correction's default (pi / 8), so that simulation and correction do not share one discretisation.
SIMULATION_PHASE_TOLERANCE_RAD = math.pi / 16


@dataclass(frozen=True)
class Optics:
    """CTF and radiation damage of a simulated acquisition (docs/CONVENTIONS.md "CTF").

    ``ctf``: apply the CTF, at a defocus per tilt of ``defocus_um`` (nominal, positive = underfocus) plus a
    uniform ``+-defocus_spread_um`` (the scatter of a real series' focus), or exactly ``defocus_A`` ``(M,)``
    when given. ``total_exposure_e_per_A2``: radiation damage (0: none), the exposure shared equally by the
    tilts, taken in :func:`icetide.ctf.dose_symmetric_order`.
    """

    pixel_size_A: float
    ctf: bool = True
    defocus_um: float = 3.0
    defocus_spread_um: float = 0.2
    defocus_A: tuple[float, ...] | None = None
    microscope: Microscope = field(default_factory=Microscope)
    defocus_hand: int = 1
    total_exposure_e_per_A2: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.pixel_size_A) and self.pixel_size_A > 0):
            raise IcetideError(f"the pixel size must be positive, got {self.pixel_size_A}")
        if self.ctf and not (math.isfinite(self.defocus_um) and self.defocus_um > 0):
            raise IcetideError(f"the defocus must be a positive underfocus in micrometres, got {self.defocus_um}")
        if not (math.isfinite(self.defocus_spread_um) and 0 <= self.defocus_spread_um < self.defocus_um):
            raise IcetideError(
                f"the defocus spread must lie in [0, defocus), got {self.defocus_spread_um} um"
            )
        if self.defocus_hand not in (1, -1):
            raise IcetideError(f"the defocus hand must be 1 or -1, got {self.defocus_hand}")
        if not (math.isfinite(self.total_exposure_e_per_A2) and self.total_exposure_e_per_A2 >= 0):
            raise IcetideError(f"the exposure must be non-negative (e/A^2), got {self.total_exposure_e_per_A2}")


def draw_defocus_A(optics: Optics, n_tilts: int, seed: int) -> np.ndarray:
    """Per-tilt defocus ``(M,)`` in Angstrom. Drawn by a generator of its own (``seed``, stream 1), so that a
    seed gives the same deformations and noise with and without a CTF."""
    if optics.defocus_A is not None:
        values = np.asarray(optics.defocus_A, dtype=np.float64).reshape(-1)
        if values.shape[0] != n_tilts:
            raise IcetideError(f"defocus for {values.shape[0]} views, the series has {n_tilts}")
        return values
    rng = np.random.default_rng([seed, 1])
    return 1e4 * (optics.defocus_um + rng.uniform(-optics.defocus_spread_um, optics.defocus_spread_um, n_tilts))


def optics_layers(optics: Optics, thickness_vox: float, max_tilt_deg: float) -> int:
    """Layers the slab is cut into so that each spans at most one simulation defocus step at the highest tilt."""
    if not optics.ctf:
        return 1
    step = defocus_step_A(optics.pixel_size_A, optics.microscope, SIMULATION_PHASE_TOLERANCE_RAD)
    spread = optics.pixel_size_A * thickness_vox / math.cos(math.radians(max_tilt_deg))
    return max(1, math.ceil(spread / step))


def optics_image_formation(
    optics: Optics,
    tilt_angles_deg: np.ndarray,
    defocus_A: np.ndarray | None,
    pre_exposure_e_per_A2: np.ndarray | None,
    thickness_vox: float,
) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """``image(m, layers)`` for :func:`icetide.simulate.project_deformed`: ``layers (S, ny, nx)`` are the
    projections of ``S`` equal layers of a slab ``thickness_vox`` thick, bottom first."""

    def image(m: int, layers: torch.Tensor) -> torch.Tensor:
        n_layers, shape = layers.shape[0], (layers.shape[-2], layers.shape[-1])
        damage = None
        if pre_exposure_e_per_A2 is not None:
            damage = exposure_attenuation(shape, optics.pixel_size_A, pre_exposure_e_per_A2[m],
                                          optics.microscope.voltage_kV, layers.device)
        if defocus_A is None:
            total = layers.sum(0)
            if damage is None:
                return total
            return torch.fft.irfft2(torch.fft.rfft2(total.double()) * damage, s=shape).to(layers.dtype)
        out = torch.zeros(shape, dtype=layers.dtype, device=layers.device)
        for s in range(n_layers):
            height = -thickness_vox / 2 + (s + 0.5) * thickness_vox / n_layers
            df = float(defocus_A[m])
            out += filter_tilted(
                layers[s], optics.pixel_size_A, (df, df, 0.0), float(tilt_angles_deg[m]), optics.microscope, "ctf",
                0.0, optics.defocus_hand, height, SIMULATION_PHASE_TOLERANCE_RAD, damage,
            )
        return out

    return image


def optics_pre_exposure(optics: Optics, tilt_angles_deg: np.ndarray) -> np.ndarray | None:
    """Exposure accumulated before each tilt (e/A^2, ``(M,)``), or None without radiation damage."""
    if optics.total_exposure_e_per_A2 == 0:
        return None
    order = dose_symmetric_order(tilt_angles_deg)
    return pre_exposure_from_order(order, optics.total_exposure_e_per_A2 / len(tilt_angles_deg))
