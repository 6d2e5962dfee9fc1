"""Every knob of a reconstruction in one validated model (pydantic), saved as ``config.yaml`` beside outputs.

The structure follows the paper (Debarnot et al. 2024, section III and its public code): Adam with separate
learning rates for the volume (1e-2, as the paper), shifts, rotations and local fields; a volume-only warm-up;
step decay of every learning rate; the eq. 7 penalties. The paper runs 1000 epochs of 1500 random pixels per
tilt on 512 x 512 x 180 volumes. Here an *epoch* is one pass over every tilt, by default in one Adam step
(the lattice renderer predicts every pixel of up to ``tilts_per_step`` tilts from one field evaluation), and
the run ends by early stopping on held-out pixels, by ``epochs`` or by ``max_minutes``. The deformation
learning rates are in pixels and degrees (Adam moves a parameter by about its learning rate per step), and
the numbers below were chosen by measurement on the benchmark of ``benchmarks/quality.py`` (docs/BENCHMARKS.md):
local fields are released ``local_delay_epochs`` after shifts and rotations, because released together they
absorb the early misalignment of a still-blurred volume and do not recover.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import IcetideError

__all__ = [
    "VolumeSettings", "DeformSettings", "FitSettings", "FIT_GROUPS", "CtfSettings", "IntensitySettings",
    "ReconstructConfig", "Polarity", "load_config", "parse_config", "save_config",
]

# The density polarities of the written volumes and aligned stacks (icetide.intensity.output_polarity).
Polarity = Literal["bright", "input"]


# The high-pass of images recorded on a level when none is set (IntensitySettings.highpass_A); chosen on
# EMPIAR-10499 against finer and coarser ones (docs/REAL_DATA.md).
AUTO_HIGHPASS_A = 300.0


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class VolumeSettings(_Strict):
    """Hash-grid encoding and MLP of the implicit volume (Instant-NGP style).

    The defaults suit CPU problems of about 128 x 128 x 48 voxels: 8 levels from 8 to 8 * 1.5**7 = 137 cells
    along the longest axis, so the finest level resolves about one voxel; 2 features per level; 2**19 rows per
    level, so that every level but the finest is dense; MLP 2 x 32 (docs/BENCHMARKS.md "Implicit volume
    throughput"). :meth:`paper` is the paper's configuration.
    """

    n_levels: int = Field(8, ge=1, le=32)
    n_features: int = Field(2, ge=1, le=16)
    log2_table_size: int = Field(19, ge=8, le=26)
    base_resolution: float = Field(8.0, gt=0)
    per_level_scale: float = Field(1.5, gt=1.0, le=4.0)
    interpolation: Literal["linear", "smoothstep"] = "linear"
    hidden: int = Field(32, ge=4, le=512)
    n_hidden_layers: int = Field(2, ge=1, le=8)

    def encoding_args(self) -> dict:
        """The keyword arguments of a hash encoding (:class:`icetide.volume.HashEncoding` or its reference)."""
        return self.model_dump(include={"n_levels", "n_features", "log2_table_size", "base_resolution",
                                        "per_level_scale", "interpolation"})

    @classmethod
    def paper(cls) -> "VolumeSettings":
        """ICE-TIDE's configuration: 8 levels x 4 features, 2**22 rows, base 8, scale 2, MLP 3 x 64."""
        return cls(n_levels=8, n_features=4, log2_table_size=22, base_resolution=8.0, per_level_scale=2.0,
                   hidden=64, n_hidden_layers=3)


class DeformSettings(_Strict):
    """Which deformations are estimated, their local grid and the penalty weights (paper eq. 7)."""

    shifts: bool = True
    rotations: bool = True
    axis_offset: bool = Field(
        False, description="estimate one in-plane rotation common to all tilts (refines the tilt-axis angle); "
        "unlike the per-tilt rotations it is not penalised. Off by default: with a well-set axis it only adds "
        "noise (docs/BENCHMARKS.md)",
    )
    local: bool = True
    gain: bool = Field(
        False, description="estimate one intensity gain per tilt (exposure or detector drift across the series); "
        "the gains have geometric mean 1, the volume carries the overall scale",
    )
    offset: Literal["none", "common", "per_tilt"] = Field(
        "none", description="additive intensity level of the predicted images: none (the images hold the "
        "projections alone; raw images are made zero-mean first, see intensity.levels), common (one for the whole "
        "series, a detector or vacuum level) or per_tilt (one per tilt; compared in docs/BENCHMARKS.md \"Raw-data defaults\")",
    )

    @field_validator("offset", mode="before")
    @classmethod
    def _offset_from_bool(cls, value):
        # Configs written before the per-tilt offset said true / false.
        return {True: "common", False: "none"}.get(value, value) if isinstance(value, bool) else value
    prealign: bool = Field(
        True, description="start the shifts from a coarse cross-correlation alignment (tiltxcorr-like) when no "
        "starting alignment is given",
    )
    projection_matching: int = Field(
        0, ge=0, le=100, description="rounds of projection matching after the coarse alignment (each view "
        "correlated with the reprojection of an FBP of the other half of the views, over twice the thickness; "
        "icetide.prealign.refine_by_projection_matching); 0 = off. Off by default: it lowered the real "
        "EMPIAR-10499 result (docs/BENCHMARKS.md \"Projection matching\")",
    )
    axis_search_deg: float = Field(
        4.0, ge=0, le=45, description="before the fit, search the tilt axis' direction within +- this many degrees "
        "of tilt_axis_angle_deg (see axis_search) and start from the estimate; 0 = off. Not used with a starting "
        "alignment (it holds the axis)",
    )
    axis_search: Literal["sharpness", "profiles"] = Field(
        "sharpness", description="the measure of the tilt-axis search: sharpness, the densest features (gold "
        "beads) of the FBP after a coarse alignment at each candidate (icetide.prealign."
        "estimate_tilt_axis_by_sharpness; needs features that stand out), or profiles, the consistency of the "
        "images' profiles along the axis (icetide.prealign.estimate_tilt_axis; common lines; needs the specimen "
        "inside the field of view across the axis, as a needle or an isolated cell)",
    )
    axis_refine_deg: float = Field(
        2.0, ge=0, le=10, description="after a fit that searched or was given the axis (no starting alignment), "
        "refine the tilt axis by the sharpness of the FBP with the fitted shifts (icetide.start.refine_tilt_axis): "
        "its lateral position (a shift across it common to every view, within 8 % of the width) and its "
        "direction within +- this many degrees of the fitted one; when either moves (by 1 pixel of the search's "
        "binning, or 0.25 degrees), fit again from the fitted alignment so corrected; 0 = off",
    )
    bead_refinement: bool = Field(
        True, description="after a fit that searched or was given the axis (no starting alignment), follow the "
        "gold beads through the aligned views and solve the tilt axis' direction and the per-view shifts that make "
        "them consistent (icetide.start.refine_by_beads); when at least 4 beads are followed, their residual ends "
        "under 20 A (a pixel of the search's aim) and the shifts move by 10 A RMS or the axis turns by 0.05 "
        "degrees or more (a turn that both halves of the beads agree on, 6 beads at least, and at least three "
        "standard errors), fit again from the alignment so corrected (with the tilt-axis refinement's); "
        "report.json gives the final alignment's bead residual either way",
    )
    bead_diameter_nm: float = Field(
        10.0, gt=0, description="diameter of the gold fiducials in nm (as IMOD's etomo asks for it): with the "
        "pixel size, how far apart two maxima of the FBP must lie to be two beads (a bead many pixels wide peaks "
        "on its rim)",
    )
    local_grid: tuple[int, int] = (10, 10)
    local_interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    local_border_fixed: bool = Field(
        True,
        description="keep the border ring of control points at its start (zero): fixes the split between "
        "the shift/rotation and the local field, which the data cannot tell apart",
    )
    penalty_rotation: float = Field(0.1, ge=0, description="l1, on |alpha| in radians")
    penalty_shift: float = Field(1e-4, ge=0, description="l2, on ||tau|| in pixels")
    penalty_local: float = Field(1e-2, ge=0, description="l3, on the RMS of phi in pixels")
    penalty_smooth: float = Field(
        0.0, ge=0, description="random-walk prior on the shifts along the tilt-angle order (the acquisition order "
        "of a continuous or one-directional scheme): weight of the mean squared difference of consecutive "
        "tilts' shifts, px^2; 0 = off (paper Remark II.2)",
    )


class FitSettings(_Strict):
    """The optimisation, its settings grouped by concern (``FIT_GROUPS``): the model and its data term, the
    schedule, the learning rates, validation and stopping, and execution (device, memory, kernels, checkpoints)."""

    # the model and its data term
    renderer: Literal["lattice", "rays"] = "lattice"
    rays_per_tilt: int = Field(1500, ge=1, description="rays renderer: random pixels per tilt per epoch")
    samples_per_voxel: float = Field(1.0, gt=0, description="rays renderer: samples per voxel along each ray")
    loss: Literal["l1", "l2", "poisson"] = Field(
        "l1", description="data term per pixel: l1 |pred - obs| (the paper's), l2 (pred - obs)^2, or poisson, the "
        "Poisson deviance mu - obs - obs log(mu / obs), mu = softplus(10 pred) / 10, for counting data "
        "(non-negative images in counts, e.g. electron counts)",
    )
    tilt_weighting: Literal["none", "cos"] = Field(
        "none", description="weight of each tilt's pixels in the loss: none, or cos(tilt) (the high tilts see a "
        "longer path through the specimen and carry less signal per pixel); weights have mean 1",
    )
    half_maps: Literal["none", "tilts", "pixels", "series"] = Field(
        "none", description="fit two volumes on disjoint halves of the data, the deformations on all of it: "
        "tilts (alternate tilts in angle order), pixels (a random half of every image) or series (two half series "
        "of the same acquisition, e.g. odd and even frame sums; reconstruct --half-series); the half tomograms "
        "give a resolution estimate without ground truth (FSC 0.143), the tomogram is their mean",
    )
    # the schedule
    epochs: int = Field(500, ge=1, description="at most this many epochs; early stopping usually ends sooner")
    max_minutes: Optional[float] = Field(None, gt=0)
    warmup_epochs: int = Field(5, ge=0, description="volume-only epochs before deformations are released")
    local_delay_epochs: int = Field(
        40, ge=0, description="further epochs before the local fields are released (shifts and rotations first)"
    )
    binned_epochs: Optional[int] = Field(
        None, ge=0, description="coarse-to-fine sampling: fit the first this many epochs to the series binned by 2, "
        "predicted from the field on every other voxel (8 times fewer field evaluations, 4 times fewer pixels; "
        "lattice renderer, not with half_maps: pixels or the CTF forward model). They are validated on the binned "
        "held-out pixels: after patience validations without improvement the stage ends early and the fit goes "
        "on unbinned from its best state; early stopping and the best state of the fit start after them. None "
        "(auto): 80 where binning applies, never more than half of epochs; else 0",
    )
    binned_bands: int = Field(
        2, ge=1, description="the binned epochs cut their rows into at least this many bands, one Adam step each: "
        "more steps for the same field evaluations (2 against 1, 3 and 4 in docs/BENCHMARKS.md)",
    )
    coarse_to_fine_epochs: Optional[int] = Field(
        None, ge=0, description="release the encoding's levels from coarse to fine over this many epochs (BARF-style: "
        "level l enters with weight (1 - cos(pi clamp(a - l, 0, 1))) / 2, a = 1 + (L - 1) epoch / this); 0 = every "
        "level from the start; None (auto): over the binned epochs planned (see binned_epochs; 0 where none are)",
    )
    # learning rates
    lr_volume: float = Field(1e-2, gt=0)
    lr_shift_px: float = Field(0.3, ge=0, description="Adam step for shifts, pixels")
    lr_rotation_deg: float = Field(0.005, ge=0, description="Adam step for in-plane rotations, degrees")
    lr_local_px: float = Field(0.05, ge=0, description="Adam step for local control points, pixels")
    lr_axis_deg: float = Field(0.05, ge=0, description="Adam step for the common tilt-axis offset, degrees")
    lr_gain: float = Field(0.005, ge=0, description="Adam step for the per-tilt log gains")
    lr_offset: float = Field(0.1, ge=0, description="Adam step for the intensity offset, in units of the data's spread")
    lr_decay_every: int = Field(60, ge=1, description="halve every learning rate every this many epochs")
    lr_decay_factor: float = Field(0.5, gt=0, le=1)
    # validation and stopping
    validation_fraction: float = Field(0.05, ge=0, lt=0.5)
    validation: Literal["steps", "pass"] = Field(
        "steps", description="how the held-out pixels are scored: steps (lattice renderer), from the training "
        "steps' own predictions, which render them anyway (each before its step's update, with its sub-voxel "
        "jitter; no extra cost); pass, by a separate pass after the epoch (the rays renderer always does)",
    )
    validate_every: int = Field(1, ge=1, description="epochs between validations")
    patience: int = Field(
        10, ge=1, description="validations without improvement before stopping, counted once every deformation is "
        "released (after warmup_epochs and, with local fields, local_delay_epochs)",
    )
    max_rollbacks: int = Field(
        5,
        ge=0,
        description="epochs with a non-finite step the fit recovers from (the epoch rolled back, every learning "
        "rate halved); the next one ends it",
    )
    # execution
    device: str = "auto"
    seed: int = 0
    tilts_per_step: int = Field(64, ge=1, description="tilts per Adam step (lattice: one field evaluation each)")
    lattice_rows: Optional[int] = Field(
        None, ge=4, description="rows per lattice band; None = all rows up to 8 M voxels per step, fewer when "
        "the memory available holds less (docs/BENCHMARKS.md \"Memory: batches sized to what is available\")",
    )
    max_memory_gb: Optional[float] = Field(
        None, gt=0, description="memory a fit may plan for (CPU RAM or GPU memory), GiB (2**30 bytes); None = 70% of "
        "what is available at the start. Lattice bands and ray batches are sized to fit; an out-of-memory error "
        "still shrinks them and retries the step",
    )
    kernel: Literal["auto", "triton", "numba", "torch"] = Field(
        "auto", description="hash encoding: fused kernels, Triton on CUDA (auto: when Triton is installed, as "
        "with CUDA builds of PyTorch) and Numba on the CPU (auto: when Numba imports), or the PyTorch path "
        "(torch)",
    )
    precision: Literal["fp32", "mixed"] = Field(
        "fp32", description="on CUDA, mixed: the encoding table read in fp16 and the MLP run in bf16 (autocast), "
        "with fp32 parameters, gradients and densities; ignored on CPU",
    )
    recompute_field: bool = Field(
        False, description="lattice renderer: evaluate each band of the field in pieces whose activations the "
        "backward pass recomputes instead of keeping: the least memory for "
        "a longer epoch; smaller bands (max_memory_gb) cost less time for the same memory (docs/BENCHMARKS.md "
        "\"Memory and time at the paper's scale\")",
    )
    checkpoint_minutes: float = Field(5.0, gt=0)

# The fit's settings by concern, in the order of FitSettings (docs/CONFIGURATION.md shows them so).
FIT_GROUPS: dict[str, tuple[str, ...]] = {
    "the model and its data term": (
        "renderer", "rays_per_tilt", "samples_per_voxel", "loss", "tilt_weighting", "half_maps"),
    "the schedule": (
        "epochs", "max_minutes", "warmup_epochs", "local_delay_epochs", "binned_epochs", "binned_bands",
        "coarse_to_fine_epochs"),
    "learning rates": (
        "lr_volume", "lr_shift_px", "lr_rotation_deg", "lr_local_px", "lr_axis_deg", "lr_gain", "lr_offset",
        "lr_decay_every", "lr_decay_factor"),
    "validation and stopping": ("validation_fraction", "validation", "validate_every", "patience", "max_rollbacks"),
    "execution": (
        "device", "seed", "tilts_per_step", "lattice_rows", "max_memory_gb", "kernel", "precision",
        "recompute_field", "checkpoint_minutes"),
}


class CtfSettings(_Strict):
    """Optics, and the CTF and exposure corrections applied to the series before the fit (docs/CONVENTIONS.md
    "CTF"). The corrections need the per-tilt defocus (``reconstruct --defocus``) or pre-exposure
    (``--pre-exposure``); without them nothing is corrected. The optics also go into RELION's tomograms.star."""

    voltage_kV: float = Field(300.0, gt=0)
    spherical_aberration_mm: float = Field(2.7, ge=0)
    amplitude_contrast: float = Field(0.07, ge=0, lt=1)
    correction: Literal["phaseflip", "model", "none"] = Field(
        "phaseflip", description="with a known defocus: phaseflip (multiply every frequency by the sign of the "
        "CTF at the defocus of each pixel, which varies across a tilted image), model (fit the raw images with "
        "the CTF in the forward model: each predicted image is filtered by its tilt's CTF; lattice renderer, "
        "whole images per step, one process; the aligned stack and the FBP are still phase-flipped) or none",
    )
    defocus_hand: Literal[1, -1] = Field(
        1, description="+1: at a positive tilt the image's -X side (left of the tilt axis) is further underfocus; "
        "-1: the other way (flip it when the microscope's or the software's tilt sign is the opposite)",
    )
    phase_tolerance_deg: float = Field(
        22.5, gt=0, le=90, description="phase flipping: defocus spacing of the filtered images the pixels "
        "interpolate between, as the CTF phase change at Nyquist (IMOD's strips have a defocus tolerance instead)",
    )
    exposure_weighting: bool = Field(
        False, description="with a known pre-exposure per tilt: weight each tilt's spectrum by exp(-N/(2 Ne(k))) "
        "(Grant & Grigorieff's critical exposure Ne), fading what radiation damage has already faded",
    )

    def microscope(self):
        """These optics as a :class:`icetide.ctf.Microscope`."""
        from .ctf import Microscope

        return Microscope(self.voltage_kV, self.spherical_aberration_mm, self.amplitude_contrast)


class IntensitySettings(_Strict):
    """How the recorded images become the contrast the model explains (:mod:`icetide.intensity`); the outputs
    (the aligned stack, the FBP) keep the input's intensities."""

    levels: Literal["auto", "per_tilt", "none"] = Field(
        "auto", description="divide each image by its mean level after subtracting it (relative contrast): "
        "per_tilt, none, or auto (when every image sits on a level far from zero, as raw counts do)",
    )
    highpass_A: Optional[float] = Field(
        None, ge=0, description="remove image features broader than this (Gaussian sigma, Angstrom; pixels of 10 A "
        "when the pixel size is unknown) before the fit: the illumination profile and thickness gradients of "
        "recorded images are fixed to the detector, not to the specimen, and otherwise pull the deformations; "
        "0 = off; None (auto): 300 A for images recorded on a level (raw counts, see levels), off for zero-mean "
        "images (simulated or already prepared: set it for prepared images of a real microscope)",
    )

    def highpass_px(self, pixel_size_A: float | None, on_level: bool) -> float:
        """The high-pass sigma in pixels of a series of ``pixel_size_A`` (None: 10 A) whose images are
        (``on_level``) or are not recorded on a level."""
        sigma_A = self.highpass_A if self.highpass_A is not None else (AUTO_HIGHPASS_A if on_level else 0.0)
        return sigma_A / (pixel_size_A or 10.0)


class ReconstructConfig(_Strict):
    """A whole reconstruction: geometry plus the three groups above."""

    bin: int = Field(
        1, ge=1, le=64, description="fit the series binned by this factor (block averages, as IMOD's newstack -bin); "
        "thickness, tomograms, the aligned stack and the FBP are at the binned sampling, the alignment files "
        "(deformations.json, .xf, .star) in the input stack's pixels",
    )
    thickness: Optional[int] = Field(
        None, ge=1, description="voxels along z at the fit's sampling (see bin); None = half the smaller detector side"
    )
    pixel_size_A: Optional[float] = Field(None, gt=0)
    tilt_axis_angle_deg: float = 0.0
    specimen: Literal["box", "slab"] = Field(
        "box", description="box: no density outside the detector's field of view (an isolated specimen); slab: "
        "the specimen extends sideways beyond it (a lamella, an ice film), so the volume is modelled over the "
        "whole width that the rays of the highest tilt cross and the tomogram is its central part (costs "
        "about 1/cos(max tilt) + thickness/width * tan(max tilt) times more voxels)",
    )
    polarity: Polarity = Field(
        "bright", description="density polarity of the volumes and the aligned stack written: bright (dense = "
        "bright, positive) or input (as in the input images: dense = dark when they were inverted with --invert); "
        "each volume's MRC header label states it (docs/CONVENTIONS.md \"Intensity units\")",
    )
    volume: VolumeSettings = VolumeSettings()
    deform: DeformSettings = DeformSettings()
    fit: FitSettings = FitSettings()
    ctf: CtfSettings = CtfSettings()
    intensity: IntensitySettings = IntensitySettings()


def load_config(path: str | os.PathLike) -> ReconstructConfig:
    """Read a YAML config (any subset of the keys); unknown keys and bad values raise one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise IcetideError(f"{path}: no such file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise IcetideError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise IcetideError(f"{path}: expected a mapping of settings")
    return parse_config(data, str(path))


def parse_config(data: dict, source: str = "config", names: dict[str, str] | None = None) -> ReconstructConfig:
    """Validate a settings mapping; the first problem becomes a one-line ``IcetideError``, the setting named as
    ``names`` (dotted setting -> e.g. its command-line option) has it, else as ``source: dotted.setting``."""
    try:
        return ReconstructConfig.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        if names and where in names:
            raise IcetideError(f"{names[where]}: {err['msg']}") from None
        raise IcetideError(f"{source}: {where}: {err['msg']}") from None


def save_config(path: str | os.PathLike, config: ReconstructConfig) -> None:
    """Write every setting (defaults included) as YAML, atomically."""
    from .io.util import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
