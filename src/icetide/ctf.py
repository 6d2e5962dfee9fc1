"""Contrast transfer function, defocus across a tilted image, phase flipping and exposure (dose) weighting.

Conventions (docs/CONVENTIONS.md "CTF"):

- Defocus in Angstrom, positive = underfocus (CTFFIND4, RELION). Astigmatism: ``defocus_u_A`` along the direction
  ``astigmatism_angle_deg`` (counter-clockwise from the image X axis), ``defocus_v_A`` across it.
- The transfer function is the one of images with the density bright (icetide's polarity, RELION's):
  ``CTF(k) = sin(chi(k) + arcsin(A))`` with ``chi(k) = pi lambda df k^2 - pi/2 Cs lambda^3 k^4``, so
  ``CTF(0) = A`` (the amplitude contrast) and the first lobe is positive. Raw cryo-EM images (density dark) are
  the negative of that and are inverted (``reconstruct --invert``) like any other dark-on-light data.
- A tilted specimen is not at one defocus: a point at height ``t`` along the beam (voxel units, the frame of
  docs/CONVENTIONS.md: ``t = -x sin(theta) + z cos(theta)``) is at ``df + hand * t * pixel``. ``hand = +1`` puts the
  electron source on the ``+t`` side (points further from the lens are further underfocus). A point of the specimen's
  mid-plane seen at ``d`` pixels from the tilt axis (``d = u cos(psi) + v sin(psi)``, ``psi`` the tilt-axis angle on
  the image) has ``t = -d tan(theta)``; a point ``z_c`` above the mid-plane adds ``z_c / cos(theta)``. The defocus a
  CTF fit reports for a tilt is the one on the tilt axis.

A filter whose defocus varies across the image is applied as IMOD's ``ctfphaseflip`` does in strips, but with
the strips replaced by interpolation: the image is filtered at defocus values spaced so that the CTF phase at
Nyquist moves by at most ``phase_tolerance_rad`` between neighbours, and every pixel takes the linear
interpolation of the two filtered images around its own defocus.

Exposure weighting uses the critical exposure of Grant & Grigorieff (2015, eLife 4:e06980), measured at 300 kV:
``Ne(k) = 0.245 k^-1.665 + 2.81`` e/A^2 (``k`` in 1/A), 0.8 times that at 200 kV; an image taken after an
accumulated exposure ``N`` keeps the fraction ``exp(-N / (2 Ne(k)))`` of its amplitude at frequency ``k``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from .errors import IcetideError

__all__ = [
    "Microscope",
    "electron_wavelength_A",
    "ctf_2d",
    "critical_exposure",
    "exposure_attenuation",
    "defocus_offsets_A",
    "defocus_step_A",
    "filter_tilted",
    "phase_flip_series",
    "SeriesCtf",
    "exposure_weight_series",
    "tilt_axis_on_images_deg",
    "dose_symmetric_order",
    "pre_exposure_from_order",
]


@dataclass(frozen=True)
class Microscope:
    """Optics of the CTF: acceleration voltage (kV), spherical aberration (mm), amplitude contrast (fraction)."""

    voltage_kV: float = 300.0
    spherical_aberration_mm: float = 2.7
    amplitude_contrast: float = 0.07

    def __post_init__(self) -> None:
        if not (math.isfinite(self.voltage_kV) and self.voltage_kV > 0):
            raise IcetideError(f"the voltage must be positive (kV), got {self.voltage_kV}")
        if not (math.isfinite(self.spherical_aberration_mm) and self.spherical_aberration_mm >= 0):
            raise IcetideError(f"Cs must be non-negative (mm), got {self.spherical_aberration_mm}")
        if not 0 <= self.amplitude_contrast < 1:
            raise IcetideError(f"the amplitude contrast must lie in [0, 1), got {self.amplitude_contrast}")

    @property
    def wavelength_A(self) -> float:
        return electron_wavelength_A(self.voltage_kV)


def electron_wavelength_A(voltage_kV: float) -> float:
    """Relativistic electron wavelength in Angstrom: ``h / sqrt(2 m e V (1 + e V / (2 m c^2)))``
    (0.01969 A at 300 kV)."""
    volts = voltage_kV * 1e3
    return 12.2642598 / math.sqrt(volts * (1 + 0.97846917e-6 * volts))


def _frequencies(shape: tuple[int, int], pixel_size_A: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Spatial frequencies ``(ky, kx)`` of the ``rfft2`` layout of an image of ``shape``, 1/A, float64."""
    ny, nx = shape
    ky = torch.fft.fftfreq(ny, d=pixel_size_A, dtype=torch.float64, device=device)[:, None]
    kx = torch.fft.rfftfreq(nx, d=pixel_size_A, dtype=torch.float64, device=device)[None, :]
    return ky.expand(ny, kx.shape[1]), kx.expand(ny, kx.shape[1])


