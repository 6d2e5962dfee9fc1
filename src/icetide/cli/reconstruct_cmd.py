"""``icetide reconstruct``: joint alignment and implicit-volume reconstruction of one tilt series."""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..config import ReconstructConfig, load_config, parse_config
from ..errors import IcetideError
from ..runlog import changed_settings, epoch_lines, run_log
from .common import (
    check_alignment_options, check_output_dir, console, held_warnings, load_inputs, log, one_line_errors,
    output_dir, relion_inputs, say,
)


def build_config(
    base: Optional[Path],
    resume_dir: Optional[Path],
    overrides: dict,
) -> ReconstructConfig:
    """Defaults < ``--config`` file (or, on ``--resume``, the run's own ``config.yaml``) < command-line options."""
    if base is not None:
        config = load_config(base)
    elif resume_dir is not None and (resume_dir / "config.yaml").is_file():
        config = load_config(resume_dir / "config.yaml")
    else:
        config = ReconstructConfig()
    data = config.model_dump()
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    return parse_config(data, "options")


def log_lines(total_epochs: int, max_minutes: float | None, every_epochs: int = 10, every_s: float = 30.0,
              clock=time.monotonic):
    """``on_epoch`` printing (and logging) a plain line every ``every_epochs`` epochs or ``every_s`` seconds
    (:func:`icetide.runlog.epoch_lines`), for output that is not a terminal (SLURM, nohup)."""
    return epoch_lines(total_epochs, max_minutes, say, every_epochs, every_s, clock)


