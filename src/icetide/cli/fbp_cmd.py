"""``icetide fbp``: classical reconstruction (FBP or SIRT) of a tilt series, optionally aligned first."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Callable, Optional

import numpy as np
import torch
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..config import ReconstructConfig
from ..data import TiltSeries
from ..deform import Deformations
from ..errors import IcetideError
from ..inputs import load_inputs
from ..runlog import run_log
from .common import check_alignment_options, console, held_warnings, log, one_line_errors, say
from .reconstruct_cmd import build_config, option_flags
from .reconstruct_options import AnglesOption, DeviceOption, InvertOption, MdocOption, PixelSizeOption

METHODS = ("fbp", "sirt")
DEFAULT_ITERATIONS = 30
# SIRT iterations between the progress lines of the run log.
LOG_EVERY_ITERATIONS = 10

# The options of fbp; those that mean what reconstruct's do (--angles, --mdoc, --pixel-size, --invert, --device)
# are reconstruct's (reconstruct_options.py).
TiltSeriesArg = Annotated[Path, typer.Argument(help="Tilt series, MRC stack (n_tilts, ny, nx), any MRC mode.")]
ExcludeOption = Annotated[Optional[str], typer.Option(
    help="Views of the stack to leave out, 0-based, with ranges (e.g. 0-2,40); alignment files still list every "
        "view of the stack.")]
OutOption = Annotated[Path, typer.Option(
    "--out", "-o",
    help="Output volume, MRC (thickness, ny, nx; nx, ny when the tilt axis lies nearer the image X axis).")]
ThicknessOption = Annotated[Optional[int], typer.Option(
    help="Slab thickness in voxels of the output (at the --bin sampling). Default: half the smaller detector side "
        "(at least 8).")]
BinOption = Annotated[Optional[int], typer.Option(
    "--bin", help="Reconstruct the stack binned by N (N x N block averages); alignment files are in the input "
        "stack's pixels and are scaled to the binned one. Default 1.")]
MethodOption = Annotated[str, typer.Option(help="fbp (filtered backprojection) or sirt.")]
IterationsOption = Annotated[Optional[int], typer.Option(help=f"SIRT iterations. Default {DEFAULT_ITERATIONS}.")]
FilterOption = Annotated[Optional[str], typer.Option(
    "--filter", help="FBP filter: ramp (default), hann or shepp-logan (apodised ramps, smoother).")]
DeformationsOption = Annotated[Optional[Path], typer.Option(
    help="deformations.json to undo first (e.g. the estimate of icetide reconstruct).")]
XfOption = Annotated[Optional[Path], typer.Option(
    "--xf", help="IMOD .xf alignment to undo first (shifts and in-plane rotations; scaling is dropped).")]
AlnOption = Annotated[Optional[Path], typer.Option(
    "--aln", help="AreTomo .aln alignment to undo first (global shifts and rotations; rows matched by tilt).")]
TiltAxisAngleOption = Annotated[Optional[float], typer.Option(
    help="Unaligned data only: tilt-axis direction on the images, degrees counter-clockwise from the image Y axis; "
        "the images are rotated to a vertical axis first. Default: the .mdoc's, else 0.")]
DefocusOption = Annotated[Optional[Path], typer.Option(
    help="Phase-flip first with this per-view defocus (CTFFIND4 .txt, IMOD .defocus, RELION-5 .star or SerialEM "
        ".mdoc), as reconstruct does; needs the pixel size.")]
DefocusHandOption = Annotated[Optional[int], typer.Option(
    help="With --defocus: 1 (default) or -1 (docs/CONVENTIONS.md).")]
PreExposureOption = Annotated[Optional[Path], typer.Option(
    help="Exposure-weight first with this exposure before each view (.mdoc, RELION-5 .star or one number per line, "
        "e/A^2).")]
VoltageOption = Annotated[Optional[float], typer.Option(
    help="With --defocus/--pre-exposure: acceleration voltage, kV. Default 300.")]
CsOption = Annotated[Optional[float], typer.Option(help="With --defocus: spherical aberration, mm. Default 2.7.")]
AmplitudeContrastOption = Annotated[Optional[float], typer.Option(
    help="With --defocus: amplitude contrast. Default 0.07.")]
PositivityOption = Annotated[bool, typer.Option(
    "--positivity", help="SIRT: clamp negative densities to 0 each iteration.")]
PolarityOption = Annotated[Optional[str], typer.Option(
    help="Density polarity of the volume: bright (default: dense = bright, positive) or input (as in the input "
        "images: dense = dark with --invert). The MRC header label states it.")]
ForceFileOption = Annotated[bool, typer.Option("--force", help="Overwrite an existing output file.")]

# The options that are settings of reconstruct too (dotted setting -> option): its schema checks their values.
SETTING_OPTIONS = {
    "thickness": "thickness", "bin": "bin", "pixel_size_A": "pixel_size", "polarity": "polarity",
    "ctf.defocus_hand": "defocus_hand", "ctf.voltage_kV": "voltage", "ctf.spherical_aberration_mm": "cs",
    "ctf.amplitude_contrast": "amplitude_contrast",
}


@dataclass
class FbpOptions:
    """Every option of ``icetide fbp`` as given (``None``: not given)."""

    tilt_series: Path
    out: Path
    angles: Optional[Path] = None
    mdoc: Optional[Path] = None
    exclude: Optional[str] = None
    thickness: Optional[int] = None
    bin: Optional[int] = None
    method: str = "fbp"
    iterations: Optional[int] = None
    filter_name: Optional[str] = None
    deformations: Optional[Path] = None
    xf: Optional[Path] = None
    aln: Optional[Path] = None
    tilt_axis_angle: Optional[float] = None
    pixel_size: Optional[float] = None
    defocus: Optional[Path] = None
    defocus_hand: Optional[int] = None
    pre_exposure: Optional[Path] = None
    voltage: Optional[float] = None
    cs: Optional[float] = None
    amplitude_contrast: Optional[float] = None
    positivity: bool = False
    invert: bool = False
    polarity: Optional[str] = None
    device: Optional[str] = None
    force: bool = False


def check_output_file(path: Path, force: bool) -> None:
    """Refuse an existing output file (unless ``force``), a folder, or a missing parent folder."""
    if path.is_dir():
        raise IcetideError(f"{path}: is a folder, expected an output file name")
    if path.exists() and not force:
        raise IcetideError(f"{path}: exists (use --force to overwrite)")
    if not path.parent.is_dir():
        raise IcetideError(f"{path.parent}: no such folder")


def check_options(o: FbpOptions) -> None:
    """Reject option combinations that do not make sense, before reading any data (the values that are settings
    of reconstruct too are its schema's to check: :func:`settings`)."""
    from ..classical import FILTERS

    if o.method not in METHODS:
        raise IcetideError(f"--method must be fbp or sirt, got {o.method!r}")
    if o.method == "fbp" and (o.iterations is not None or o.positivity):
        raise IcetideError("--iterations and --positivity apply to --method sirt only")
    if o.method == "sirt" and o.filter_name is not None:
        raise IcetideError("--filter applies to --method fbp only")
    if o.filter_name is not None and o.filter_name not in FILTERS:
        raise IcetideError(f"--filter must be one of {', '.join(FILTERS)}, got {o.filter_name!r}")
    if o.iterations is not None and o.iterations < 1:
        raise IcetideError(f"--iterations must be at least 1, got {o.iterations}")
    check_alignment_options(o.deformations, o.xf, o.aln)
    if o.tilt_axis_angle is not None and (o.deformations is not None or o.xf is not None or o.aln is not None):
        raise IcetideError(
            "--tilt-axis-angle cannot be combined with --deformations/--xf/--aln (they hold the rotations)"
        )


def settings(o: FbpOptions) -> ReconstructConfig:
    """The options that are settings of reconstruct too (:data:`SETTING_OPTIONS`; exposure weighting on with
    ``--pre-exposure``) over its defaults, each value validated by its schema and a bad one named by its option."""
    overrides = {key: getattr(o, name) for key, name in SETTING_OPTIONS.items()}
    overrides["ctf.exposure_weighting"] = True if o.pre_exposure is not None else None
    return build_config(None, None, overrides, option_flags(SETTING_OPTIONS))


def _corrected(series: TiltSeries, cfg: ReconstructConfig, tilt_axis_angle_deg: float) -> TiltSeries:
    """``series`` phase-flipped (with its defocus, the defocus gradient across ``tilt_axis_angle_deg``) and
    exposure-weighted (with its pre-exposure, when ``cfg.ctf.exposure_weighting``) as reconstruct does."""
    from ..correction import correct_optics

    with_optics = TiltSeries(series.images, series.tilt_angles_deg, series.pixel_size_A, 0.0, series.defocus_A,
                             series.pre_exposure_e_per_A2)
    return correct_optics(with_optics, cfg, tilt_axis_angle_deg=tilt_axis_angle_deg)[0]


def _sirt_progress(total: int) -> tuple[Progress, Callable[[int, int], None]]:
    """A rich progress bar for SIRT, and a line in the run log every :data:`LOG_EVERY_ITERATIONS`; returns
    ``(progress, on_iteration)``."""
    progress = Progress(
        TextColumn("[bold]SIRT"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("iterations"),
        TimeElapsedColumn(),
        console=console,
    )
    task = progress.add_task("sirt", total=total)

    def on_iteration(done: int, _total: int) -> None:
        progress.update(task, completed=done)
        if done % LOG_EVERY_ITERATIONS == 0 or done == total:
            log.info(f"SIRT iteration {done}/{total}")

    return progress, on_iteration


@one_line_errors
def fbp(
    tilt_series: TiltSeriesArg,
    out: OutOption,
    angles: AnglesOption = None,
    mdoc: MdocOption = None,
    exclude: ExcludeOption = None,
    thickness: ThicknessOption = None,
    bin: BinOption = None,
    method: MethodOption = "fbp",
    iterations: IterationsOption = None,
    filter_name: FilterOption = None,
    deformations: DeformationsOption = None,
    xf: XfOption = None,
    aln: AlnOption = None,
    tilt_axis_angle: TiltAxisAngleOption = None,
    pixel_size: PixelSizeOption = None,
    defocus: DefocusOption = None,
    defocus_hand: DefocusHandOption = None,
    pre_exposure: PreExposureOption = None,
    voltage: VoltageOption = None,
    cs: CsOption = None,
    amplitude_contrast: AmplitudeContrastOption = None,
    positivity: PositivityOption = False,
    invert: InvertOption = False,
    polarity: PolarityOption = None,
    device: DeviceOption = None,
    force: ForceFileOption = False,
) -> None:
    """Reconstruct a tilt series with filtered backprojection (default) or SIRT.

    Reads TILT_SERIES (MRC stack) and --angles or --mdoc, leaving out --exclude'd views; optionally undoes
    per-tilt deformations first (--deformations, --xf or --aln; the aligned images are what gets reconstructed). Writes one MRC volume (thickness, ny, nx) in
    icetide's frame (docs/CONVENTIONS.md) with voxel size = pixel size. FBP weighs each tilt by its angular interval,
    so a full 180-degree range gives the projected density's units. With --defocus the images are phase-flipped
    and with --pre-exposure exposure-weighted first, before the alignment is undone. The volume is written
    with density bright unless --polarity input (docs/CONVENTIONS.md "Intensity units").
    """
    run_fbp(FbpOptions(**locals()))


def run_fbp(o: FbpOptions) -> None:
    """The command's work: the options checked, the settings they share with reconstruct validated, the series
    loaded and prepared (:func:`_prepared`), reconstructed and written (the run log in the output's folder)."""
    from ..intensity import output_polarity
    from ..io import write_mrc
    from ..runtime import resolve_device

    check_options(o)
    cfg = settings(o)
    sign, label = output_polarity(cfg.polarity, o.invert)
    check_output_file(o.out, o.force)
    dev = resolve_device(o.device or "auto")
    held: list[str] = []
    with held_warnings(held):
        series, d, thickness = _prepared(o, cfg)

    # The log of a single output file is in its folder; opened once the inputs are read, so bad input leaves none.
    with run_log(o.out.parent):
        for message in held:
            log.warning(message)
        t0 = time.monotonic()
        volume = _reconstructed(o, series, d, thickness, dev)
        write_mrc(o.out, sign * volume.cpu().numpy(), series.pixel_size_A, label=label)
        nz, ny, nx = volume.shape
        say(f"wrote {o.out} ({nz} x {ny} x {nx}, {o.method}) in {time.monotonic() - t0:.1f} s")


def _prepared(o: FbpOptions, cfg: ReconstructConfig) -> tuple[TiltSeries, Optional[Deformations], int]:
    """The series as reconstructed (binned, corrected), the deformations to undo (``None``: none) and the
    thickness in voxels, checked against the binned detector."""
    from ..ctf import tilt_axis_on_images_deg
    from ..geometry import default_thickness, frame_quarter_turns

    # The same loader as reconstruct: angles or .mdoc, --exclude, --invert (before SIRT's positivity, which is
    # not linear), defocus and exposure per view of the stack, an alignment file for every view of the stack.
    series, d, _ = load_inputs(o.tilt_series, o.angles, o.mdoc, cfg.pixel_size_A, o.tilt_axis_angle, o.exclude,
                               o.invert, o.deformations, o.xf, o.aln, defocus=o.defocus, pre_exposure=o.pre_exposure)
    binned_shape = (series.shape[0] // cfg.bin, series.shape[1] // cfg.bin)
    thickness = default_thickness(binned_shape) if cfg.thickness is None else cfg.thickness
    if not 1 <= thickness <= 4 * max(binned_shape):
        raise IcetideError(f"--thickness must be between 1 and {4 * max(binned_shape)} voxels, got {thickness}")
    if d is None and series.tilt_axis_angle_deg:
        d = Deformations.identity(series.tilt_angles_deg, series.shape)
        # A tilt axis drawn at psi degrees counter-clockwise from the image Y axis is alpha = -psi (deform.py).
        d.angles_deg = np.full(series.n_tilts, -float(series.tilt_axis_angle_deg))
    if cfg.bin > 1:
        series = series.binned(cfg.bin)
        d = None if d is None else d.scaled(1 / cfg.bin, series.shape)
    if d is not None:
        # As reconstruct does: the volume's Y along the tilt axis (icetide.geometry.frame_quarter_turns).
        turns = frame_quarter_turns(tilt_axis_on_images_deg(0.0, d.angles_deg))
        series, d = series.quarter_turned(turns), d.quarter_turned(turns)
    if o.defocus is not None or o.pre_exposure is not None:
        series = _corrected(series, cfg, tilt_axis_on_images_deg(0.0, None if d is None else d.angles_deg))
    return series, d, thickness


def _reconstructed(
    o: FbpOptions, series: TiltSeries, d: Optional[Deformations], thickness: int, dev: torch.device
) -> torch.Tensor:
    """The volume ``(thickness, ny, nx)`` by FBP of the deformed images or SIRT of the aligned ones."""
    from ..classical import align_series, fbp_deformed, sirt

    images = torch.tensor(series.images, device=dev)
    if o.method == "fbp":
        return fbp_deformed(images, series.tilt_angles_deg, thickness, d, o.filter_name or "ramp")
    aligned = images if d is None else align_series(images, d)
    n_iter = o.iterations or DEFAULT_ITERATIONS
    progress, on_iteration = _sirt_progress(n_iter)
    with progress:
        return sirt(aligned, series.tilt_angles_deg, thickness, n_iter, o.positivity, on_iteration)