def ctf_2d(
    shape: tuple[int, int],
    pixel_size_A: float,
    defocus_u_A,
    defocus_v_A=None,
    astigmatism_angle_deg=0.0,
    microscope: Microscope = Microscope(),
    device=None,
) -> torch.Tensor:
    """The CTF on the ``rfft2`` grid of an image of ``shape``: ``(..., ny, nx // 2 + 1)`` float64.

    ``defocus_u_A``, ``defocus_v_A`` (default: ``u``, no astigmatism) and ``astigmatism_angle_deg`` broadcast
    against each other (scalars or ``(K,)``); a leading ``K`` dimension is added when they are not scalars.
    """
    du = torch.as_tensor(defocus_u_A, dtype=torch.float64, device=device)
    dv = du if defocus_v_A is None else torch.as_tensor(defocus_v_A, dtype=torch.float64, device=device)
    angle = torch.as_tensor(astigmatism_angle_deg, dtype=torch.float64, device=device)
    du, dv, angle = torch.broadcast_tensors(du, dv, angle)
    ky, kx = _frequencies(shape, pixel_size_A, device)
    k2 = kx.square() + ky.square()
    phi = torch.atan2(ky, kx)
    lead = du.shape
    du, dv, angle = (a.reshape(*lead, 1, 1) for a in (du, dv, angle))
    defocus = 0.5 * (du + dv) + 0.5 * (du - dv) * torch.cos(2 * (phi - torch.deg2rad(angle)))
    lam = microscope.wavelength_A
    cs_A = microscope.spherical_aberration_mm * 1e7
    chi = math.pi * lam * defocus * k2 - 0.5 * math.pi * cs_A * lam**3 * k2.square()
    return torch.sin(chi + math.asin(microscope.amplitude_contrast))


def critical_exposure(k_per_A: torch.Tensor, voltage_kV: float = 300.0) -> torch.Tensor:
    """Grant & Grigorieff's critical exposure ``Ne(k)`` in e/A^2 (infinite at ``k = 0``). Measured at 300 kV;
    0.8 times that at 200 kV (their scaling), linear in between, the nearest of the two outside."""
    scale = 0.8 + 0.2 * min(max((voltage_kV - 200.0) / 100.0, 0.0), 1.0)
    k = torch.as_tensor(k_per_A, dtype=torch.float64)
    return (0.245 * k.pow(-1.665) + 2.81) * scale


def exposure_attenuation(
    shape: tuple[int, int], pixel_size_A: float, pre_exposure_e_per_A2, voltage_kV: float = 300.0, device=None
) -> torch.Tensor:
    """Amplitude kept after an accumulated exposure: ``exp(-N / (2 Ne(k)))`` on the ``rfft2`` grid,
    ``(..., ny, nx // 2 + 1)`` float64 (a leading dimension for a non-scalar exposure ``N``, e/A^2)."""
    ky, kx = _frequencies(shape, pixel_size_A, device)
    ne = critical_exposure(torch.sqrt(kx.square() + ky.square()), voltage_kV).to(ky.device)
    n = torch.as_tensor(pre_exposure_e_per_A2, dtype=torch.float64, device=ky.device)
    return torch.exp(-n.reshape(*n.shape, 1, 1) / (2 * ne))


def defocus_offsets_A(
    shape: tuple[int, int],
    pixel_size_A: float,
    tilt_angle_deg: float,
    tilt_axis_angle_deg: float = 0.0,
    defocus_hand: int = 1,
    height_vox: float = 0.0,
    device=None,
) -> torch.Tensor:
    """Defocus of every pixel relative to the tilt's nominal defocus, ``(ny, nx)`` float64, Angstrom.

    ``hand * pixel * (-d tan(theta) + height / cos(theta))`` with ``d`` the pixel's distance from the tilt axis (the
    detector frame of docs/CONVENTIONS.md) and ``height_vox`` the specimen height above its mid-plane (module
    docstring).
    """
    ny, nx = shape
    v = (torch.arange(ny, dtype=torch.float64, device=device) - (ny - 1) / 2)[:, None]
    u = (torch.arange(nx, dtype=torch.float64, device=device) - (nx - 1) / 2)[None, :]
    psi, theta = math.radians(tilt_axis_angle_deg), math.radians(tilt_angle_deg)
    d = u * math.cos(psi) + v * math.sin(psi)
    return defocus_hand * pixel_size_A * (-d * math.tan(theta) + height_vox / math.cos(theta))


