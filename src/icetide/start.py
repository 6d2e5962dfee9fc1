"""Where a fit starts and how its alignment is checked: the series as the fit sees it, the tilt axis (searched
before the fit, refined after it with the fitted shifts), the coarse alignment, the specimen's height, and the
comparison of a fitted alignment with its start. :func:`icetide.reconstruct.reconstruct` runs these steps in
order (docs/CLI.md, "What it does"); each works on a :class:`icetide.data.TiltSeries` and
:class:`icetide.deform.Deformations` and can be used on its own.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from .beads import rotated, solve_bead_rotation, track_beads
from .config import ReconstructConfig
from .consistency import even_odd_fsc
from .data import TiltSeries
from .deform import Deformations, gauge_shifts, remove_gauge
from .geometry import default_thickness
from .intensity import fit_contrast, has_levels
from .prealign import (
    coarse_alignment, estimate_tilt_axis, estimate_tilt_axis_by_sharpness, refine_axis_offset_by_sharpness,
    refine_by_projection_matching, refine_tilt_axis_by_sharpness,
)
from .classical import align_series, fbp, standardised

__all__ = [
    "axis_search_bin", "centre_start", "centred_on_specimen", "check_against_start", "coarse_start",
    "contrast_series", "refine_by_beads", "refine_tilt_axis", "search_tilt_axis", "specimen_centre_z",
    "turn_trusted",
]

# Specimen heights (voxels) within this of the box's middle are left alone: for simulated specimens filling
# the box, specimen_centre_z found 2.5-3.2 voxels where the truth is 0 (docs/CONVENTIONS.md "Gauge").
CENTRE_TOLERANCE_VOX = 4.0
# Lateral blur (pixels) of the FBP before its slices' structure is measured.
CENTRE_BLUR_PX = 2.0
# The sharpness search runs on images binned to about this pixel size (gold beads of 5-15 nm a few pixels
# wide), as long as they keep AXIS_SEARCH_MIN_SIDE_PX pixels per side.
AXIS_SEARCH_PIXEL_A = 20.0
AXIS_SEARCH_MIN_SIDE_PX = 80
# The tilt-axis refinement proposes a second fit when its estimate of the axis' direction differs from the fitted
# one by at least AXIS_REFIT_MIN_DEG (degrees), or its estimate of the axis' lateral position (searched within
# +-AXIS_OFFSET_RANGE of the width) by at least AXIS_OFFSET_MIN_PX (pixels of the search's binning).
AXIS_REFIT_MIN_DEG = 0.25
AXIS_OFFSET_RANGE = 0.08
AXIS_OFFSET_MIN_PX = 1.0
# The bead refinement is used when at least BEAD_MIN_COUNT beads are followed, their residual with the solved
# shifts is at most BEAD_MAX_RESIDUAL_PX and those shifts move the views by at least BEAD_MIN_MOVE_PX RMS (both
# in pixels of AXIS_SEARCH_PIXEL_A, the search's aim: a bead is a few pixels wide there; scaled to the search's
# own pixels where a small field keeps it finer).
BEAD_MIN_COUNT = 4
BEAD_MAX_RESIDUAL_PX = 1.0
BEAD_MIN_MOVE_PX = 0.5
# ... or turn the tilt axis by at least this many degrees (found inside +-2 degrees), in at most BEAD_TURN_ROUNDS
# turns (each followed by the beads followed again in the turned views).
BEAD_MIN_TURN_DEG = 0.05
BEAD_TURN_ROUNDS = 2
# A turn is used only when both halves of the beads (6 beads at least: two disjoint sets, each an independent
# estimate) determine it (their best turn inside the range) and agree on it within this many degrees or half the
# turn, whichever is larger (a few beads, or beads caught with their neighbours, give a turn that others would not).
BEAD_TURN_AGREEMENT_DEG = 0.15
# ... and only when it is at least this many of its standard errors (icetide.beads.turn_standard_error): a few
# beads near the centre of a small field, or all at one depth, pin a turn loosely however well they agree.
BEAD_TURN_MIN_SIGMA = 3.0
# How much higher (relative) the start's even/odd score must be for the start to replace the fit's alignment.
START_MARGIN = 0.02


def axis_search_bin(series: TiltSeries) -> int:
    """Binning of the sharpness search: towards :data:`AXIS_SEARCH_PIXEL_A` per pixel, keeping at least
    :data:`AXIS_SEARCH_MIN_SIDE_PX` pixels per side; 1 when the pixel size is unknown."""
    if series.pixel_size_A is None:
        return 1
    factor = max(1, int(round(AXIS_SEARCH_PIXEL_A / series.pixel_size_A)))
    while factor > 1 and min(series.shape) // factor < AXIS_SEARCH_MIN_SIDE_PX:
        factor -= 1
    return factor


def search_tilt_axis(series: TiltSeries, config: ReconstructConfig) -> tuple[TiltSeries, dict]:
    """The series with its tilt-axis angle replaced by an estimate within ``+-config.deform.axis_search_deg`` of
    its own, and the report entry. ``config.deform.axis_search`` picks the measure: ``sharpness`` of the
    coarsely aligned FBP (:func:`icetide.prealign.estimate_tilt_axis_by_sharpness`, on the series as the fit
    sees it, :func:`contrast_series`) or the consistency of the ``profiles`` along the axis
    (:func:`icetide.prealign.estimate_tilt_axis`; an object inside the field of view across the axis). An
    estimate in the outer step of the range (the measure still improving at the edge), or a sharpness that does
    not peak (see :func:`icetide.prealign.estimate_tilt_axis_by_sharpness`), is not trusted: the
    series keeps its angle and the entry says so. For ``profiles`` the entry's ``misfit_contrast`` (1 - min /
    max of the misfit over the range) says how sharp the choice was (docs/BENCHMARKS.md "Tilt-axis search")."""
    search_deg = config.deform.axis_search_deg
    step = min(0.5, search_deg / 4)
    start = series.tilt_axis_angle_deg
    entry: dict = {"start_deg": start, "search_deg": search_deg, "method": config.deform.axis_search}
    if config.deform.axis_search == "sharpness":
        # Binned towards AXIS_SEARCH_PIXEL_A where the images stay large enough: gold beads a few pixels wide
        # show a misaligned axis better, and the same number of voxels covers more depth (a specimen off centre).
        factor = axis_search_bin(series)
        searched = series.binned(factor) if factor > 1 else series
        images = contrast_series(searched, config)[0].whole()
        thickness = config.thickness or default_thickness(series.shape)
        found = estimate_tilt_axis_by_sharpness(images, series.tilt_angles_deg, start, search_deg, step, thickness)
        entry.update(candidates_deg=found["candidates_deg"], sharpness=found["sharpness"],
                     parabola_r2=found["parabola_r2"], bin=factor)
        best = found["candidates_deg"][int(np.argmax(found["sharpness"]))]
        if not found["peaked"]:
            entry.update(estimate_deg=found["tilt_axis_angle_deg"], used=False,
                         note="the sharpness does not peak over the range (no dense features such as gold beads?): "
                         "the start angle was kept")
            return series, entry
    else:
        found = estimate_tilt_axis(series.whole(), series.tilt_angles_deg, start, search_deg, step)
        misfit = np.asarray(found["misfit"])
        entry.update(candidates_deg=found["candidates_deg"], misfit=found["misfit"],
                     misfit_contrast=float(1 - misfit.min() / max(misfit.max(), 1e-300)))
        best = found["tilt_axis_angle_deg"]
    estimate = found["tilt_axis_angle_deg"]
    entry["estimate_deg"] = estimate
    entry["used"] = trusted = abs(best - start) < search_deg - step + 1e-9 and abs(estimate - start) < search_deg
    if not trusted:
        entry["note"] = "the best candidate lies at the edge of the search: the start angle was kept"
        return series, entry
    moved = copy.copy(series)
    moved.tilt_axis_angle_deg = estimate
    return moved, entry


def contrast_series(series: TiltSeries, config: ReconstructConfig) -> tuple[TiltSeries, dict]:
    """The series as the fit sees it (:func:`icetide.intensity.fit_contrast` with ``config.intensity``) and the
    report entry; the geometry and optics are unchanged."""
    settings = config.intensity
    sigma = settings.highpass_px(series.pixel_size_A, has_levels(series.images))
    images, info = fit_contrast(series.images, settings.levels, sigma)
    halves = None if series.half_images is None else fit_contrast(series.half_images, settings.levels, sigma)[0]
    out = TiltSeries(images, series.tilt_angles_deg, series.pixel_size_A, series.tilt_axis_angle_deg,
                     series.defocus_A, series.pre_exposure_e_per_A2, halves)
    return out, info


def check_against_start(
    series: TiltSeries, start: Deformations, result: Deformations, thickness: int
) -> tuple[Deformations, dict]:
    """The better of a fit's starting and final alignment by :func:`icetide.consistency.even_odd_fsc` of
    ``series`` (the fit's images), and the report entry. ``start``: the deformations the fit started from, the
    tilt axis included in its rotations; both are compared with their gauge removed. The start is kept when it
    scores more than :data:`START_MARGIN` (relative) above the fit: at -10 dB the score of one alignment moves
    by about 1 % with the noise, and there the fit is the better one by its known errors. A fit never ends
    worse than its start without saying so: the entry's ``kept`` names the one returned."""
    residual, _ = remove_gauge(start.shifts_px, start.tilt_angles_deg)
    start = Deformations(start.tilt_angles_deg, residual, start.angles_deg, start.local_px, start.detector_shape,
                         start.local_interpolation)
    images = series.whole()
    scores = {name: even_odd_fsc(images, d, thickness)["score"] for name, d in (("start", start), ("fit", result))}
    kept = "start" if scores["start"] > (1 + START_MARGIN) * scores["fit"] else "fit"
    entry = {"measure": "even/odd-tilt FSC score (icetide.consistency.even_odd_fsc)", "start_score": scores["start"],
             "fit_score": scores["fit"], "margin": START_MARGIN, "kept": kept}
    if kept == "fit" and scores["start"] > scores["fit"]:
        entry["note"] = "the start scored higher, within the margin of the score's noise: the fit was kept"
    if kept == "start":
        entry["note"] = ("the fitted alignment scored below its start: the alignment outputs (deformations, .xf, "
                         "aligned stack, FBP) are the start's; the tomogram is the volume fitted with the rejected one")
    return (result if kept == "fit" else start), entry


def specimen_centre_z(series: TiltSeries, d: Deformations, thickness: int) -> float:
    """Height of the specimen's centre (voxels) in the frame of the series aligned by ``d``.

    The aligned images (each standardised) are reconstructed by FBP over twice ``thickness`` (the specimen may
    lie partly outside the tomogram's box). Each slice's structure is its standard deviation over the central
    88 % of its area, after clipping the voxels to their 1st-99th percentiles (gold beads would otherwise make
    their own layer the specimen) and a lateral Gaussian blur of :data:`CENTRE_BLUR_PX` (noise). The specimen
    spans the slices where the structure exceeds half-way from the empty slices' level (the 20th percentile) to
    its peak; the centre is the middle of that span (its edges, not its centroid: the content of a cell is not
    spread evenly in depth), at most ``thickness / 2`` from the middle."""
    from scipy import ndimage

    aligned = standardised(align_series(torch.as_tensor(series.whole(), dtype=torch.float32), d))
    depth = 2 * thickness
    volume = fbp(aligned, d.tilt_angles_deg, depth).numpy()
    ny, nx = volume.shape[1:]
    r, c = round(0.06 * ny), round(0.06 * nx)
    core = volume[:, r : ny - r, c : nx - c]
    core = np.clip(core, *np.percentile(core, [1, 99]))
    structure = ndimage.gaussian_filter(core, (0, CENTRE_BLUR_PX, CENTRE_BLUR_PX)).std(axis=(1, 2))
    half = (np.percentile(structure, 20) + structure.max()) / 2
    above = np.flatnonzero(structure >= half)
    if above.size == 0 or not structure.max() > np.percentile(structure, 20):
        return 0.0
    first, last = int(above[0]), int(above[-1])

    def crossing(inside: int, outside: int) -> float:
        """Where the structure crosses ``half`` between a slice above it and its neighbour (linear)."""
        if not 0 <= outside < depth:
            return float(inside)
        a, b = structure[inside], structure[outside]
        return inside + (outside - inside) * float((a - half) / max(a - b, 1e-30))

    middle = (crossing(first, first - 1) + crossing(last, last + 1)) / 2 - (depth - 1) / 2
    return float(np.clip(middle, -thickness / 2, thickness / 2))  # at a bound: not found


def centred_on_specimen(series: TiltSeries, d: Deformations, thickness: int) -> tuple[Deformations, float, float]:
    """``d`` (rotations holding the tilt axis) moved by the z translation (the gauge) that puts the specimen's
    height (:func:`specimen_centre_z`) in the middle of a box of ``thickness`` voxels, when it is further off
    than the estimate's own error (:data:`CENTRE_TOLERANCE_VOX`) and was found inside the box's reach; returns
    the moved copy, the height found and the height applied (voxels)."""
    found = specimen_centre_z(series, d, thickness)
    applied = found if CENTRE_TOLERANCE_VOX < abs(found) < thickness / 2 else 0.0
    moved = copy.deepcopy(d)
    moved.shifts_px = d.shifts_px + gauge_shifts([0.0, 0.0, applied], d.tilt_angles_deg)
    return moved, found, applied


def centre_start(series: TiltSeries, start: Deformations, thickness: int) -> tuple[Deformations, dict]:
    """The starting deformations moved by a z translation (the gauge) that puts the specimen's height, as
    :func:`specimen_centre_z` finds it in the series aligned by ``start``, in the middle of the fit's box.

    A specimen off the tilt axis' height otherwise sticks out of a box as thick as itself: the fit cannot
    represent what lies outside. ``start``'s rotations exclude the series' tilt axis (as the fit holds them).
    Applied under the same conditions as the outputs' centring; returns ``(start, report entry)``."""
    turned = copy.deepcopy(start)
    turned.angles_deg = start.angles_deg - series.tilt_axis_angle_deg
    _, found, applied = centred_on_specimen(series, turned, thickness)
    moved = copy.deepcopy(start)
    moved.shifts_px = start.shifts_px + gauge_shifts([0.0, 0.0, applied], start.tilt_angles_deg)
    return moved, {"estimate": found, "applied": applied}


def coarse_start(series: TiltSeries, config: ReconstructConfig) -> Deformations:
    """Starting deformations with the shifts of :func:`icetide.prealign.coarse_alignment` about the series' tilt
    axis and no rotation (the fit adds the tilt-axis rotation itself), on ``config.deform``'s local grid."""
    d = Deformations.identity(
        series.tilt_angles_deg, series.shape, config.deform.local_grid, config.deform.local_interpolation
    )
    coarse = coarse_alignment(series.whole(), series.tilt_angles_deg, series.tilt_axis_angle_deg)
    rounds = config.deform.projection_matching
    if rounds > 0:
        depth = 2 * (config.thickness or default_thickness(series.shape))
        coarse = refine_by_projection_matching(series.whole(), coarse, depth, rounds)
    d.shifts_px = coarse.shifts_px
    return d


def refine_tilt_axis(
    raw: TiltSeries, config: ReconstructConfig, fitted: Deformations
) -> tuple[Deformations | None, dict]:
    """The start of a second fit about a better placed tilt axis, or None, and the report entry.

    On ``raw`` binned as the tilt-axis search bins it and seen as the fit sees it (:func:`contrast_series`),
    with the shifts and rotations of ``fitted`` (a fit's deformations of ``raw``, the axis in their rotations):
    first the axis' lateral position, a shift across it common to every view within
    ``+-`` :data:`AXIS_OFFSET_RANGE` of the width (:func:`icetide.prealign.refine_axis_offset_by_sharpness`),
    then its direction within ``+-config.deform.axis_refine_deg`` of the fitted one
    (:func:`icetide.prealign.refine_tilt_axis_by_sharpness`), each by the sharpness of the FBP. Either is
    nearly invisible to the fit's pixel loss once the volume has formed about it (a coarse alignment about a
    wrong axis hides part of the error in its shifts), while the blur it leaves on gold beads is plain; a second
    fit started from the corrected alignment ends nearer both (docs/RESULTS.md). Each estimate is used when the
    sharpness peaks inside its range and it moves the axis by at least :data:`AXIS_OFFSET_MIN_PX` (binned
    pixels) or :data:`AXIS_REFIT_MIN_DEG`; the start is ``fitted`` with the offset added to its shifts and the
    new direction in place of its own (per-tilt rotations, shifts and local fields otherwise kept)."""
    factor, images, scaled = _search_view(raw, config, fitted)
    binned_shape = images.shape[1:]
    thickness = config.thickness or default_thickness(raw.shape)
    entry: dict = {"measure": "sharpness with the fitted shifts (icetide.prealign.refine_axis_offset_by_sharpness, "
                   "refine_tilt_axis_by_sharpness)", "bin": factor}
    # The lateral position first: its error, tens of pixels on a thick specimen, blurs more than the direction's.
    reach = max(1.0, round(AXIS_OFFSET_RANGE * binned_shape[1]))
    step = max(1.0, round(reach / 10))
    moved = _offset_used(refine_axis_offset_by_sharpness(images, scaled, reach, step, thickness), reach, entry)
    offset = moved * factor
    scaled.shifts_px = scaled.shifts_px + np.array([moved, 0.0])
    search = config.deform.axis_refine_deg
    found = refine_tilt_axis_by_sharpness(images, scaled, search, min(0.5, search / 4), thickness)
    estimate, before = found["tilt_axis_angle_deg"], found["fitted_axis_deg"]
    best = found["candidates_deg"][int(np.argmax(found["sharpness"]))]
    entry.update(fitted_deg=before, estimate_deg=estimate, candidates_deg=found["candidates_deg"],
                 sharpness=found["sharpness"], parabola_r2=found["parabola_r2"])
    note = _not_moved(best - before, estimate - before, search, found["peaked"], AXIS_REFIT_MIN_DEG,
                      " (no dense features such as gold beads?)", "deg of the fitted axis")
    entry["direction_used"] = note is None
    if note is not None:
        entry["direction_note"] = note
    if not (entry["direction_used"] or entry["offset_used"]):
        return None, {**entry, "used": False, "note": "neither the axis' position nor its direction moved: no second fit"}
    start = copy.deepcopy(fitted)
    start.shifts_px = fitted.shifts_px + np.array([offset, 0.0])
    if entry["direction_used"]:
        start.angles_deg = fitted.angles_deg + before - estimate
    else:
        entry["estimate_deg"] = before
    return start, {**entry, "used": True}


def refine_by_beads(raw: TiltSeries, config: ReconstructConfig, d: Deformations) -> tuple[Deformations | None, dict]:
    """``d`` corrected by the gold beads (the tilt axis' direction and the per-view shifts that make the beads
    consistent), or None when they are not used, and the report entry.

    On ``raw`` binned as the tilt-axis search bins it and seen as the fit sees it (:func:`contrast_series`),
    aligned by ``d`` (deformations of ``raw``, the axis in their rotations, centred on the specimen's height):
    :func:`icetide.beads.track_beads` finds the beads in the FBP (``config.thickness`` voxels), follows them
    through the views and solves the shifts; :func:`icetide.beads.solve_bead_rotation` turns the views to the
    direction that fits the beads best (when :func:`turn_trusted`), where they are followed and solved again
    (up to :data:`BEAD_TURN_ROUNDS` turns). A fit's pixel loss weighs the whole
    specimen, whose depth and lateral position it trades against the shifts; the beads, small and dense, pin
    each view (as fiducials do for IMOD's tiltalign). Used when at least :data:`BEAD_MIN_COUNT` beads are
    followed, their residual is at most :data:`BEAD_MAX_RESIDUAL_PX` and below the residual of ``d`` as it is,
    and the correction is not negligible (shifts of :data:`BEAD_MIN_MOVE_PX` RMS or the turn). The entry gives
    ``beads``, ``residual_px`` (the mean bead residual of ``d`` as it is), ``solved_residual_px`` (corrected),
    ``shift_rms_px`` (pixels of ``raw``), ``rotation_deg`` (the turn applied), ``turns`` (each round's
    estimate, ``rotation_deg``, its ``standard_error_deg``, and those of the subsets of the beads:
    ``subsets_deg``, ``subsets_inside``, ``subsets_spread_deg``), ``fitted_deg`` and ``estimate_deg`` (the tilt
    axis before and after) and ``bin``."""
    factor, images, _ = _search_view(raw, config, d)
    thickness = config.thickness or default_thickness(raw.shape)
    search_px_A = None if raw.pixel_size_A is None else raw.pixel_size_A * factor
    diameter_px = None if search_px_A is None else 10 * config.deform.bead_diameter_nm / search_px_A
    entry: dict = {"measure": "gold beads followed through the aligned views (icetide.beads.track_beads)",
                   "bin": factor}
    current, turn, start = copy.deepcopy(d), 0.0, None
    for round_ in range(BEAD_TURN_ROUNDS + 1):
        scaled = current.scaled(1 / factor, images.shape[1:]) if factor > 1 else current
        found = track_beads(align_series(torch.as_tensor(images), scaled), d.tilt_angles_deg, thickness,
                            bead_diameter_px=diameter_px)
        entry["beads"] = found["beads"]
        if found["beads"] < BEAD_MIN_COUNT:
            return None, {**entry, "used": False, "note": f"fewer than {BEAD_MIN_COUNT} beads followed"}
        start = found["residual_start_px"] if start is None else start
        if round_ == BEAD_TURN_ROUNDS:
            break
        # Turned, the beads are followed again: the first measurements were taken about the unturned model.
        found_turn = solve_bead_rotation(found["seen"], d.tilt_angles_deg)
        delta = found_turn["rotation_deg"]
        entry.setdefault("turns", []).append({key: found_turn[key] for key in (
            "rotation_deg", "inside", "standard_error_deg", "subsets", "subsets_deg", "subsets_inside",
            "subsets_spread_deg")})
        if not turn_trusted(found_turn):
            break
        current, turn = _turned(current, delta), turn + delta
    move = float(np.sqrt((found["shifts_px"] ** 2).sum(axis=1).mean()))
    fitted_axis = -float(np.median(d.angles_deg))
    entry.update(residual_px=start * factor, solved_residual_px=found["residual_px"] * factor,
                 shift_rms_px=move * factor, rotation_deg=turn, fitted_deg=fitted_axis, estimate_deg=fitted_axis - turn)
    per_px = 1.0 if search_px_A is None else AXIS_SEARCH_PIXEL_A / search_px_A
    if not found["residual_px"] <= min(BEAD_MAX_RESIDUAL_PX * per_px, start):
        return None, {**entry, "used": False, "note": "the beads are not followed consistently"}
    if move < BEAD_MIN_MOVE_PX * per_px and not turn:
        return None, {**entry, "used": False, "note": f"the beads move the views by less than "
                      f"{BEAD_MIN_MOVE_PX * per_px * factor:.2g} px RMS and no turn of theirs is trusted (see "
                      f"turns: at least {BEAD_MIN_TURN_DEG} deg and {BEAD_TURN_MIN_SIGMA:g} standard errors, from "
                      f"6 beads whose halves agree)"}
    current.shifts_px = current.shifts_px + found["shifts_px"] * factor
    return current, {**entry, "used": True}


def turn_trusted(found: dict) -> bool:
    """Whether a turn of :func:`icetide.beads.solve_bead_rotation` (its returned dict) is used: inside the search
    range, at least :data:`BEAD_MIN_TURN_DEG` and :data:`BEAD_TURN_MIN_SIGMA` standard errors, and the two halves
    of the beads both determine it and agree within :data:`BEAD_TURN_AGREEMENT_DEG` or half the
    turn."""
    delta, spread = abs(found["rotation_deg"]), found["subsets_spread_deg"]
    significant = delta >= max(BEAD_MIN_TURN_DEG, BEAD_TURN_MIN_SIGMA * found["standard_error_deg"])
    agreed = spread is not None and spread <= max(BEAD_TURN_AGREEMENT_DEG, delta / 2)
    return bool(found["inside"] and significant and agreed)


def _turned(d: Deformations, delta_deg: float) -> Deformations:
    """``d`` with every aligned image turned by ``delta_deg`` counter-clockwise about its centre: ``alpha_m +
    delta`` and the shifts turned with the frame (docs/CONVENTIONS.md, the ideal point ``p`` seen at
    ``R(-alpha) (p + tau)``)."""
    moved = copy.deepcopy(d)
    moved.angles_deg = d.angles_deg + delta_deg
    moved.shifts_px = rotated(d.shifts_px, delta_deg)
    return moved


def _search_view(raw: TiltSeries, config: ReconstructConfig, d: Deformations) -> tuple[int, np.ndarray, Deformations]:
    """``raw`` as the refinements see it: the binning of the tilt-axis search, the images ``(M, ny, nx)`` at
    that binning as the fit sees them (:func:`contrast_series`) and a copy of ``d`` scaled to them."""
    factor = axis_search_bin(raw)
    binned = raw.binned(factor) if factor > 1 else raw
    images = contrast_series(binned, config)[0].whole()
    return factor, images, d.scaled(1 / factor, binned.shape) if factor > 1 else copy.deepcopy(d)


def _offset_used(found: dict, reach: float, entry: dict) -> float:
    """The lateral offset of :func:`icetide.prealign.refine_axis_offset_by_sharpness` to apply (binned pixels;
    0 when not trusted), its part of the report ``entry`` filled in."""
    best = found["candidates_px"][int(np.argmax(found["sharpness"]))]
    entry.update(offset_px=found["offset_px"] * entry["bin"], offset_candidates_px=found["candidates_px"],
                 offset_sharpness=found["sharpness"], offset_parabola_r2=found["parabola_r2"])
    note = _not_moved(best, found["offset_px"], reach, found["peaked"], AXIS_OFFSET_MIN_PX, "",
                      "px of the fitted position")
    entry["offset_used"] = note is None
    if note is None:
        return found["offset_px"]
    entry["offset_note"] = note
    return 0.0


def _not_moved(best: float, estimate: float, reach: float, peaked: bool, min_move: float, no_peak_hint: str,
               unit: str) -> str | None:
    """Why a refinement's estimate is not used (None: it is): its best candidate ``best`` at the edge of the
    range ``+-reach``, a sharpness that does not peak, or an ``estimate`` within ``min_move`` (``unit``) of the
    fitted value; ``best`` and ``estimate`` relative to the fitted value."""
    if abs(best) >= reach - 1e-9:
        return "the best candidate lies at the edge of the range"
    if not peaked:
        return "the sharpness does not peak over the range" + no_peak_hint
    if abs(estimate) < min_move:
        return f"within {min_move} {unit}"
    return None
