"""``icetide reconstruct``: joint alignment and implicit-volume reconstruction of one tilt series."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..config import ReconstructConfig, load_config, parse_config
from ..errors import IcetideError
from ..inputs import load_inputs, relion_inputs
from ..runlog import changed_settings, epoch_lines, run_log
from .common import (
    ForceOption, check_alignment_options, check_output_dir, console, held_warnings, log, one_line_errors,
    output_dir, say,
)
from .reconstruct_options import (
    AlnOption, AmplitudeContrastOption, AnglesOption, AretomoNameOption, BinOption, ConfigOption, CsOption,
    CtfCorrectionOption, DefocusHandOption, DefocusOption, DeformationsOption, DeviceOption, EpochsOption,
    ExcludeOption, ExposureWeightingOption, FixNonfiniteOption, HalfMapsOption, HalfSeriesOption,
    InvertOption, LossOption, MaxMemoryOption, MaxMinutesOption, MdocOption, MixedPrecisionOption, NoLocalOption,
    OutOption, PixelSizeOption, PolarityOption, PreExposureOption, ReconstructOptions, RelionNameOption,
    RendererOption, ResumeOption, SeedOption, SpecimenOption, ThicknessOption, TiltAxisAngleOption,
    TiltAxisSearchOption, TiltSeriesArg, VoltageOption, XfOption,
)


# The settings the options of ``reconstruct`` set to their own value (dotted setting -> option) ...
DIRECT_OPTIONS = {
    "thickness": "thickness", "bin": "bin", "pixel_size_A": "pixel_size", "tilt_axis_angle_deg": "tilt_axis_angle",
    "deform.axis_search_deg": "tilt_axis_search", "specimen": "specimen", "polarity": "polarity",
    "fit.epochs": "epochs", "fit.max_minutes": "max_minutes", "fit.max_memory_gb": "max_memory",
    "fit.renderer": "renderer", "fit.device": "device", "fit.half_maps": "half_maps", "fit.loss": "loss",
    "fit.seed": "seed", "ctf.correction": "ctf_correction", "ctf.defocus_hand": "defocus_hand",
    "ctf.voltage_kV": "voltage", "ctf.spherical_aberration_mm": "cs", "ctf.amplitude_contrast": "amplitude_contrast",
}
# ... and those a flag switches (dotted setting -> (flag, the setting's value when it is given)).
SWITCH_OPTIONS = {
    "fit.precision": ("mixed_precision", "mixed"), "deform.local": ("no_local", False),
    "ctf.exposure_weighting": ("exposure_weighting", True),
}


def option_flags(options: dict[str, str]) -> dict[str, str]:
    """``{dotted setting: parameter name}`` -> ``{dotted setting: its option}`` (``max_minutes`` -> ``--max-minutes``),
    the names :func:`build_config` gives a value the schema refuses."""
    return {key: "--" + name.replace("_", "-") for key, name in options.items()}


def build_config(
    base: Optional[Path],
    resume_dir: Optional[Path],
    overrides: dict,
    option_names: Optional[dict[str, str]] = None,
) -> ReconstructConfig:
    """Defaults < ``--config`` file (or, on ``--resume``, the run's own ``config.yaml``) < command-line options
    ``overrides`` (dotted setting -> value, ``None``: not given); a value the schema refuses is named by its
    option where ``option_names`` (dotted setting -> option) has it."""
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
    return parse_config(data, "options", option_names)


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
    ``defocus``, ``half_series``, ``half_maps``, ``exclude``) leave them open, plus ``tilt_series`` (the stack the
    fit reads) and ``source_path`` (the whole stack, which names the outputs), and a line saying what the folder
    gave. Its ODD/EVN halves become the two half series (``--half-series``) unless other half maps or a half
    series are asked for; the views at its dark frames' tilts are excluded."""
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
    tilt_series: TiltSeriesArg,
    out: OutOption,
    aretomo_name: AretomoNameOption = None,
    relion_name: RelionNameOption = None,
    angles: AnglesOption = None,
    mdoc: MdocOption = None,
    thickness: ThicknessOption = None,
    bin: BinOption = None,
    pixel_size: PixelSizeOption = None,
    tilt_axis_angle: TiltAxisAngleOption = None,
    tilt_axis_search: TiltAxisSearchOption = None,
    exclude: ExcludeOption = None,
    invert: InvertOption = False,
    polarity: PolarityOption = None,
    fix_nonfinite: FixNonfiniteOption = False,
    config: ConfigOption = None,
    epochs: EpochsOption = None,
    max_minutes: MaxMinutesOption = None,
    max_memory: MaxMemoryOption = None,
    renderer: RendererOption = None,
    specimen: SpecimenOption = None,
    device: DeviceOption = None,
    half_maps: HalfMapsOption = None,
    half_series: HalfSeriesOption = None,
    loss: LossOption = None,
    mixed_precision: MixedPrecisionOption = False,
    seed: SeedOption = None,
    no_local: NoLocalOption = False,
    deformations: DeformationsOption = None,
    xf: XfOption = None,
    aln: AlnOption = None,
    defocus: DefocusOption = None,
    ctf_correction: CtfCorrectionOption = None,
    defocus_hand: DefocusHandOption = None,
    pre_exposure: PreExposureOption = None,
    exposure_weighting: ExposureWeightingOption = False,
    voltage: VoltageOption = None,
    cs: CsOption = None,
    amplitude_contrast: AmplitudeContrastOption = None,
    resume: ResumeOption = False,
    force: ForceOption = False,
) -> None:
    """Jointly estimate the 3-D density and the per-tilt deformations (shift, in-plane rotation, local warp).

    Outputs are named after the series' stem STEM (TS_07 for TS_07.mrc), as IMOD names them: OUT/STEM_rec.mrc (the
    tomogram: thickness, ny, nx, or nx, ny when the tilt axis lies nearer the image X axis), OUT/STEM_ali.mrc (the
    aligned stack), OUT/STEM_fbp.mrc (its FBP), OUT/STEM.xf + STEM.tlt (IMOD; + STEM.exclude with --exclude),
    OUT/STEM.star + tomograms.star (RELION-5, when the pixel size is known), OUT/deformations.json, OUT/config.yaml,
    OUT/report.json, OUT/icetide.log and OUT/checkpoint.pt; OUT/tomogram.mrc and OUT/aligned.mrc link to the
    tomogram and the aligned stack. The IMOD and RELION files carry shifts and rotations only; the local fields are
    in deformations.json. With --defocus (and --exposure-weighting) the series is corrected first: the fit,
    STEM_ali.mrc and STEM_fbp.mrc see the corrected images. The volumes are written with density bright unless
    --polarity input (docs/CONVENTIONS.md "Intensity units").
    """
    run_reconstruct(ReconstructOptions(**locals()))


