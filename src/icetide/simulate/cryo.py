"""A cryo-ET tilt series as the microscope records it, with known truth (docs/CONVENTIONS.md "Simulated cryo-ET").

:func:`simulate_tilt_series` gives zero-mean projections plus noise; :func:`simulate_cryo` gives what a detector
records, with the complications of real data:

- the specimen (density bright = dense, ``(nz, ny, nx)``) sits ``z_offset_A`` above the tilt axis' height and
  is wide enough that every ray reaching the field of view crosses it (wider than the field, like a cell or a
  lamella); gold beads (balls of ``bead_diameter_A``) lie just inside its two surfaces;
- the views are taken in a dose-symmetric order (:func:`icetide.ctf.dose_symmetric_order`); the stage drifts as
  a random walk outwards from the first view along each branch of the scheme, plus jitter; every view is turned
  by the tilt axis' angle plus a small rotation and warped by a smooth local field (:class:`Deformations`);
- contrast: the specimen's projections through the CTF (defocus per view, varying across the tilted image and
  through the depth) and radiation damage (:mod:`icetide.simulate.optics`), scaled so that the undeformed view
  nearest 0 degrees has a relative standard deviation of ``specimen_contrast`` (so with the defaults, 50 counts
  at 0 degrees, the specimen's contrast SNR is about -5 dB); beads add pure amplitude contrast (no CTF,
  no damage): the fraction ``bead_contrast`` of the level at a bead's centre;
- counts: ``L_m (1 - contrast)``, density dark. ``L_m = L_0 exp(-t (1 / cos(theta_m) - 1) / lambda) (1 + e_m)``:
  the zero-loss level falls with the path ``t / cos(theta)`` through ice ``t`` thick (Beer-Lambert, inelastic
  mean free path ``lambda``), ``e_m`` a beam fluctuation. ``L_0`` (the level at 0 degrees) is ``level_counts``,
  or, with ``snr_db``, the level whose counting noise gives the specimen's contrast that SNR
  (``10 log10(sum (L_m (c - mean_m c))^2 / sum L_m)`` over the pixels away from beads). Noise: Poisson draws, or
  Gaussian of the same variance.

The truth kept for scoring: the specimen without beads over the field of view's footprint (``truth``), the
beads' centres, the per-view deformations, defocus, pre-exposure and levels, and the same acquisition without
deformations (its own noise draw) for the oracle.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..ctf import Microscope, dose_symmetric_order
from ..deform import Deformations, deform_coords
from ..errors import IcetideError
from ..geometry import detector_grid, frame_quarter_turns
from .acquire import DeformationProfile, local_fields, project_deformed
from .optics import Optics, optics_image_formation, optics_layers, optics_pre_exposure

__all__ = [
    "CryoAcquisition", "CryoSeries", "cryo_box_shape", "cryo_deformations", "cryo_specimen", "simulate_cryo", "write_cryo",
]


@dataclass(frozen=True)
class CryoAcquisition:
    """Settings of a simulated cryo-ET acquisition; units in the names (``_px``: detector pixels).

    Geometry: ``field_of_view`` ``(ny, nx)`` px at ``pixel_size_A``; tilts ``tilt_min_deg:tilt_step_deg:
    tilt_max_deg``; the tilt axis at ``tilt_axis_deg`` (counter-clockwise from the image Y axis, as SerialEM and
    IMOD count it), reported in the ``.mdoc`` off by ``tilt_axis_error_deg``; the specimen ``z_offset_A`` above
    the tilt axis; ``specimen_thickness_A``: the ice of a generated specimen (:func:`cryo_specimen`). Beads: ``n_beads`` of ``bead_diameter_A``. Intensities: see the module docstring.
    Drift: a random walk of ``drift_step_px`` RMS per view outwards from the first view, scaled down to at most
    ``drift_max_px``, plus ``jitter_px`` RMS per view; rotations uniform within ``+-rotation_deg`` around the
    axis; local fields of at most ``local_px`` on ``local_grid`` control points. Optics: defocus ``defocus_um``
    ``+- defocus_spread_um`` (uniform per view), the defocus file off by ``defocus_error_um`` RMS;
    ``dose_per_tilt_e_per_A2`` of exposure per view.
    """

    field_of_view: tuple[int, int] = (160, 160)
    pixel_size_A: float = 10.0
    tilt_min_deg: float = -60.0
    tilt_max_deg: float = 60.0
    tilt_step_deg: float = 3.0
    tilt_axis_deg: float = 3.0
    tilt_axis_error_deg: float = 1.0
    z_offset_A: float = 200.0
    specimen_thickness_A: float = 960.0
    n_beads: int = 6
    bead_diameter_A: float = 100.0
    bead_contrast: float = 0.5
    specimen_contrast: float = 0.08
    level_counts: float = 50.0
    snr_db: float | None = None
    noise: str = "poisson"
    level_jitter: float = 0.03
    mean_free_path_A: float = 3500.0
    dose_per_tilt_e_per_A2: float = 3.0
    defocus_um: float = 4.0
    defocus_spread_um: float = 0.3
    defocus_error_um: float = 0.05
    defocus_hand: int = 1
    microscope: Microscope = field(default_factory=Microscope)
    drift_step_px: float = 3.0
    drift_max_px: float = 18.0
    jitter_px: float = 0.5
    rotation_deg: float = 0.3
    local_px: float = 2.0
    local_grid: tuple[int, int] = (5, 5)

    def __post_init__(self) -> None:
        positive = ("pixel_size_A", "tilt_step_deg", "specimen_thickness_A", "bead_diameter_A", "specimen_contrast", "level_counts",
                    "mean_free_path_A", "defocus_um")
        for name in positive:
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise IcetideError(f"{name} must be a positive number, got {value}")
        non_negative = ("bead_contrast", "level_jitter", "dose_per_tilt_e_per_A2", "defocus_spread_um",
                        "defocus_error_um", "drift_step_px", "drift_max_px", "jitter_px", "rotation_deg",
                        "local_px", "tilt_axis_error_deg")
        for name in non_negative:
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise IcetideError(f"{name} must be a non-negative number, got {value}")
        if min(self.field_of_view) < 16:
            raise IcetideError(f"the field of view must be at least 16 x 16 px, got {self.field_of_view}")
        if not -90 < self.tilt_min_deg <= self.tilt_max_deg < 90:
            raise IcetideError(f"tilts must satisfy -90 < min <= max < 90, got {self.tilt_min_deg}, {self.tilt_max_deg}")
        if self.noise not in ("poisson", "gaussian"):
            raise IcetideError(f"noise must be poisson or gaussian, got {self.noise!r}")
        if self.snr_db is not None and not math.isfinite(self.snr_db):
            raise IcetideError(f"the SNR must be a finite number of dB, got {self.snr_db}")
        if self.bead_contrast >= 1:
            raise IcetideError(f"bead_contrast is the fraction of the level a bead absorbs: below 1, got {self.bead_contrast}")
        if self.n_beads < 0:
            raise IcetideError(f"n_beads must be >= 0, got {self.n_beads}")

    def tilt_angles_deg(self) -> np.ndarray:
        """The tilt angles ``(M,)``, ascending (stack order), degrees."""
        n = int(math.floor((self.tilt_max_deg - self.tilt_min_deg) / self.tilt_step_deg + 1e-9)) + 1
        return np.round(self.tilt_min_deg + self.tilt_step_deg * np.arange(n), 9)

    def frame_shape(self) -> tuple[int, int]:
        """``(ny, nx)`` of the tilt-axis frame (truth, undeformed projections): the field of view, turned as
        icetide turns it when the tilt axis lies nearer the image X axis
        (:func:`icetide.geometry.frame_quarter_turns`)."""
        ny, nx = self.field_of_view
        return (nx, ny) if frame_quarter_turns(self.tilt_axis_deg) % 2 else (ny, nx)

    def optics(self) -> Optics:
        """The CTF and radiation damage of this acquisition (the per-view defocus is drawn by :func:`simulate_cryo`)."""
        n = len(self.tilt_angles_deg())
        return Optics(self.pixel_size_A, True, self.defocus_um, self.defocus_spread_um, None, self.microscope,
                      self.defocus_hand, self.dose_per_tilt_e_per_A2 * n)


@dataclass
class CryoSeries:
    """A simulated cryo-ET acquisition and its truth. Images float32 ``(M, ny, nx)`` in counts, stack order.

    ``counts``: the recorded series; ``counts_undeformed``: the same acquisition without deformations, its own
    noise draw (the oracle's input). ``levels`` ``(M,)``: the expected counts of an empty pixel per view.
    ``truth``: the specimen without beads over the field of view's footprint, ``(nz, ny, nx)``, its centre
    ``z_offset_vox`` above the tilt axis. ``bead_centres_vox`` ``(B, 3)``: ``(x, y, z)`` in the tilt-axis frame
    (docs/CONVENTIONS.md); ``bead_radius_vox``. ``defocus_A`` (true, at the tilt axis) and
    ``defocus_measured_A`` (the defocus file's, with its error), ``pre_exposure_e_per_A2``,
    ``acquisition_order`` (0 = first), all ``(M,)``. ``snr_db_measured``: the specimen's contrast SNR of this
    noise draw, away from the beads.
    """

    counts: np.ndarray
    counts_undeformed: np.ndarray
    levels: np.ndarray
    truth: np.ndarray
    z_offset_vox: float
    bead_centres_vox: np.ndarray
    bead_radius_vox: float
    tilt_angles_deg: np.ndarray
    deformations: Deformations
    defocus_A: np.ndarray
    defocus_measured_A: np.ndarray
    pre_exposure_e_per_A2: np.ndarray
    acquisition_order: np.ndarray
    level_0_counts: float
    snr_db_measured: float
    settings: CryoAcquisition
    seed: int
    timings_s: dict = field(default_factory=dict)

    @property
    def nominal_tilt_axis_deg(self) -> float:
        """The tilt axis as the ``.mdoc`` reports it (the true one plus the error)."""
        return self.settings.tilt_axis_deg + self.settings.tilt_axis_error_deg


def _reach_px(settings: CryoAcquisition) -> float:
    """How far from the tilt axis' origin, in the ideal frame, a detector pixel can map (rotation, drift, warp)."""
    ny, nx = settings.field_of_view
    return 0.5 * math.hypot(ny, nx) + settings.drift_max_px + 3 * settings.jitter_px + settings.local_px + 2


def cryo_box_shape(settings: CryoAcquisition, specimen_nz: int) -> tuple[int, int]:
    """``(ny, nx)`` a specimen ``specimen_nz`` voxels thick must span so that every ray to the field of view
    crosses it inside (same parities as the field of view, so the footprint is centred)."""
    reach = _reach_px(settings)
    theta = math.radians(max(abs(settings.tilt_min_deg), abs(settings.tilt_max_deg)))
    half_depth = specimen_nz / 2 + abs(settings.z_offset_A) / settings.pixel_size_A + 1
    half_x = (reach + half_depth * math.sin(theta)) / math.cos(theta)
    ny, nx = settings.frame_shape()
    need_y = 2 * math.ceil(reach) + 2
    need_x = 2 * math.ceil(half_x) + 2
    return need_y + (need_y - ny) % 2, need_x + (need_x - nx) % 2


def _branch_walks(angles: np.ndarray, step_px: float, rng: np.random.Generator) -> np.ndarray:
    """``(M, 2)`` random walks starting at the view nearest 0 degrees, outwards along each branch."""
    m = len(angles)
    start = int(np.argmin(np.abs(angles)))
    walk = np.zeros((m, 2))
    steps = rng.standard_normal((m, 2)) * (step_px / math.sqrt(2))
    for side in (np.arange(start + 1, m), np.arange(start - 1, -1, -1)):
        if side.size:
            walk[side] = np.cumsum(steps[side], axis=0)
    return walk


def cryo_deformations(settings: CryoAcquisition, angles: np.ndarray, rng: np.random.Generator) -> Deformations:
    """The true deformations of a cryo acquisition: drift walks + jitter, the rotation that turns the tilt axis
    onto the image Y axis plus small rotations, local fields (:func:`icetide.simulate.acquire.local_fields`). ``angles`` ascending."""
    walk = _branch_walks(angles, settings.drift_step_px, rng)
    peak = np.abs(walk).max()
    if peak > settings.drift_max_px:
        walk *= settings.drift_max_px / peak
    shifts = walk + rng.standard_normal(walk.shape) * settings.jitter_px
    # A tilt axis psi counter-clockwise from the image Y axis is turned onto Y by the rotation alpha = -psi.
    rotations = -settings.tilt_axis_deg + rng.uniform(-settings.rotation_deg, settings.rotation_deg, len(angles))
    profile = DeformationProfile(0.0, 0.0, 0.0, settings.local_px, tuple(settings.local_grid))
    local = local_fields(len(angles), tuple(settings.field_of_view), profile, rng)
    extra = {"profile": "cryo", "tilt_axis_deg": settings.tilt_axis_deg}
    return Deformations(angles, shifts, rotations, local, tuple(settings.field_of_view), "bicubic", extra)


def _bead_centres(
    settings: CryoAcquisition, specimen_nz: int, z_offset_vox: float, rng: np.random.Generator
) -> np.ndarray:
    """``(B, 3)`` bead centres ``(x, y, z)`` (voxels, tilt-axis frame): on both surfaces, inside the central
    90 % of the field of view at 0 degrees, at least 1.5 diameters apart."""
    radius = settings.bead_diameter_A / settings.pixel_size_A / 2
    surface = max(specimen_nz / 2 - radius, 0.0)
    half = 0.45 * np.asarray(settings.frame_shape()[::-1], dtype=np.float64) - radius
    centres: list[np.ndarray] = []
    tries = 0
    while len(centres) < settings.n_beads:
        tries += 1
        if tries > 10000:
            raise IcetideError(f"cannot place {settings.n_beads} beads of {settings.bead_diameter_A:g} A apart in "
                               f"a {settings.field_of_view} field of view")
        xy = rng.uniform(-half, half)
        z = z_offset_vox + surface * (1 if len(centres) % 2 == 0 else -1)
        candidate = np.array([xy[0], xy[1], z])
        if all(np.hypot(*(candidate[:2] - c[:2])) >= 3 * radius for c in centres):
            centres.append(candidate)
    return np.asarray(centres, dtype=np.float64).reshape(-1, 3)


def _bead_chords(coords: torch.Tensor, centres: np.ndarray, radius: float, theta_rad: float) -> torch.Tensor:
    """Sum over beads of each ray's path length through the bead, ``(H, W)``; ``coords (H, W, 2)`` ideal."""
    out = torch.zeros(coords.shape[:2], dtype=torch.float64)
    for x, y, z in centres:
        u = x * math.cos(theta_rad) + z * math.sin(theta_rad)
        rho2 = (coords[..., 0].double() - u) ** 2 + (coords[..., 1].double() - y) ** 2
        out += 2 * torch.sqrt(torch.clamp(radius**2 - rho2, min=0))
    return out


def _view_shape(settings: CryoAcquisition, d: Deformations | None) -> tuple[int, int]:
    """``(ny, nx)`` of the views seen through ``d``: the detector's, or without deformations the tilt-axis frame's."""
    return tuple(settings.field_of_view) if d is not None else settings.frame_shape()


def _ideal_coords(d: Deformations | None, n_views: int, shape: tuple[int, int]) -> torch.Tensor:
    """Ideal coordinates ``(M, H, W, 2)`` of every view's pixels (the detector grid without deformations)."""
    u, v = detector_grid(*shape)
    if d is None:
        return torch.stack([u, v], -1).expand(n_views, -1, -1, -1)
    t = d.tensors("cpu")
    return deform_coords(u, v, t["shifts_px"], t["angles_rad"], t["local_px"], shape, d.local_interpolation)


def _specimen_images(
    specimen: torch.Tensor,
    z_pad: tuple[int, int],
    settings: CryoAcquisition,
    angles: np.ndarray,
    d: Deformations | None,
    defocus_A: np.ndarray,
    pre_exposure: np.ndarray,
    on_view: Callable[[int], None] | None,
) -> np.ndarray:
    """The specimen's images ``(M, H, W)`` (density units, bright) through deformations, CTF and damage."""
    optics = settings.optics()
    box = torch.nn.functional.pad(specimen, (0, 0, 0, 0, z_pad[0], z_pad[1]))
    thickness = box.shape[0] + 1.0
    layers = optics_layers(optics, thickness, float(np.abs(angles).max()))
    formation = optics_image_formation(optics, angles, defocus_A, pre_exposure, thickness)
    images = project_deformed(box, angles, d, _view_shape(settings, d), on_tilt=on_view, n_slabs=layers,
                              image_formation=formation)
    return images.double().numpy()


def _add_beads(
    contrast: np.ndarray, settings: CryoAcquisition, angles: np.ndarray, d: Deformations | None, beads: np.ndarray
) -> np.ndarray:
    """Add the beads' amplitude contrast to ``contrast (M, H, W)`` in place; returns the mask of pixels at
    least 2 px away from every bead's image."""
    shape = _view_shape(settings, d)
    radius = settings.bead_diameter_A / settings.pixel_size_A / 2
    per_voxel = settings.bead_contrast / (2 * radius)
    clear = np.ones(contrast.shape, dtype=bool)
    coords = _ideal_coords(d, len(angles), shape)
    for m in range(len(angles)):
        theta = math.radians(float(angles[m]))
        contrast[m] += per_voxel * _bead_chords(coords[m], beads, radius, theta).numpy()
        clear[m] = _bead_chords(coords[m], beads, radius + 2, theta).numpy() == 0
    return clear


def _levels(settings: CryoAcquisition, angles: np.ndarray, ice_A: float, rng: np.random.Generator) -> np.ndarray:
    """Relative zero-loss levels ``(M,)``: Beer-Lambert losses relative to 0 degrees, times beam fluctuations."""
    path = ice_A * (1 / np.cos(np.radians(angles)) - 1)
    return np.exp(-path / settings.mean_free_path_A) * (1 + settings.level_jitter * rng.standard_normal(len(angles)))


def _level_0(settings: CryoAcquisition, relative: np.ndarray, contrast: np.ndarray, clear: np.ndarray) -> float:
    """Counts at 0 degrees: ``level_counts``, or the level at which counting noise gives ``snr_db``."""
    if settings.snr_db is None:
        return settings.level_counts
    signal = noise = 0.0
    for m in range(len(relative)):
        c = contrast[m][clear[m]]
        signal += relative[m] ** 2 * float(np.sum((c - c.mean()) ** 2))
        noise += relative[m] * c.size
    return 10 ** (settings.snr_db / 10) * noise / signal


def _record(expected: np.ndarray, noise: str, rng: np.random.Generator) -> np.ndarray:
    """Counts of expected values ``expected`` (clipped at 0): Poisson draws, or Gaussian with their variance."""
    expected = np.clip(expected, 0, None)
    if noise == "poisson":
        return rng.poisson(expected).astype(np.float32)
    return (expected + rng.standard_normal(expected.shape) * np.sqrt(expected)).astype(np.float32)


def _snr_db(expected: np.ndarray, recorded: np.ndarray, clear: np.ndarray) -> float:
    """Contrast SNR of one noise draw away from beads: per-view zero-mean expected counts over the noise."""
    signal = noise = 0.0
    for m in range(expected.shape[0]):
        e = expected[m][clear[m]]
        signal += float(np.sum((e - e.mean()) ** 2))
        noise += float(np.sum((recorded[m][clear[m]] - e) ** 2))
    return 10 * math.log10(signal / noise)


def simulate_cryo(
    specimen: np.ndarray,
    settings: CryoAcquisition = CryoAcquisition(),
    seed: int = 0,
    on_view: Callable[[str, int], None] | None = None,
) -> CryoSeries:
    """Record a tilt series of ``specimen (nz, ny, nx)`` (density, voxels of ``settings.pixel_size_A``).

    The specimen must span :func:`cryo_box_shape` laterally; its slab of ``nz`` slices is the ice (Beer-Lambert
    thickness). One generator seeded by ``seed`` draws everything. ``on_view(stage, i)`` reports progress
    (``stage``: ``"deformed"`` or ``"undeformed"``). See the module docstring for the model.
    """
    volume = torch.as_tensor(np.asarray(specimen, dtype=np.float32))
    if volume.dim() != 3 or not bool(volume.any()):
        raise IcetideError(f"the specimen must be a non-zero 3-D volume, got shape {tuple(volume.shape)}")
    nz, ny, nx = volume.shape
    need = cryo_box_shape(settings, nz)
    if ny < need[0] or nx < need[1]:
        raise IcetideError(
            f"the specimen ({ny} x {nx} voxels) is narrower than the {need[0]} x {need[1]} that every ray to a "
            f"{settings.field_of_view[0]} x {settings.field_of_view[1]} field of view crosses; give a wider one "
            "or a smaller field of view"
        )
    rng = np.random.default_rng(seed)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    angles = settings.tilt_angles_deg()
    deformations = cryo_deformations(settings, angles, rng)
    order = dose_symmetric_order(angles)
    optics = settings.optics()
    defocus = 1e4 * (settings.defocus_um + rng.uniform(-settings.defocus_spread_um, settings.defocus_spread_um,
                                                       len(angles)))
    measured = defocus + 1e4 * settings.defocus_error_um * rng.standard_normal(len(angles))
    pre_exposure = optics_pre_exposure(optics, angles)
    if pre_exposure is None:
        pre_exposure = np.zeros(len(angles))
    pad = int(round(abs(settings.z_offset_A) / settings.pixel_size_A))
    z_offset_vox = float(pad if settings.z_offset_A >= 0 else -pad)
    z_pad = (2 * pad, 0) if z_offset_vox >= 0 else (0, 2 * pad)
    beads = _bead_centres(settings, nz, z_offset_vox, rng)
    timings["setup"] = time.perf_counter() - start

    def progress(stage: str) -> Callable[[int], None] | None:
        return None if on_view is None else (lambda i: on_view(stage, i))

    relative = _levels(settings, angles, nz * settings.pixel_size_A, rng)
    contrast, clear = {}, {}
    for name, d in (("undeformed", None), ("deformed", deformations)):
        start = time.perf_counter()
        contrast[name] = _specimen_images(volume, z_pad, settings, angles, d, defocus, pre_exposure, progress(name))
        timings[f"project_{name}"] = time.perf_counter() - start
    # The undeformed view nearest 0 degrees, as recorded, fixes the scale from density to relative contrast.
    scale = settings.specimen_contrast / max(float(contrast["undeformed"][int(np.argmin(np.abs(angles)))].std()), 1e-30)
    for name, d in (("undeformed", None), ("deformed", deformations)):
        contrast[name] *= scale
        clear[name] = _add_beads(contrast[name], settings, angles, d, beads)
    level_0 = _level_0(settings, relative, contrast["deformed"], clear["deformed"])
    levels = level_0 * relative
    recorded = {}
    expected = {}
    for name in ("deformed", "undeformed"):
        expected[name] = levels[:, None, None] * (1 - contrast[name])
        recorded[name] = _record(expected[name], settings.noise, rng)
    fy, fx = settings.frame_shape()
    cy, cx = (ny - fy) // 2, (nx - fx) // 2
    truth = np.ascontiguousarray(volume.numpy()[:, cy : cy + fy, cx : cx + fx])
    return CryoSeries(
        counts=recorded["deformed"],
        counts_undeformed=recorded["undeformed"],
        levels=levels,
        truth=truth,
        z_offset_vox=z_offset_vox,
        bead_centres_vox=beads,
        bead_radius_vox=settings.bead_diameter_A / settings.pixel_size_A / 2,
        tilt_angles_deg=angles,
        deformations=deformations,
        defocus_A=defocus,
        defocus_measured_A=measured,
        pre_exposure_e_per_A2=pre_exposure,
        acquisition_order=order,
        level_0_counts=float(level_0),
        snr_db_measured=_snr_db(expected["deformed"], recorded["deformed"], clear["deformed"]),
        settings=settings,
        seed=int(seed),
        timings_s=timings,
    )


def cryo_specimen(settings: CryoAcquisition, seed: int = 0, proteins_dir=None) -> np.ndarray:
    """A crowded-cell specimen (:func:`icetide.simulate.crowded_phantom`) ``specimen_thickness_A`` thick and as wide as
    :func:`cryo_box_shape` asks, float32 ``(nz, ny, nx)``; proteins from the maps in ``proteins_dir`` (None:
    Gaussian blobs)."""
    from .phantom import crowded_phantom

    nz = max(8, int(round(settings.specimen_thickness_A / settings.pixel_size_A)))
    return crowded_phantom((nz, *cryo_box_shape(settings, nz)), seed, proteins_dir, settings.pixel_size_A)


def write_cryo(folder, sim: CryoSeries, stem: str = "tilt_series") -> dict:
    """Write ``sim`` as a microscope and a CTF program would, plus its truth, into ``folder`` (which must exist).

    ``<stem>.mrc`` (counts), ``<stem>.mrc.mdoc`` (SerialEM: angles, pixel size, the nominal tilt axis, doses in
    acquisition order, the nominal defocus), ``<stem>.tlt``, ``<stem>.defocus`` (IMOD ctfplotter format: the
    estimated defocus, with its error); ``truth/volume.mrc`` (the specimen without beads over the field's
    footprint), ``truth/deformations.json``, ``truth/counts_undeformed.mrc``. Returns the truth's description
    for ``simulation.json``.
    """
    from pathlib import Path

    from ..io import write_deformations, write_imod_defocus, write_mdoc, write_mrc, write_tlt

    folder = Path(folder)
    s = sim.settings
    px = s.pixel_size_A
    write_mrc(folder / f"{stem}.mrc", sim.counts, px, stack=True)
    m = len(sim.tilt_angles_deg)
    write_mdoc(folder / f"{stem}.mrc.mdoc", sim.tilt_angles_deg, px, f"{stem}.mrc", s.field_of_view[::-1],
               sim.nominal_tilt_axis_deg, np.full(m, s.dose_per_tilt_e_per_A2), sim.acquisition_order,
               np.full(m, s.defocus_um), s.microscope.voltage_kV)
    write_tlt(folder / f"{stem}.tlt", sim.tilt_angles_deg)
    write_imod_defocus(folder / f"{stem}.defocus", sim.tilt_angles_deg, sim.defocus_measured_A)
    (folder / "truth").mkdir(exist_ok=True)
    write_mrc(folder / "truth" / "volume.mrc", sim.truth, px)
    write_deformations(folder / "truth" / "deformations.json", sim.deformations)
    write_mrc(folder / "truth" / "counts_undeformed.mrc", sim.counts_undeformed, px, stack=True)
    return {
        "specimen_centre_z_vox": sim.z_offset_vox,
        "bead_centres_xyz_vox": sim.bead_centres_vox,
        "bead_radius_vox": sim.bead_radius_vox,
        "tilt_axis_deg": s.tilt_axis_deg,
        "mdoc_tilt_axis_deg": sim.nominal_tilt_axis_deg,
        "defocus_A": sim.defocus_A,
        "defocus_file_A": sim.defocus_measured_A,
        "pre_exposure_e_per_A2": sim.pre_exposure_e_per_A2,
        "acquisition_order": sim.acquisition_order,
        "levels_counts": sim.levels,
        "level_0_counts": sim.level_0_counts,
        "snr_db_measured": sim.snr_db_measured,
        "frames": "tilt-axis frame of docs/CONVENTIONS.md; the truth volume's centre lies specimen_centre_z_vox "
        "above the tilt axis",
    }