def progress_printer(total_epochs: int, max_minutes: float | None = None):
    """A rich progress bar for the fit on a terminal, else plain lines (:func:`log_lines`); returns
    ``(progress context, on_epoch)``. The run log gets the plain lines either way."""
    if not console.is_terminal:
        return contextlib.nullcontext(), log_lines(total_epochs, max_minutes)
    progress = Progress(
        TextColumn("[bold]fitting"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("epochs  loss {task.fields[loss]}  val {task.fields[val]}  {task.fields[rate]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
    task = progress.add_task("fit", total=total_epochs, loss="-", val="-", rate="")
    logged = epoch_lines(total_epochs, max_minutes, log.info)

    def on_epoch(info: dict) -> None:
        logged(info)
        val = info["val_loss"]
        progress.update(
            task,
            completed=info["epoch"],
            loss=f"{info['train_loss']:.4f}" + (" (binned)" if info.get("binned") else ""),
            val="-" if math.isnan(val) else f"{val:.4f}",
            rate=f"{info['samples'] / max(info['elapsed_s'], 1e-9) / 1e6:.2f} Mpx/s",
        )

    return progress, on_epoch


def aretomo_inputs(folder: Path, name: Optional[str], given: dict) -> tuple[dict, str]:
    """The inputs an AreTomo3 output folder gives (:func:`icetide.io.aretomo.aretomo3_series`) where the options
    ``given`` (``angles``, ``mdoc``, ``deformations``, ``xf``, ``aln``, ``tilt_axis_angle``, ``tilt_axis_search``,
    ``defocus``, ``half_series``, ``half_maps``, ``exclude``) leave them open, plus ``tilt_series`` (the stack the fit
    reads) and ``source_path`` (the whole stack, which names the outputs), and a line saying what the folder gave. Its ODD/EVN halves become the two half series (``--half-series``)
    unless other half maps or a half series are asked for; the views at its dark frames' tilts are excluded."""
    from ..io import read_aln, read_tlt
    from ..io.aretomo import aretomo3_series, exclude_dark_views

    found = aretomo3_series(folder, name)
    out = dict(given, tilt_series=found.stack, source_path=found.stack)
    used = [f"AreTomo3 series {found.name}: stack {found.stack.name}"]
    if given["angles"] is None and given["mdoc"] is None:
        out["angles"] = found.angles if found.angles is not None else found.angles_deg()
        used.append(f"angles {found.angles.name if found.angles else found.aln.name}")
    # A starting alignment, or a tilt-axis angle or search asked for, takes the place of the folder's .aln.
    own_axis = given["tilt_axis_angle"] is not None or given["tilt_axis_search"]
    if found.aln and not own_axis and not any(given[k] for k in ("deformations", "xf", "aln")):
        out["aln"] = found.aln
        used.append(f"start alignment {found.aln.name}")
    if found.ctf and given["defocus"] is None:
        out["defocus"] = found.ctf
        used.append(f"defocus {found.ctf.name}")
    if found.odd and given["half_series"] is None and given["half_maps"] in (None, "series"):
        out["tilt_series"], out["half_series"] = found.odd, found.even
        used[0] = f"AreTomo3 series {found.name}: half series {found.odd.name} and {found.even.name}"
    if found.aln and out["angles"] is not None:
        angles = read_tlt(out["angles"]) if isinstance(out["angles"], Path) else out["angles"]
        out["exclude"], dark = exclude_dark_views(given["exclude"], read_aln(found.aln), angles)
        if dark:
            used.append(f"dark views {', '.join(map(str, dark))} excluded")
    return out, ", ".join(used)


@one_line_errors
def reconstruct(
    tilt_series: Path = typer.Argument(
        ..., help="Tilt series, MRC stack (n_tilts, ny, nx), any MRC mode; or an AreTomo3 output folder, whose "
        "stack, _TLT.txt angles, .aln (starting alignment), _CTF.txt (defocus) and _ODD/_EVN.mrc (half series) are "
        "used where no option says otherwise (views at its dark frames' tilts are excluded); or a RELION-5 "
        "tilt-series STAR (.star, e.g. CtfFind/job003/tilt_series_ctf.star of a MotionCorr or later job), whose "
        "micrographs (stacked in order of tilt angle), angles, pixel size, tilt axis, pre-exposure, defocus, "
        "even/odd sums (half series), optics and defocus hand are used where no option says otherwise."
    ),
    aretomo_name: Optional[str] = typer.Option(
        None, "--aretomo-name", help="Which tilt series of an AreTomo3 output folder holding several (its X of X.aln)."
    ),
    relion_name: Optional[str] = typer.Option(
        None, "--relion-name", help="Which tilt series of a RELION-5 tilt-series STAR listing several (its "
        "rlnTomoName)."
    ),
    angles: Optional[Path] = typer.Option(
        None, "--angles", "-a", help="Tilt angles in degrees, IMOD .tlt/.rawtlt (one per line, stack order)."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (created; must be empty unless --force/--resume)."),
    mdoc: Optional[Path] = typer.Option(
        None, help="SerialEM .mdoc instead of --angles: tilt angles, and the pixel size and tilt-axis angle if given."
    ),
    thickness: Optional[int] = typer.Option(
        None, help="Slab thickness in voxels of the tomogram (at the --bin sampling). Default: half the smaller "
        "detector side."
    ),
    bin: Optional[int] = typer.Option(
        None, "--bin", help="Fit the stack binned by N (N x N block averages); the tomograms, the aligned stack and the "
        "FBP are at that sampling, the .xf, .star and deformations.json in the input stack's pixels. Default 1."
    ),
    pixel_size: Optional[float] = typer.Option(None, help="Pixel size in Angstrom (overrides the MRC header)."),
    tilt_axis_angle: Optional[float] = typer.Option(
        None, help="Tilt-axis direction on the images, degrees counter-clockwise from the image Y axis. Default 0."
    ),
    tilt_axis_search: Optional[float] = typer.Option(
        None, help="Search the tilt-axis direction within +-this many degrees of --tilt-axis-angle (or the .mdoc's) "
        "before the fit, by the sharpness of the coarsely aligned FBP (deform.axis_search); 0 = off. Default 4. "
        "The estimate is in report.json."
    ),
    exclude: Optional[str] = typer.Option(
        None, help="Views to leave out: stack indices numbered from 0, single or as ranges, e.g. 0-2,40. The fit, "
        "STEM_ali.mrc and STEM.star hold the other views; STEM.xf/.tlt keep a line per view of the stack and "
        "STEM.exclude lists the excluded ones for IMOD's EXCLUDELIST (numbered from 1, e.g. 1-3,41)."
    ),
    invert: bool = typer.Option(
        False, "--invert", help="Flip the contrast first (raw cryo-EM images show density dark on light)."
    ),
    polarity: Optional[str] = typer.Option(
        None, help="Density polarity of the volumes and STEM_ali.mrc: bright (default: dense = bright, positive) "
        "or input (as in the input images: dense = dark with --invert). The MRC header label states it."
    ),
    fix_nonfinite: bool = typer.Option(
        False, "--fix-nonfinite", help="Replace NaN/Inf pixels by their image's median (warns) instead of refusing."
    ),
    config: Optional[Path] = typer.Option(None, help="YAML file with any subset of the settings (see config.yaml of a run)."),
    epochs: Optional[int] = typer.Option(
        None, help="Maximum number of epochs (passes over every tilt). Default 500; early stopping usually ends sooner."
    ),
    max_minutes: Optional[float] = typer.Option(None, help="Stop after this many minutes of fitting."),
    max_memory: Optional[float] = typer.Option(
        None, "--max-memory", help="GiB (2**30 bytes) a fit may plan for (CPU RAM or GPU memory); default 70% of "
        "what is available. Out-of-memory errors shrink the batch and retry."
    ),
    renderer: Optional[str] = typer.Option(None, help="Forward model: lattice (default, fast) or rays (the paper's)."),
    specimen: Optional[str] = typer.Option(
        None, help="box (default: nothing outside the field of view) or slab (the specimen extends sideways "
        "beyond it, as a lamella or ice film does: modelled wider, slower)."
    ),
    device: Optional[str] = typer.Option(None, help="auto (default: CUDA if available), cpu, cuda or cuda:N."),
    half_maps: Optional[str] = typer.Option(
        None, "--half-maps", help="tilts, pixels or series: fit two volumes on disjoint halves of the data "
        "(alternate tilts, a random half of every image, or the two half series of --half-series) with the "
        "deformations from all of it; writes STEM_half1/2.mrc and fsc_halves.png, the resolution at FSC 0.143 "
        "in report.json (STEM_rec.mrc is their mean). About twice the fitting time."
    ),
    half_series: Optional[Path] = typer.Option(
        None, "--half-series", help="A second half series of the same acquisition (e.g. TILT_SERIES from the odd "
        "frames, this one from the even frames, both averaged to the full exposure); implies --half-maps series. "
        "STEM_ali.mrc and the FBP are of their mean."
    ),
    loss: Optional[str] = typer.Option(
        None, help="Data term: l1 (default, the paper's), l2, or poisson for counting data of very low dose "
        "(below about 1 count per pixel; docs/RESULTS.md)."
    ),
    mixed_precision: bool = typer.Option(
        False, "--mixed-precision", help="On CUDA: hash table read in fp16 and MLP in bf16 (fp32 parameters and "
        "gradients): 1.4-1.5x faster field evaluation and 40% less GPU memory in docs/BENCHMARKS.md. No effect on CPU."
    ),
    seed: Optional[int] = typer.Option(None, help="Random seed (default 0); CPU runs are reproducible for a seed."),
    no_local: bool = typer.Option(False, "--no-local", help="Do not estimate local deformation fields."),
    deformations: Optional[Path] = typer.Option(
        None, help="Starting deformations (deformations.json), e.g. from another run."
    ),
    xf: Optional[Path] = typer.Option(
        None, "--xf", help="Starting alignment from IMOD .xf (shifts and rotations; the tilt axis is in it)."
    ),
    aln: Optional[Path] = typer.Option(
        None, "--aln", help="Starting alignment from AreTomo .aln (global part; rows matched by tilt angle)."
    ),
    defocus: Optional[Path] = typer.Option(
        None, help="Per-view defocus: CTFFIND4 output (.txt), IMOD .defocus, RELION-5 tilt-series .star or SerialEM "
        ".mdoc (its nominal Defocus). The series is phase-flipped before the fit (--ctf-correction)."
    ),
    ctf_correction: Optional[str] = typer.Option(
        None, help="With --defocus: phaseflip (default; in effect strips parallel to the tilt axis, as the "
        "defocus varies across a tilted image), model (fit the raw images with the CTF in the forward model: "
        "0.87-0.91 in CC against 0.69-0.72 for phaseflip in docs/RESULTS.md section 9, default renderer, one process; "
        "on the realistic acquisitions of section 11 phaseflip aligned better) or none."
    ),
    defocus_hand: Optional[int] = typer.Option(
        None, help="1 (default) or -1: which side of a tilted image is further underfocus (docs/CONVENTIONS.md); "
        "flip it when the tilt sign of the data is the opposite."
    ),
    pre_exposure: Optional[Path] = typer.Option(
        None, help="Exposure before each view (e/A^2): SerialEM .mdoc (PriorRecordDose, or ExposureDose in "
        "DateTime order), RELION-5 .star (rlnMicrographPreExposure) or one number per line."
    ),
    exposure_weighting: bool = typer.Option(
        False, "--exposure-weighting", help="Weight each view's spectrum by its accumulated exposure (Grant & "
        "Grigorieff critical exposure). Needs --pre-exposure, or an --mdoc with doses."
    ),
    voltage: Optional[float] = typer.Option(None, help="Acceleration voltage, kV (CTF, tomograms.star). Default 300."),
    cs: Optional[float] = typer.Option(None, help="Spherical aberration, mm (CTF, tomograms.star). Default 2.7."),
    amplitude_contrast: Optional[float] = typer.Option(
        None, help="Amplitude contrast (CTF, tomograms.star). Default 0.07."
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/checkpoint.pt with OUT's config.yaml."),
    force: bool = typer.Option(False, "--force", help="Replace the contents of a non-empty output folder."),
) -> None:
    """Jointly estimate the 3-D density and the per-tilt deformations (shift, in-plane rotation, local warp).

    Outputs are named after the series' stem STEM (TS_07 for TS_07.mrc), as IMOD names them: OUT/STEM_rec.mrc
    (the tomogram: thickness, ny, nx), OUT/STEM_ali.mrc (the aligned stack), OUT/STEM_fbp.mrc (its FBP),
    OUT/STEM.xf + STEM.tlt (IMOD; + STEM.exclude with --exclude), OUT/STEM.star + tomograms.star (RELION-5, when
    the pixel size is known), OUT/deformations.json, OUT/config.yaml, OUT/report.json, OUT/icetide.log and
    OUT/checkpoint.pt; OUT/tomogram.mrc and OUT/aligned.mrc link to the tomogram and the aligned stack. The IMOD
    and RELION files carry shifts and rotations only; the local fields are in deformations.json. With --defocus
    (and --exposure-weighting) the series is corrected first: the fit, STEM_ali.mrc and STEM_fbp.mrc see the
    corrected images. The volumes are written with density bright
    unless --polarity input (docs/CONVENTIONS.md "Intensity units").
    """
    from ..runtime import init_distributed, resolve_device
    from ..reconstruct import reconstruct as run
    from ..reconstruct import summary_lines

    folder_line = None
    source_path, image_names, relion_px, relion_axis = tilt_series, None, None, None
    if tilt_series.is_dir():
        given = dict(angles=angles, mdoc=mdoc, deformations=deformations, xf=xf, aln=aln, defocus=defocus,
                     tilt_axis_angle=tilt_axis_angle, tilt_axis_search=tilt_axis_search, half_series=half_series,
                     half_maps=half_maps, exclude=exclude)
        got, folder_line = aretomo_inputs(tilt_series, aretomo_name, given)
        tilt_series, angles, aln, defocus, half_series, exclude, source_path = (
            got[k] for k in ("tilt_series", "angles", "aln", "defocus", "half_series", "exclude", "source_path"))
        say(folder_line)
    elif aretomo_name is not None:
        raise IcetideError("--aretomo-name needs an AreTomo3 output folder as TILT_SERIES")
    if tilt_series.suffix == ".star" and not tilt_series.is_dir():
        from ..io.relion_project import relion_series

        given = dict(angles=angles, mdoc=mdoc, defocus=defocus, pre_exposure=pre_exposure, half_series=half_series,
                     half_maps=half_maps)
        got, folder_line = relion_inputs(relion_series(tilt_series, relion_name), given)
        tilt_series, angles, defocus, pre_exposure, half_series, source_path, image_names = (
            got[k] for k in ("tilt_series", "angles", "defocus", "pre_exposure", "half_series", "source_path",
                             "image_names"))
        relion_px, relion_axis, optics = got["pixel_size"], got["tilt_axis_angle"], got["ctf"]
        # The STAR's optics and defocus hand where no option gives them.
        voltage = optics["voltage_kV"] if voltage is None else voltage
        cs = optics["spherical_aberration_mm"] if cs is None else cs
        amplitude_contrast = optics["amplitude_contrast"] if amplitude_contrast is None else amplitude_contrast
        defocus_hand = optics["defocus_hand"] if defocus_hand is None else defocus_hand
        say(folder_line)
    elif relion_name is not None:
        raise IcetideError("--relion-name needs a RELION-5 tilt-series STAR as TILT_SERIES")
    if renderer is not None and renderer not in ("lattice", "rays"):
        raise IcetideError(f"--renderer must be lattice or rays, got {renderer!r}")
    if loss is not None and loss not in ("l1", "l2", "poisson"):
        raise IcetideError(f"--loss must be l1, l2 or poisson, got {loss!r}")
    if half_maps is not None and half_maps not in ("tilts", "pixels", "series"):
        raise IcetideError(f"--half-maps must be tilts, pixels or series, got {half_maps!r}")
    if half_series is not None and half_maps not in (None, "series"):
        raise IcetideError(f"--half-series splits the data into its two series: it excludes --half-maps {half_maps}")
    if half_maps == "series" and half_series is None:
        raise IcetideError("--half-maps series needs the second half series (--half-series)")
    if half_series is not None:
        half_maps = "series"
    if specimen is not None and specimen not in ("box", "slab"):
        raise IcetideError(f"--specimen must be box or slab, got {specimen!r}")
    if ctf_correction is not None and ctf_correction not in ("phaseflip", "model", "none"):
        raise IcetideError(f"--ctf-correction must be phaseflip, model or none, got {ctf_correction!r}")
    if ctf_correction is not None and defocus is None:
        raise IcetideError("--ctf-correction needs the per-view defocus (--defocus)")
    if polarity is not None and polarity not in ("bright", "input"):
        raise IcetideError(f"--polarity must be bright or input, got {polarity!r}")
    if defocus_hand is not None and defocus_hand not in (1, -1):
        raise IcetideError(f"--defocus-hand must be 1 or -1, got {defocus_hand}")
    if exposure_weighting and pre_exposure is None:
        if mdoc is None:
            raise IcetideError("--exposure-weighting needs the exposure before each view (--pre-exposure or --mdoc)")
        pre_exposure = mdoc
    if resume and force:
        raise IcetideError("--resume and --force exclude each other")
    check_alignment_options(deformations, xf, aln)
    aligned_start = deformations is not None or xf is not None or aln is not None
    if tilt_axis_search and aligned_start:
        raise IcetideError("--tilt-axis-search cannot be combined with --deformations/--xf/--aln (they hold the axis)")
    if tilt_axis_angle is not None and aligned_start:
        raise IcetideError(
            "--tilt-axis-angle cannot be combined with --deformations/--xf/--aln (they hold the rotations)"
        )
    rank, device = init_distributed(device)  # rank 0 alone checks and owns the output folder
    if rank == 0 and not resume:
        check_output_dir(out, force)
    elif rank == 0 and not (out / "checkpoint.pt").is_file():
        raise IcetideError(f"{out}/checkpoint.pt: no checkpoint to resume from")
    cfg = build_config(
        config,
        out if resume else None,
        {
            "thickness": thickness,
            "bin": bin,
            "pixel_size_A": pixel_size,
            "tilt_axis_angle_deg": tilt_axis_angle,
            "deform.axis_search_deg": tilt_axis_search,
            "specimen": specimen,
            "polarity": polarity,
            "fit.epochs": epochs,
            "fit.max_minutes": max_minutes,
            "fit.max_memory_gb": max_memory,
            "fit.renderer": renderer,
            "fit.device": device,
            "fit.precision": "mixed" if mixed_precision else None,
            "fit.half_maps": half_maps,
            "fit.loss": loss,
            "fit.seed": seed,
            "deform.local": False if no_local else None,
            "ctf.correction": ctf_correction,
            "ctf.defocus_hand": defocus_hand,
            "ctf.exposure_weighting": True if exposure_weighting else None,
            "ctf.voltage_kV": voltage,
            "ctf.spherical_aberration_mm": cs,
            "ctf.amplitude_contrast": amplitude_contrast,
        },
    )
    resolve_device(cfg.fit.device)  # here, not in the fit: bad input leaves no folder behind
    held: list[str] = []
    with held_warnings(held):
        series, init, stack = load_inputs(
            tilt_series, angles, mdoc, cfg.pixel_size_A or relion_px, cfg.tilt_axis_angle_deg or relion_axis, exclude,
            invert, deformations, xf, aln, image_names=image_names, fix_nonfinite=fix_nonfinite, defocus=defocus,
            pre_exposure=pre_exposure, half_series=half_series,
        )
        if cfg.thickness is not None and cfg.thickness > 4 * max(series.shape):
            raise IcetideError(f"thickness {cfg.thickness} is larger than sensible for a {series.shape} detector")

    if rank != 0:
        run(series, cfg, out, init=init, resume=resume)
        return
    context = output_dir(out, force) if not resume else contextlib.nullcontext(out)
    with context as folder, run_log(folder, changed_settings(cfg)):
        if folder_line:
            log.info(folder_line)
        for message in held:
            log.warning(message)
        progress, on_epoch = progress_printer(cfg.fit.epochs, cfg.fit.max_minutes)
        with progress:
            report = run(series, cfg, folder, init=init, resume=resume, on_epoch=on_epoch, source_path=source_path,
                         on_phase=lambda name: say(f"[dim]{name}[/]"), input_stack=stack)
    for line in summary_lines(report):  # run() has logged them
        console.print(line, highlight=False, soft_wrap=True)
    console.print(f"outputs in {out}", highlight=False, soft_wrap=True)