def run_reconstruct(o: ReconstructOptions) -> None:
    """The command's work: the inputs an AreTomo3 folder or a RELION-5 STAR gives, the options checked, the
    settings built (pydantic validates them), the series loaded and reconstructed (rank 0 writes and reports)."""
    from ..reconstruct import reconstruct as run
    from ..reconstruct import summary_lines
    from ..runtime import init_distributed, resolve_device

    o, found = _folder_inputs(o)
    o = _checked(o)
    rank, device = init_distributed(o.device)  # rank 0 alone checks and owns the output folder
    if rank == 0 and not o.resume:
        check_output_dir(o.out, o.force)
    elif rank == 0 and not (o.out / "checkpoint.pt").is_file():
        raise IcetideError(f"{o.out}/checkpoint.pt: no checkpoint to resume from")
    cfg = _settings(replace(o, device=device))
    resolve_device(cfg.fit.device)  # here, not in the fit: bad input leaves no folder behind
    held: list[str] = []
    with held_warnings(held):
        series, init, stack = load_inputs(
            o.tilt_series, o.angles, o.mdoc, cfg.pixel_size_A or found["pixel_size"],
            cfg.tilt_axis_angle_deg or found["tilt_axis_angle"], o.exclude, o.invert, o.deformations, o.xf, o.aln,
            image_names=found["image_names"], fix_nonfinite=o.fix_nonfinite, defocus=o.defocus,
            pre_exposure=o.pre_exposure, half_series=o.half_series,
        )
        if cfg.thickness is not None and cfg.thickness > 4 * max(series.shape):
            raise IcetideError(f"thickness {cfg.thickness} is larger than sensible for a {series.shape} detector")

    if rank != 0:
        run(series, cfg, o.out, init=init, resume=o.resume)
        return
    context = output_dir(o.out, o.force) if not o.resume else contextlib.nullcontext(o.out)
    with context as folder, run_log(folder, changed_settings(cfg)):
        if found["line"]:
            log.info(found["line"])
        for message in held:
            log.warning(message)
        progress, on_epoch = progress_printer(cfg.fit.epochs, cfg.fit.max_minutes)
        with progress:
            report = run(series, cfg, folder, init=init, resume=o.resume, on_epoch=on_epoch,
                         source_path=found["source_path"], on_phase=lambda name: say(f"[dim]{name}[/]"),
                         input_stack=stack)
    for line in summary_lines(report):  # run() has logged them
        console.print(line, highlight=False, soft_wrap=True)
    console.print(f"outputs in {o.out}", highlight=False, soft_wrap=True)


