"""``icetide fbp``: classical reconstruction (FBP or SIRT) of a tilt series, optionally aligned first."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..data import TiltSeries
from ..deform import Deformations
from ..errors import IcetideError
from ..inputs import load_inputs
from ..runlog import run_log
from .common import check_alignment_options, console, held_warnings, log, one_line_errors, say

METHODS = ("fbp", "sirt")
DEFAULT_ITERATIONS = 30
# SIRT iterations between the progress lines of the run log.
LOG_EVERY_ITERATIONS = 10


def check_output_file(path: Path, force: bool) -> None:
    """Refuse an existing output file (unless ``force``), a folder, or a missing parent folder."""
    if path.is_dir():
        raise IcetideError(f"{path}: is a folder, expected an output file name")
    if path.exists() and not force:
        raise IcetideError(f"{path}: exists (use --force to overwrite)")
    if not path.parent.is_dir():
        raise IcetideError(f"{path.parent}: no such folder")


def check_options(
    method: str,
    iterations: Optional[int],
    filter_name: Optional[str],
    positivity: bool,
    deformations: Optional[Path],
    xf: Optional[Path],
    aln: Optional[Path],
    tilt_axis_angle: Optional[float],
) -> None:
    """Reject option combinations that do not make sense, before reading any data."""
    from ..classical import FILTERS

    if method not in METHODS:
        raise IcetideError(f"--method must be fbp or sirt, got {method!r}")
    if method == "fbp" and (iterations is not None or positivity):
        raise IcetideError("--iterations and --positivity apply to --method sirt only")
    if method == "sirt" and filter_name is not None:
        raise IcetideError("--filter applies to --method fbp only")
    if filter_name is not None and filter_name not in FILTERS:
        raise IcetideError(f"--filter must be one of {', '.join(FILTERS)}, got {filter_name!r}")
    if iterations is not None and iterations < 1:
        raise IcetideError(f"--iterations must be at least 1, got {iterations}")
    check_alignment_options(deformations, xf, aln)
    if tilt_axis_angle is not None and (deformations is not None or xf is not None or aln is not None):
        raise IcetideError(
            "--tilt-axis-angle cannot be combined with --deformations/--xf/--aln (they hold the rotations)"
        )


def _corrected(
    series: TiltSeries, exposure_weighting: bool, defocus_hand: int, voltage: float, cs: float,
    amplitude_contrast: float, tilt_axis_angle_deg: float,
) -> TiltSeries:
    """``series`` phase-flipped (with its defocus, the defocus gradient across ``tilt_axis_angle_deg``) and
    exposure-weighted (with its pre-exposure, when ``exposure_weighting``) as reconstruct does."""
    from ..config import parse_config
    from ..correction import correct_optics

    config = parse_config({"ctf": {
        "voltage_kV": voltage, "spherical_aberration_mm": cs, "amplitude_contrast": amplitude_contrast,
        "defocus_hand": defocus_hand, "exposure_weighting": exposure_weighting,
    }}, "options")
    with_optics = TiltSeries(series.images, series.tilt_angles_deg, series.pixel_size_A, 0.0, series.defocus_A,
                             series.pre_exposure_e_per_A2)
    return correct_optics(with_optics, config, tilt_axis_angle_deg=tilt_axis_angle_deg)[0]


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
    tilt_series: Path = typer.Argument(..., help="Tilt series, MRC stack (n_tilts, ny, nx), any MRC mode."),
    angles: Optional[Path] = typer.Option(
        None, "--angles", "-a", help="Tilt angles in degrees, IMOD .tlt/.rawtlt (one per line)."
    ),
    mdoc: Optional[Path] = typer.Option(
        None, help="SerialEM .mdoc instead of --angles: tilt angles, and the pixel size and tilt-axis angle if given."
    ),
    exclude: Optional[str] = typer.Option(
        None, help="Views of the stack to leave out, 0-based, with ranges (e.g. 0-2,40); alignment files still "
        "list every view of the stack."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Output volume, MRC (thickness, ny, nx)."),
    thickness: Optional[int] = typer.Option(
        None, help="Slab thickness in voxels of the output (at the --bin sampling). Default: half the smaller "
        "detector side (at least 8)."
    ),
    bin: int = typer.Option(
        1, "--bin", min=1, help="Reconstruct the stack binned by N (N x N block averages); alignment files are in "
        "the input stack's pixels and are scaled to the binned one."
    ),
    method: str = typer.Option("fbp", help="fbp (filtered backprojection) or sirt."),
    iterations: Optional[int] = typer.Option(None, help=f"SIRT iterations. Default {DEFAULT_ITERATIONS}."),
    filter_name: Optional[str] = typer.Option(
        None, "--filter", help="FBP filter: ramp (default), hann or shepp-logan (apodised ramps, smoother)."
    ),
    deformations: Optional[Path] = typer.Option(
        None, help="deformations.json to undo first (e.g. the estimate of icetide reconstruct)."
    ),
    xf: Optional[Path] = typer.Option(
        None, "--xf", help="IMOD .xf alignment to undo first (shifts and in-plane rotations; scaling is dropped)."
    ),
    aln: Optional[Path] = typer.Option(
        None, "--aln", help="AreTomo .aln alignment to undo first (global shifts and rotations; rows matched by tilt)."
    ),
    tilt_axis_angle: Optional[float] = typer.Option(
        None,
        help="Unaligned data only: tilt-axis direction on the images, degrees counter-clockwise from the image "
        "Y axis; the images are rotated to a vertical axis first. Default: the .mdoc's, else 0.",
    ),
    pixel_size: Optional[float] = typer.Option(None, help="Pixel size in Angstrom (overrides the MRC header)."),
    defocus: Optional[Path] = typer.Option(
        None, help="Phase-flip first with this per-view defocus (CTFFIND4 .txt, IMOD .defocus, RELION-5 .star or "
        "SerialEM .mdoc), as reconstruct does; needs the pixel size."
    ),
    defocus_hand: int = typer.Option(1, help="With --defocus: 1 or -1 (docs/CONVENTIONS.md)."),
    pre_exposure: Optional[Path] = typer.Option(
        None, help="Exposure-weight first with this exposure before each view (.mdoc, RELION-5 .star or one "
        "number per line, e/A^2)."
    ),
    voltage: float = typer.Option(300.0, help="With --defocus/--pre-exposure: acceleration voltage, kV."),
    cs: float = typer.Option(2.7, help="With --defocus: spherical aberration, mm."),
    amplitude_contrast: float = typer.Option(0.07, help="With --defocus: amplitude contrast."),
    positivity: bool = typer.Option(False, "--positivity", help="SIRT: clamp negative densities to 0 each iteration."),
    invert: bool = typer.Option(
        False, "--invert", help="Flip the contrast first (raw cryo-EM images show density dark on light), as "
        "reconstruct does."
    ),
    polarity: str = typer.Option(
        "bright", help="Density polarity of the volume: bright (dense = bright, positive) or input (as in the input "
        "images: dense = dark with --invert). The MRC header label states it."
    ),
    device: str = typer.Option("auto", help="auto (CUDA if available), cpu, cuda or cuda:N."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output file."),
) -> None:
    """Reconstruct a tilt series with filtered backprojection (default) or SIRT.

    Reads TILT_SERIES (MRC stack) and --angles or --mdoc, leaving out --exclude'd views; optionally undoes
    per-tilt deformations first (--deformations, --xf or --aln; the aligned images are what gets reconstructed). Writes one MRC volume (thickness, ny, nx) in
    icetide's frame (docs/CONVENTIONS.md) with voxel size = pixel size. FBP weighs each tilt by its angular interval,
    so a full 180-degree range gives the projected density's units. With --defocus the images are phase-flipped
    and with --pre-exposure exposure-weighted first, before the alignment is undone. The volume is written
    with density bright unless --polarity input (docs/CONVENTIONS.md "Intensity units").
    """
    from ..ctf import tilt_axis_on_images_deg
    from ..geometry import default_thickness
    from ..runtime import resolve_device
    from ..intensity import output_polarity
    from ..io import write_mrc
    from ..classical import align_series, fbp_deformed, sirt

    check_options(method, iterations, filter_name, positivity, deformations, xf, aln, tilt_axis_angle)
    sign, label = output_polarity(polarity, invert)  # refuses a polarity other than bright or input
    check_output_file(out, force)
    dev = resolve_device(device)
    held: list[str] = []
    with held_warnings(held):
        # The same loader as reconstruct: angles or .mdoc, --exclude, --invert (before SIRT's positivity, which is
        # not linear), defocus and exposure per view of the stack, an alignment file for every view of the stack.
        series, d, _ = load_inputs(tilt_series, angles, mdoc, pixel_size, tilt_axis_angle, exclude, invert,
                                   deformations, xf, aln, defocus=defocus, pre_exposure=pre_exposure)
        binned_shape = (series.shape[0] // bin, series.shape[1] // bin)
        thick = default_thickness(binned_shape) if thickness is None else thickness
        if not 1 <= thick <= 4 * max(binned_shape):
            raise IcetideError(f"--thickness must be between 1 and {4 * max(binned_shape)} voxels, got {thick}")
        if d is None and series.tilt_axis_angle_deg:
            d = Deformations.identity(series.tilt_angles_deg, series.shape)
            # A tilt axis drawn at psi degrees counter-clockwise from the image Y axis is alpha = -psi (deform.py).
            d.angles_deg = np.full(series.n_tilts, -float(series.tilt_axis_angle_deg))
        if bin > 1:
            series = series.binned(bin)
            d = None if d is None else d.scaled(1 / bin, series.shape)
        if defocus is not None or pre_exposure is not None:
            axis = tilt_axis_on_images_deg(0.0, None if d is None else d.angles_deg)
            series = _corrected(series, pre_exposure is not None, defocus_hand, voltage, cs, amplitude_contrast, axis)

    # The log of a single output file is in its folder; opened once the inputs are read, so bad input leaves none.
    with run_log(out.parent):
        for message in held:
            log.warning(message)
        t0 = time.monotonic()
        images = torch.tensor(series.images, device=dev)
        if method == "fbp":
            volume = fbp_deformed(images, series.tilt_angles_deg, thick, d, filter_name or "ramp")
        else:
            aligned = images if d is None else align_series(images, d)
            n_iter = iterations or DEFAULT_ITERATIONS
            progress, on_iteration = _sirt_progress(n_iter)
            with progress:
                volume = sirt(aligned, series.tilt_angles_deg, thick, n_iter, positivity, on_iteration)
        write_mrc(out, sign * volume.cpu().numpy(), series.pixel_size_A, label=label)
        nz, ny, nx = volume.shape
        say(f"wrote {out} ({nz} x {ny} x {nx}, {method}) in {time.monotonic() - t0:.1f} s")