def defocus_step_A(pixel_size_A: float, microscope: Microscope, phase_tolerance_rad: float) -> float:
    """Defocus change that moves the CTF phase at Nyquist by ``phase_tolerance_rad``: ``tol / (pi lambda k_N^2)``."""
    k_nyquist = 0.5 / pixel_size_A
    return phase_tolerance_rad / (math.pi * microscope.wavelength_A * k_nyquist**2)


def filter_tilted(
    image: torch.Tensor,
    pixel_size_A: float,
    defocus_A: tuple[float, float, float],
    tilt_angle_deg: float,
    microscope: Microscope = Microscope(),
    mode: Literal["ctf", "flip"] = "ctf",
    tilt_axis_angle_deg: float = 0.0,
    defocus_hand: int = 1,
    height_vox: float = 0.0,
    phase_tolerance_rad: float = math.pi / 8,
    spectrum: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply the CTF (``mode="ctf"``) or its sign (``"flip"``, phase flipping) to one tilt image ``(ny, nx)``
    with the defocus varying across it (:func:`defocus_offsets_A`). Returns ``(ny, nx)`` of the image's dtype.

    ``defocus_A``: ``(defocus_u, defocus_v, astigmatism_angle_deg)`` on the tilt axis. ``spectrum``: an extra
    filter on the ``rfft2`` grid (e.g. :func:`exposure_attenuation`) applied with it. See the module docstring
    for the interpolation between defocus values.
    """
    shape = (image.shape[-2], image.shape[-1])
    offsets = defocus_offsets_A(shape, pixel_size_A, tilt_angle_deg, tilt_axis_angle_deg, defocus_hand,
                                height_vox, image.device)
    lo, hi = float(offsets.min()), float(offsets.max())
    step = defocus_step_A(pixel_size_A, microscope, phase_tolerance_rad)
    n_nodes = max(1, math.ceil((hi - lo) / step - 1e-9) + 1)
    nodes = torch.linspace(lo, hi, n_nodes, dtype=torch.float64) if n_nodes > 1 else torch.tensor([0.5 * (lo + hi)])
    du, dv, angle = defocus_A
    transfer = ctf_2d(shape, pixel_size_A, du + nodes, dv + nodes, angle, microscope, image.device)
    if mode == "flip":
        transfer = torch.sign(transfer)
    elif mode != "ctf":
        raise IcetideError(f"unknown CTF filter mode {mode!r}")
    if spectrum is not None:
        transfer = transfer * spectrum.to(transfer.device)
    image_ft = torch.fft.rfft2(image.to(torch.float64))
    if n_nodes == 1:
        return torch.fft.irfft2(image_ft * transfer[0], s=shape).to(image.dtype)
    position = (offsets - lo) / (hi - lo) * (n_nodes - 1)  # fractional node index of every pixel
    out = torch.zeros(shape, dtype=torch.float64, device=image.device)
    for k in range(n_nodes):
        weight = (1 - (position - k).abs()).clamp_(min=0)  # linear interpolation between neighbouring nodes
        if bool(weight.any()):
            out += weight * torch.fft.irfft2(image_ft * transfer[k], s=shape)
    return out.to(image.dtype)


def _check_defocus(defocus, n_tilts: int) -> np.ndarray:
    """``(M, 3)`` rows ``(defocus_u_A, defocus_v_A, angle_deg)`` from ``(M, 3)`` or ``(M,)`` (no astigmatism)."""
    table = np.asarray(defocus, dtype=np.float64)
    if table.ndim == 1:
        table = np.stack([table, table, np.zeros_like(table)], axis=1)
    if table.shape != (n_tilts, 3):
        raise IcetideError(f"defocus for {table.shape[0]} views, the series has {n_tilts}")
    return table


def phase_flip_series(
    images: torch.Tensor,
    tilt_angles_deg,
    pixel_size_A: float,
    defocus,
    microscope: Microscope = Microscope(),
    tilt_axis_angle_deg: float = 0.0,
    defocus_hand: int = 1,
    phase_tolerance_rad: float = math.pi / 8,
) -> torch.Tensor:
    """Phase-flip every tilt of ``images (M, ny, nx)`` (:func:`filter_tilted` with ``mode="flip"``).

    ``defocus``: ``(M,)`` defocus (A) or ``(M, 3)`` rows ``(u, v, angle)`` as in :class:`icetide.data.TiltSeries`.
    ``phase_tolerance_rad``: see :func:`filter_tilted`. Returns a new ``(M, ny, nx)`` tensor.
    """
    angles = np.asarray(tilt_angles_deg, dtype=np.float64).reshape(-1)
    table = _check_defocus(defocus, len(angles))
    return torch.stack([
        filter_tilted(images[m], pixel_size_A, tuple(table[m]), float(angles[m]), microscope, "flip",
                      tilt_axis_angle_deg, defocus_hand, 0.0, phase_tolerance_rad)
        for m in range(len(angles))
    ])


class SeriesCtf:
    """The CTF of every tilt of a series as a differentiable image filter: the forward model's CTF
    (``ctf.correction: model``). ``defocus_A``: ``(M, 3)`` as in :class:`icetide.data.TiltSeries`; the other
    arguments as in :func:`filter_tilted`."""

    def __init__(
        self,
        tilt_angles_deg,
        pixel_size_A: float,
        defocus_A,
        microscope: Microscope,
        tilt_axis_angle_deg: float = 0.0,
        defocus_hand: int = 1,
        phase_tolerance_rad: float = math.pi / 8,
    ):
        self.tilt_angles_deg = np.asarray(tilt_angles_deg, dtype=np.float64).reshape(-1)
        self.defocus_A = _check_defocus(defocus_A, len(self.tilt_angles_deg))
        self.pixel_size_A, self.microscope = float(pixel_size_A), microscope
        self.tilt_axis_angle_deg, self.defocus_hand = float(tilt_axis_angle_deg), int(defocus_hand)
        self.phase_tolerance_rad = float(phase_tolerance_rad)

    def __call__(self, image: torch.Tensor, m: int) -> torch.Tensor:
        """Tilt ``m``'s image ``(ny, nx)`` as the microscope would record it (same dtype, differentiable)."""
        return filter_tilted(
            image, self.pixel_size_A, tuple(self.defocus_A[m]), float(self.tilt_angles_deg[m]), self.microscope,
            "ctf", self.tilt_axis_angle_deg, self.defocus_hand, 0.0, self.phase_tolerance_rad,
        )


def exposure_weight_series(
    images: torch.Tensor, pixel_size_A: float, pre_exposure_e_per_A2, voltage_kV: float = 300.0
) -> torch.Tensor:
    """Exposure-weight every tilt of ``images (M, ny, nx)``: multiply its spectrum by
    :func:`exposure_attenuation` of its accumulated exposure (``(M,)`` e/A^2), as the exposure filter of
    Grant & Grigorieff does for movie frames: frequencies that radiation damage has already faded are
    down-weighted with their noise."""
    shape = (images.shape[-2], images.shape[-1])
    n = np.asarray(pre_exposure_e_per_A2, dtype=np.float64).reshape(-1)
    if n.shape[0] != images.shape[0]:
        raise IcetideError(f"pre-exposure for {n.shape[0]} views, the series has {images.shape[0]}")
    weights = exposure_attenuation(shape, pixel_size_A, n, voltage_kV, images.device)
    return torch.fft.irfft2(torch.fft.rfft2(images.to(torch.float64)) * weights, s=shape).to(images.dtype)


def tilt_axis_on_images_deg(tilt_axis_angle_deg: float, rotations_deg=None) -> float:
    """The tilt axis' direction on the raw images (degrees counter-clockwise from Y), which orients the defocus
    gradient: ``tilt_axis_angle_deg``, or, when a starting alignment holds the axis in its in-plane rotations
    (``rotations_deg``, ``(M,)``, ``alpha = -psi`` plus small per-tilt terms), minus their median."""
    if rotations_deg is None:
        return float(tilt_axis_angle_deg)
    return -float(np.median(np.asarray(rotations_deg, dtype=np.float64)))


def dose_symmetric_order(tilt_angles_deg) -> np.ndarray:
    """Acquisition index of every view for a dose-symmetric scheme (Hagen et al. 2017, groups of one): the
    view nearest 0 degrees first, then alternately the next view on the positive and the negative side.
    Returns ``(M,)`` int, 0 = first acquired."""
    angles = np.asarray(tilt_angles_deg, dtype=np.float64).reshape(-1)
    start = int(np.argmin(np.abs(angles)))
    positive = [int(i) for i in np.argsort(angles) if angles[i] > angles[start]]
    negative = [int(i) for i in np.argsort(-angles) if angles[i] < angles[start]]
    sequence = [start]
    while positive or negative:
        for side in (positive, negative):
            if side:
                sequence.append(side.pop(0))
    order = np.empty(len(angles), dtype=int)
    order[np.asarray(sequence)] = np.arange(len(angles))
    return order


def pre_exposure_from_order(order, exposure_per_tilt_e_per_A2: float) -> np.ndarray:
    """Exposure accumulated before each view, ``(M,)`` e/A^2, for views taken in acquisition ``order``
    (0 = first) with the same exposure each."""
    return np.asarray(order, dtype=np.float64) * float(exposure_per_tilt_e_per_A2)
