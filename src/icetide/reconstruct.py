"""A whole reconstruction: fit the model to a tilt series and write every output into one folder.

Outputs (``out_dir``), named after the series' stem (:class:`icetide.output_files.OutputNames`, here ``TS``):
``TS_rec.mrc`` (the implicit volume sampled on the voxel grid, ``(thickness, ny, nx)``, frame of
docs/CONVENTIONS.md), ``deformations.json`` (estimated, gauge removed), ``TS_ali.mrc`` (the input series with the
estimated deformations undone), ``TS_fbp.mrc`` (FBP of the aligned series), ``TS.xf`` and ``TS.tlt`` (IMOD, one
line per view of the input stack), ``TS.exclude`` (with views excluded: their IMOD list), ``TS.star`` and
``tomograms.star`` (RELION-5, when the pixel size is known; like ``.xf`` it carries the shifts and rotations only,
the local fields have no RELION/IMOD equivalent; see :func:`write_alignment_files`), the links ``tomogram.mrc`` and
``aligned.mrc``, ``config.yaml``, ``report.json``, ``checkpoint.pt``, ``icetide.log`` (:mod:`icetide.runlog`), and
``refit_start.json`` when the refinements after the first fit (tilt axis, gold beads:
:func:`icetide.start.refine_tilt_axis`, :func:`icetide.start.refine_by_beads`) started a second fit. With
``fit.half_maps``: ``TS_half1.mrc`` and ``TS_half2.mrc`` (the two half volumes; ``TS_rec.mrc`` is their mean) and
``fsc_halves.png/.csv``. The volumes and ``TS_ali.mrc`` have the polarity ``config.polarity`` asks for, stated in
their MRC header label (:func:`icetide.intensity.output_polarity`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .alignment import deformations_for_stack, deformations_to_xf
from .config import ReconstructConfig, save_config
from .correction import correct_optics
from .ctf import tilt_axis_on_images_deg
from .data import InputStack, TiltSeries
from .deform import Deformations
from .fit import Fitter, FitResult, run_fit
from .geometry import default_thickness, frame_quarter_turns
from .intensity import output_polarity
from .io import imod_view_list, read_deformations, write_deformations, write_json, write_mrc, write_tlt, write_view_list, write_xf
from .io.relion import RelionTomogram, write_relion_tilt_series_star, write_relion_tomograms_star
from .output_files import OutputNames, link_short_names
from .classical import align_series, fbp
from .runtime import distributed_rank
from .runlog import LOG_NAME, changed_settings, epoch_lines, run_log
from .start import (
    centre_start, centred_on_specimen, check_against_start, coarse_start, contrast_series, refine_by_beads,
    refine_tilt_axis, search_tilt_axis,
)
from .tomogram import sample_tomogram, write_half_maps

__all__ = ["reconstruct", "summary_lines", "write_alignment_files"]

log = logging.getLogger(__name__)


# The second fit (after the tilt-axis and bead refinements) runs when at least this fraction of fit.max_minutes is left.
REFIT_MIN_BUDGET = 0.1
# The start of that second fit, kept in the output folder (a resumed run continues the second fit from it).
REFIT_START_NAME = "refit_start.json"


def write_alignment_files(
    out_dir: Path,
    names: OutputNames,
    d: Deformations,
    stack: InputStack,
    config: ReconstructConfig,
    pixel_size_A: float | None,
    tomogram_shape: tuple[int, int, int],
    source_path: Path | None,
) -> dict:
    """Write the alignment ``d`` of the fitted views (in the input stack's pixels, ``pixel_size_A`` Angstrom or
    ``None``) for IMOD and RELION-5; return the report entries ``exported_alignment`` and ``excluded_views``.

    IMOD: ``names.xf`` and ``names.tlt`` have one line per view of the input stack, so that ``newstack``
    and ``tilt`` take them with the stack itself; an excluded view has its tilt angle and a shift and rotation
    interpolated in tilt angle from the fitted views (:func:`icetide.alignment.deformations_for_stack`).
    ``names.exclude`` (only with views excluded) lists those views as ``tilt``'s ``EXCLUDELIST`` takes them,
    numbered from 1 with ranges (:func:`icetide.io.imod_view_list`); report.json has the same list.
    RELION-5 (when the pixel size is known): ``names.star`` has a row per fitted view, its
    ``rlnMicrographName`` ``k@stack`` naming the view's image in the input stack (``source_path``), or the view's
    own file where the views came one per file (``stack.image_names``), and
    ``tomograms.star`` names the series ``names.stem`` and its tomogram ``names.tomogram`` (``tomogram_shape``
    ``(nz, ny, nx)`` voxels of ``config.bin`` pixels), its binning, ``config.ctf``'s optics and defocus hand.
    """
    excluded = stack.excluded
    every_view = deformations_for_stack(d, stack.kept, stack.tilt_angles_deg)
    write_xf(out_dir / names.xf, deformations_to_xf(every_view))
    write_tlt(out_dir / names.tlt, stack.tilt_angles_deg)
    files = [names.xf, names.tlt]
    if excluded.size:
        write_view_list(out_dir / names.exclude, excluded)
        files.append(names.exclude)
    if pixel_size_A is not None:
        images = str(Path(source_path).resolve()) if source_path is not None else None
        if stack.image_names is not None:
            images = [stack.image_names[k] for k in stack.kept]
        write_relion_tilt_series_star(out_dir / names.star, d, pixel_size_A, names.stem, images, stack.kept)
        factor = config.bin
        nz, ny, nx = tomogram_shape
        entry = RelionTomogram(
            names.stem, str((out_dir / names.star).resolve()), config.ctf.voltage_kV,
            config.ctf.spherical_aberration_mm, config.ctf.amplitude_contrast, pixel_size_A, pixel_size_A,
            (nx * factor, ny * factor, nz * factor), config.ctf.defocus_hand,
            str((out_dir / names.tomogram).resolve()), float(factor),
        )
        write_relion_tomograms_star(out_dir / "tomograms.star", [entry])
        files += [names.star, "tomograms.star"]
    exported = (", ".join(files) + ("" if pixel_size_A is not None else " (no RELION files: pixel size unknown)")
                + ": shifts and in-plane rotations only; the local fields are in deformations.json")
    return {"exported_alignment": exported,
            "excluded_views": {"stack_indices": excluded.tolist(), "imod_excludelist": imod_view_list(excluded)}}


def reconstruct(
    series: TiltSeries,
    config: ReconstructConfig,
    out_dir: Path,
    init: Deformations | None = None,
    resume: bool = False,
    on_epoch: Callable[[dict], None] | None = None,
    on_phase: Callable[[str], None] | None = None,
    source_path: Path | None = None,
    input_stack: InputStack | None = None,
    names: OutputNames | None = None,
) -> dict:
    """Fit ``series`` and write all outputs to ``out_dir`` (which must exist). Returns the report.

    The fit, the aligned stack and the FBP see the series after :func:`correct_optics` (CTF, exposure).
    ``source_path``: the tilt-series file, which names the outputs (:class:`icetide.output_files.OutputNames`) and
    is named in the RELION STAR (``k@path``) so RELION finds the images;
    ``tomograms.star`` carries ``config.ctf``'s optics. ``input_stack``: the views of that file the series holds
    and whether it was inverted (default: all of it, as read), for the IMOD files and the polarity. ``names``:
    the output files' names (default: after ``source_path``). In a
    ``torch.distributed`` run (see :func:`icetide.runtime.distributed_rank`) every rank fits and only rank 0 writes;
    the other ranks return their fit report.

    Rank 0 logs into ``out_dir/icetide.log`` (:func:`icetide.runlog.run_log`; into the caller's log when it has
    one open there): the progress, unless ``on_phase`` and ``on_epoch`` are given (their caller reports it),
    the warnings, the outcome (:func:`summary_lines`) and the files written.
    """
    writer = distributed_rank()[0] == 0
    with run_log(out_dir, changed_settings(config)) if writer else contextlib.nullcontext():
        on_epoch = on_epoch or epoch_lines(config.fit.epochs, config.fit.max_minutes, log.info)
        report = _fit_and_write(series, config, Path(out_dir), init, resume, on_epoch, on_phase or log.info,
                                source_path, input_stack or InputStack.whole(series),
                                names or OutputNames.for_source(source_path))
        if writer:
            for line in summary_lines(report):
                log.info(line)
            log.info("wrote " + ", ".join(sorted(p.name for p in Path(out_dir).iterdir() if p.name != LOG_NAME)))
    return report


def summary_lines(report: dict) -> list[str]:
    """The outcome of a run (:func:`reconstruct`'s report) in a few lines, for the terminal and the log: the fit,
    the tilt-axis search, the check of the alignment against its start, the half-map resolution, the timings."""
    lines = [f"done: {report['epochs']} epochs, {report['stop_reason']}; best epoch {report['best_epoch']}; "
             f"fit {report['fit_seconds']:.1f} s"]
    if "tilt_axis_search" in report:
        found = report["tilt_axis_search"]
        lines.append(f"tilt axis: {found['estimate_deg']:.2f} deg from the image Y axis "
                     + ("(used)" if found["used"] else f"(not used: {found.get('note', 'see report.json')})"))
    if "tilt_axis_refinement" in report and "estimate_deg" in report["tilt_axis_refinement"]:
        refined = report["tilt_axis_refinement"]
        if refined["used"]:
            lines.append(f"tilt axis after the fit: {refined['estimate_deg']:.2f} deg, "
                         f"{refined['offset_px'] if refined['offset_used'] else 0.0:+.1f} px across it "
                         "(fitted again from there)")
        else:
            lines.append(f"tilt axis after the fit: kept at {refined['fitted_deg']:.2f} deg ({refined['note']})")
    if report.get("bead_refinement", {}).get("used"):
        found = report["bead_refinement"]
        lines.append(f"gold beads after the fit: {found['beads']} followed, tilt axis {found['estimate_deg']:.2f} deg, "
                     f"shifts moved by {found['shift_rms_px']:.2f} px RMS (fitted again from there)")
    if report.get("bead_residual", {}).get("residual_px") is not None:
        found = report["bead_residual"]
        lines.append(f"gold-bead residual: {found['residual_px']:.2f} px mean over {found['beads']} beads "
                     f"({found['solved_residual_px']:.2f} px with the beads' best shifts and a turn of "
                     f"{found['rotation_deg']:+.2f} deg)")
    if "start_check" in report:
        check = report["start_check"]
        lines.append(f"alignment: kept the {'fitted' if check['kept'] == 'fit' else 'starting'} one (even/odd FSC "
                     f"score {check['fit_score']:.4f} fitted, {check['start_score']:.4f} start)"
                     + (f"; {check['note']}" if check["kept"] == "start" else ""))
    if "half_maps" in report:
        at = report["half_maps"]["resolution"]["0.143"]
        where = ("beyond Nyquist" if at["nyquist_limited"] else
                 f"{at['angstrom']:.1f} A" if at["angstrom"] else f"{at['voxels']:.2f} voxels")
        lines.append(f"half-map FSC 0.143: {where} (fsc_halves.png)")
    timings = report.get("timings_s", {})
    lines.append("timings: " + ", ".join(f"{name.removesuffix('_s').replace('_', ' ')} {seconds:.1f} s"
                                         for name, seconds in timings.items()))
    return lines


@dataclass
class _FitStage:
    """One fit and what it saw: the series after :func:`correct_optics` (``series``) and after
    :func:`contrast_series` (``fit_series``), the tilt axis on the raw images that oriented the CTF, the fit's
    start (None: the fit's own) and the report entries of the steps before it."""

    series: TiltSeries
    fit_series: TiltSeries
    axis: float
    init: Deformations | None
    result: FitResult
    entries: dict


def _fit_stage(
    raw: TiltSeries,
    config: ReconstructConfig,
    init: Deformations | None,
    resume: bool,
    checkpoint: Path,
    on_epoch: Callable[[dict], None],
    phase: Callable[[str], None],
    timings: dict[str, float],
) -> _FitStage:
    """Correct the optics of ``raw``, start (coarse alignment, specimen height) and fit; adds to ``timings``."""
    t0 = time.monotonic()
    axis = tilt_axis_on_images_deg(raw.tilt_axis_angle_deg, None if init is None else init.angles_deg)
    if raw.defocus_A is not None or raw.pre_exposure_e_per_A2 is not None:
        phase("correcting the CTF and exposure")
    series, optics = correct_optics(raw, config, tilt_axis_angle_deg=axis)
    fit_series, intensity = contrast_series(series, config)
    entries: dict = {"optics": optics, "intensity": intensity}
    _add_time(timings, "optics_s", t0)
    t0 = time.monotonic()
    entries["prealigned"] = init is None and not resume and config.deform.prealign and config.deform.shifts
    if entries["prealigned"]:
        init = coarse_start(fit_series, config)
    if init is not None and not resume:
        phase("locating the specimen's height")
        init, entries["start_centre_z_vox"] = centre_start(
            fit_series, init, config.thickness or default_thickness(fit_series.shape))
    fitter = Fitter(fit_series, config, init, ctf_tilt_axis_deg=axis)
    if resume:
        fitter.load_checkpoint(checkpoint)
    _add_time(timings, "setup_s", t0)
    phase("fitting")
    t0 = time.monotonic()
    result = run_fit(fitter, checkpoint_path=checkpoint, on_epoch=on_epoch)  # only rank 0 saves checkpoints
    _add_time(timings, "fit_s", t0)
    return _FitStage(series, fit_series, axis, init, result, entries)


def _add_time(timings: dict[str, float], name: str, since: float) -> None:
    timings[name] = timings.get(name, 0.0) + time.monotonic() - since



def _without_axis(series: TiltSeries) -> TiltSeries:
    """``series`` with a tilt-axis angle of 0, for a start that holds the axis in its rotations."""
    moved = copy.copy(series)
    moved.tilt_axis_angle_deg = 0.0
    return moved


def _axis_in_input_frame(entry: dict, turn_deg: float) -> None:
    """A report entry's tilt-axis directions (``*_deg`` but for ranges and turns), found on images turned by
    ``turn_deg``, as they lie on the input images (in place)."""
    for key in ("start_deg", "estimate_deg", "fitted_deg", "candidates_deg"):
        if turn_deg and entry.get(key) is not None:
            entry[key] = (np.asarray(entry[key], dtype=np.float64) + turn_deg).tolist()


def _after_first_fit(
    series: TiltSeries, config: ReconstructConfig, stage: _FitStage, timings: dict[str, float],
    phase: Callable[[str], None], turn_deg: float,
) -> tuple[Deformations | None, ReconstructConfig | None, dict | None, dict | None]:
    """The refinements of the first fit's alignment (tilt axis, gold beads; each as ``config.deform`` asks):
    the start and settings of a second fit (None, None when none is to run) and their report entries (None when
    off; their tilt axes on the input images, ``turn_deg`` more than on the turned ``series``). Adds to
    ``timings``."""
    t0 = time.monotonic()
    # On the specimen's height: the sharpness FBP's box holds the beads on both of its surfaces.
    start = centred_on_specimen(stage.fit_series, stage.result.deformations, stage.result.volume.box_shape_zyx[0])[0]
    used, refinement, beads = [], None, None
    if config.deform.axis_refine_deg > 0:
        phase("refining the tilt axis")
        moved, refinement = refine_tilt_axis(series, config, start)
        _axis_in_input_frame(refinement, turn_deg)
        if moved is not None:
            start = moved
            used.append((refinement, f"the tilt axis at {refinement['estimate_deg']:.2f} deg, "
                         f"{refinement['offset_px'] if refinement['offset_used'] else 0.0:+.1f} px across it"))
    if config.deform.bead_refinement:
        phase("following the gold beads")
        moved, beads = refine_by_beads(series, config, start)
        _axis_in_input_frame(beads, turn_deg)
        if moved is not None:
            start = moved
            used.append((beads, f"{beads['beads']} gold beads (axis at {beads['estimate_deg']:.2f} deg, shifts "
                         f"{beads['shift_rms_px']:.1f} px RMS)"))
    _add_time(timings, "axis_refine_s", t0)
    refit_config = remaining_budget(config, timings["fit_s"], [entry for entry, _ in used]) if used else None
    if refit_config is None:
        return None, None, refinement, beads
    phase("fitting again from the alignment corrected by " + " and ".join(what for _, what in used))
    return start, refit_config, refinement, beads


def remaining_budget(config: ReconstructConfig, fit_seconds: float, entries: list[dict]) -> ReconstructConfig | None:
    """``config`` for the second fit, its ``fit.max_minutes`` what the first left; None (and a note in each of
    the report ``entries`` that asked for it) when that is under :data:`REFIT_MIN_BUDGET` of the whole."""
    budget = config.fit.max_minutes
    if budget is None:
        return config
    left = budget - fit_seconds / 60
    if left < REFIT_MIN_BUDGET * budget:
        for entry in entries:
            entry.update(used=False, note="fit.max_minutes spent by the first fit: no second fit")
        return None
    refit = config.model_copy(deep=True)
    refit.fit.max_minutes = left
    return refit


def _fit_and_write(
    series: TiltSeries,
    config: ReconstructConfig,
    out_dir: Path,
    init: Deformations | None,
    resume: bool,
    on_epoch: Callable[[dict], None],
    phase: Callable[[str], None],
    source_path: Path | None,
    input_stack: InputStack,
    names: OutputNames,
) -> dict:
    """:func:`reconstruct` but for its log."""
    timings: dict[str, float] = {}
    writer = distributed_rank()[0] == 0
    if writer:
        save_config(out_dir / "config.yaml", config)
    # The tomogram's Y runs along the tilt axis: a detector whose axis lies nearer its X axis is turned first.
    turns = frame_quarter_turns(tilt_axis_on_images_deg(series.tilt_axis_angle_deg,
                                                        None if init is None else init.angles_deg))
    turn_deg = 90.0 * turns
    input_shape, factor = series.shape, config.bin
    series = series.binned(factor).quarter_turned(turns)  # binned first: a copy of the binned stack only
    if init is not None:
        series, init = _without_axis(series), init.quarter_turned(turns)
        if factor != 1:
            init = init.scaled(1 / factor, series.shape)
    ckpt, refit_start = out_dir / "checkpoint.pt", out_dir / REFIT_START_NAME
    axis_search = refinement = beads = None
    if resume and refit_start.is_file():  # the run was in its second fit
        init, series = read_deformations(refit_start, series.shape), _without_axis(series)
        refinement = {"used": True, "note": f"resumed the second fit from {REFIT_START_NAME}"}
    if init is None and config.deform.axis_search_deg > 0:
        t0 = time.monotonic()
        phase("searching the tilt axis")
        series, axis_search = search_tilt_axis(series, config)
        _axis_in_input_frame(axis_search, turn_deg)
        _add_time(timings, "axis_search_s", t0)
    stage = _fit_stage(series, config, init, resume, ckpt, on_epoch, phase, timings)
    if init is None and not resume:
        start, refit_config, refinement, beads = _after_first_fit(series, config, stage, timings, phase, turn_deg)
        if refit_config is not None:
            if writer:
                write_deformations(refit_start, start)
                ckpt.unlink(missing_ok=True)  # the first fit's: a resumed run continues the second
            series = _without_axis(series)
            stage = _fit_stage(series, refit_config, start, False, ckpt, on_epoch, phase, timings)
    if not writer:
        return stage.result.report
    raw, series, fit_series, axis, result = series, stage.series, stage.fit_series, stage.axis, stage.result

    t0 = time.monotonic()
    voxel = series.pixel_size_A
    width = series.shape[1]
    thickness = result.volume.box_shape_zyx[0]
    d = result.deformations
    start_check = None
    if stage.init is not None and not resume:
        phase("checking the alignment against its start")
        start = copy.deepcopy(stage.init)
        start.angles_deg = start.angles_deg - series.tilt_axis_angle_deg
        d, start_check = check_against_start(fit_series, start, d, thickness)
        timings["start_check_s"] = time.monotonic() - t0
        t0 = time.monotonic()

    phase("sampling the tomogram")
    d, found_z, centre_z = centred_on_specimen(fit_series, d, thickness)
    translation = np.asarray(result.translation_xyz, dtype=np.float64) - [0.0, 0.0, centre_z]
    d.extra.update(gauge="common shift removed but for the specimen's height (specimen_centre_z_vox); the tomogram is "
                   "translated by gauge_translation_xyz_vox instead", gauge_translation_xyz_vox=translation.tolist(),
                   specimen_centre_z_vox=centre_z)
    sign, label = output_polarity(config.polarity, input_stack.inverted)
    tomogram = sign * sample_tomogram(result.volume, translation, result.density_scale, width)
    half_maps = None
    if result.half_volume is not None:
        second = sign * sample_tomogram(result.half_volume, translation, result.density_scale, width)
        half_maps = write_half_maps(out_dir, names, tomogram, second, voxel, config.fit.half_maps, label)
        tomogram = (tomogram + second) / 2
    write_mrc(out_dir / names.tomogram, tomogram, voxel, label=label)
    timings["sample_s"] = time.monotonic() - t0
    t0 = time.monotonic()
    phase("aligning the series and FBP")
    written = d.quarter_turned(-turns)
    if factor != 1:
        written = written.scaled(factor, input_shape)
    write_deformations(out_dir / "deformations.json", written)
    exported = write_alignment_files(out_dir, names, written, input_stack, config,
                                     None if voxel is None else voxel / factor, tomogram.shape, source_path)
    shown = correct_optics(raw, config, False, axis)[0] if config.ctf.correction == "model" else series
    # Aligned about each image's mean, so that what the warp brings in from outside the field is the mean (as
    # IMOD's newstack fills it), not a zero edge that the FBP of images on a level would streak.
    images = torch.tensor(shown.whole())
    level = images.mean(dim=(-2, -1), keepdim=True)
    aligned = align_series(images - level, d)
    write_mrc(out_dir / names.aligned, sign * (aligned + level).numpy(), voxel, stack=True, label=label)
    thickness = tomogram.shape[0]
    write_mrc(out_dir / names.fbp, sign * fbp(aligned, d.tilt_angles_deg, thickness).numpy(), voxel, label=label)
    link_short_names(out_dir, names)
    timings["outputs_s"] = time.monotonic() - t0

    report = dict(result.report)
    report["timings_s"] = timings
    report.update(stage.entries)
    report["gauge_translation_xyz_vox"] = translation.tolist()
    report["specimen_centre_z_vox"] = {"estimate": found_z, "applied": centre_z}
    report.update(exported)
    report["outputs"] = {"stem": names.stem, "tomogram": names.tomogram, "aligned": names.aligned,
                         "fbp": names.fbp}
    report["polarity"] = {"setting": config.polarity, "input_inverted": input_stack.inverted, "label": label}
    report["bin"] = factor
    if config.deform.bead_refinement:
        found = refine_by_beads(raw, config, d)[1]
        report["bead_residual"] = {key: found.get(key) for key in ("measure", "bin", "beads", "residual_px",
                                                                   "solved_residual_px", "rotation_deg")}
    if start_check is not None:
        report["start_check"] = start_check
    if axis_search is not None:
        report["tilt_axis_search"] = axis_search
    if refinement is not None:
        report["tilt_axis_refinement"] = refinement
    if beads is not None:
        report["bead_refinement"] = beads
    if half_maps is not None:
        report["half_maps"] = half_maps
    report["input"] = {
        "n_tilts": series.n_tilts,
        "n_stack_views": len(input_stack.tilt_angles_deg),
        "detector_shape": list(input_shape),
        "quarter_turns": turns,
        "fit_detector_shape": list(series.shape),
        "pixel_size_A": voxel,
        "tilt_axis_angle_deg": axis + turn_deg,
    }
    write_json(out_dir / "report.json", report)
    return report