def _folder_inputs(o: ReconstructOptions) -> tuple[ReconstructOptions, dict]:
    """``o`` with what an AreTomo3 output folder or a RELION-5 tilt-series STAR given as the tilt series fills
    in, and what else they give: ``line`` (what was used, or None), ``source_path`` (the file that names the
    outputs), ``image_names`` (one file per view), ``pixel_size`` and ``tilt_axis_angle``."""
    found = {"line": None, "source_path": o.tilt_series, "image_names": None, "pixel_size": None,
             "tilt_axis_angle": None}
    if o.tilt_series.is_dir():
        keys = ("angles", "mdoc", "deformations", "xf", "aln", "defocus", "tilt_axis_angle", "tilt_axis_search",
                "half_series", "half_maps", "exclude")
        got, found["line"] = aretomo_inputs(o.tilt_series, o.aretomo_name, {k: getattr(o, k) for k in keys})
        o = replace(o, **{k: got[k] for k in ("tilt_series", "angles", "aln", "defocus", "half_series", "exclude")})
        found["source_path"] = got["source_path"]
        say(found["line"])
    elif o.aretomo_name is not None:
        raise IcetideError("--aretomo-name needs an AreTomo3 output folder as TILT_SERIES")
    if o.tilt_series.suffix == ".star" and not o.tilt_series.is_dir():
        from ..io.relion_project import relion_series

        keys = ("angles", "mdoc", "defocus", "pre_exposure", "half_series", "half_maps")
        given = {k: getattr(o, k) for k in keys}
        got, found["line"] = relion_inputs(relion_series(o.tilt_series, o.relion_name), given)
        optics = got["ctf"]  # the STAR's optics and defocus hand where no option gives them
        o = replace(
            o, **{k: got[k] for k in ("tilt_series", "angles", "defocus", "pre_exposure", "half_series")},
            voltage=optics["voltage_kV"] if o.voltage is None else o.voltage,
            cs=optics["spherical_aberration_mm"] if o.cs is None else o.cs,
            amplitude_contrast=optics["amplitude_contrast"] if o.amplitude_contrast is None else o.amplitude_contrast,
            defocus_hand=optics["defocus_hand"] if o.defocus_hand is None else o.defocus_hand,
        )
        found.update(source_path=got["source_path"], image_names=got["image_names"], pixel_size=got["pixel_size"],
                     tilt_axis_angle=got["tilt_axis_angle"])
        say(found["line"])
    elif o.relion_name is not None:
        raise IcetideError("--relion-name needs a RELION-5 tilt-series STAR as TILT_SERIES")
    return o, found


def _checked(o: ReconstructOptions) -> ReconstructOptions:
    """``o`` checked for options that exclude or need each other (each value's own range is the settings
    schema's to check), ``--half-series`` implying ``--half-maps series`` and ``--exposure-weighting`` taking
    the exposures from ``--mdoc`` without ``--pre-exposure``."""
    if o.half_series is not None and o.half_maps not in (None, "series"):
        raise IcetideError(f"--half-series splits the data into its two series: it excludes --half-maps {o.half_maps}")
    if o.half_maps == "series" and o.half_series is None:
        raise IcetideError("--half-maps series needs the second half series (--half-series)")
    if o.ctf_correction is not None and o.defocus is None:
        raise IcetideError("--ctf-correction needs the per-view defocus (--defocus)")
    if o.exposure_weighting and o.pre_exposure is None and o.mdoc is None:
        raise IcetideError("--exposure-weighting needs the exposure before each view (--pre-exposure or --mdoc)")
    if o.resume and o.force:
        raise IcetideError("--resume and --force exclude each other")
    check_alignment_options(o.deformations, o.xf, o.aln)
    aligned_start = o.deformations is not None or o.xf is not None or o.aln is not None
    if o.tilt_axis_search and aligned_start:
        raise IcetideError("--tilt-axis-search cannot be combined with --deformations/--xf/--aln (they hold the axis)")
    if o.tilt_axis_angle is not None and aligned_start:
        raise IcetideError(
            "--tilt-axis-angle cannot be combined with --deformations/--xf/--aln (they hold the rotations)"
        )
    return replace(o, half_maps="series" if o.half_series is not None else o.half_maps,
                   pre_exposure=o.mdoc if o.exposure_weighting and o.pre_exposure is None else o.pre_exposure)


def _settings(o: ReconstructOptions) -> ReconstructConfig:
    """The settings: defaults < ``--config`` (or the run's own on ``--resume``) < the options
    (:data:`DIRECT_OPTIONS`, :data:`SWITCH_OPTIONS`), each value validated by the schema and a bad one named by
    its option."""
    overrides = {key: getattr(o, name) for key, name in DIRECT_OPTIONS.items()}
    overrides.update({key: value if getattr(o, name) else None for key, (name, value) in SWITCH_OPTIONS.items()})
    names = option_flags({**DIRECT_OPTIONS, **{key: name for key, (name, _) in SWITCH_OPTIONS.items()}})
    return build_config(o.config, o.out if o.resume else None, overrides, names)
