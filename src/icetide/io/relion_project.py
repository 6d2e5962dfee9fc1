"""A RELION-5 tomography project as input: a job's tilt-series STAR and the per-tilt images it names.

What RELION-5 writes, as read in the source of RELION 5 (github.com/3dem/relion, master with ver5.0 merged,
commit 73f0a3c0; paths below are in that repository):

- **Global STAR** (block ``data_global``, one row per tilt series): ``tilt_series.star`` of ImportTomo
  (``src/tomography_python_programs/import_tilt_series/serialem.py``), ``corrected_tilt_series.star`` of MotionCorr
  (``src/motioncorr_runner.cpp``, ``generateLogFilePDFAndWriteStarFiles``), ``tilt_series_ctf.star`` of CtfFind
  (``src/ctffind_runner.cpp``); later jobs (``aligned_tilt_series.star``, ``selected_tilt_series.star``,
  ``tomograms.star``) keep the layout. Columns: ``rlnTomoName``, ``rlnTomoTiltSeriesStarFile`` (the per-series STAR,
  ``<job>/tilt_series/<name>.star``), ``rlnVoltage`` (kV), ``rlnSphericalAberration`` (mm),
  ``rlnAmplitudeContrast`` (fraction), ``rlnMicrographOriginalPixelSize`` (A, of the movies), ``rlnTomoHand``
  (+1, or -1 with ImportTomo's "Invert defocus handedness?", the GUI default as for EMPIAR-10164;
  ``src/pipeline_jobs.cpp``), and ``rlnTomoTiltSeriesPixelSize`` (A, of the motion-corrected images: MotionCorr sets
  it to the original pixel size times its binning; ImportTomo writes it only for images already motion-corrected).
  Units from ``src/metadata_label.h``.
- **Per-series STAR** (one block ``data_<rlnTomoName>``, which RELION requires: ``TomogramSet::read`` in
  ``src/jaz/tomography/tomogram_set.cpp``; one row per tilt). ImportTomo writes the rows in the mdoc's
  ``DateTime`` order and MotionCorr/CtfFind re-sort them by ``rlnMicrographPreExposure``
  (``TomogramSet::convertBackFromSingleMetaDataTable``): acquisition order (the example project
  ``src/tomography_python_programs/_tests/test_project_directory`` has tilts 0, 3, -3, -6, 6, ...). ImportTomo:
  ``rlnMicrographMovieName`` and ``rlnTomoTiltMovieFrameCount`` (the movies; or, for images already motion-corrected,
  ``rlnMicrographName`` instead), ``rlnTomoNominalStageTiltAngle`` (degrees, the mdoc's ``TiltAngle``),
  ``rlnTomoNominalTiltAxisAngle`` (the job's "Tilt axis angle", the same on every row), ``rlnMicrographPreExposure``
  (e/A^2 before the tilt), ``rlnTomoNominalDefocus`` (the mdoc's ``TargetDefocus``, micrometres; not used here).
  MotionCorr adds ``rlnMicrographName`` (``<job>/frames/<movie>.mrc``, one motion-corrected MRC per tilt) and, with
  its even/odd split, ``rlnMicrographNameEven``/``rlnMicrographNameOdd`` (``_EVN.mrc``/``_ODD.mrc``: aligned sums,
  without dose weighting, of the even and of the odd frames, each holding about half the exposure).
  CtfFind adds ``rlnDefocusU``, ``rlnDefocusV`` (A, positive = underfocus), ``rlnDefocusAngle`` (degrees between X
  and the U direction, CTFFIND's azimuth), ``rlnCtfAstigmatism``, ``rlnCtfFigureOfMerit``, ``rlnCtfMaxResolution``
  (A) and ``rlnCtfImage``.
- **Tilt axis**: ImportTomo's option is "Nominal value for the tilt-axis rotation angle (positive is CCW from Y)"
  (``src/pipeline_jobs.cpp``), default 85, the value SerialEM reports; RELION hands the first row's value to
  AreTomo (``-TiltAxis``) and IMOD as their rotation angle (``align_tilt_series/{aretomo,imod}``). That is
  icetide's ``tilt_axis_angle_deg`` as it is, as for an ``.mdoc``'s ``Tilt axis angle`` (:mod:`icetide.io.mdoc`).
- **Paths** are relative to the project folder RELION runs in: ``TomogramSet::loadTomogram`` opens each row's
  ``rlnMicrographName`` as written and stacks them in row order. Here the project folder is the STAR's folder or
  the first folder above it in which the relative paths exist (jobs live in ``<project>/<JobType>/jobNNN/``).

How icetide uses it: a series' views are stacked in order of tilt angle (stable), as RELION does when it hands a
series to IMOD or AreTomo ("Order is important in IMOD, sort by tilt angle"), so that the aligned stack,
``STEM.tlt`` and ``STEM.xf`` form an ordinary IMOD tilt series and ``--exclude`` counts views as in an
IMOD or AreTomo3 stack; ``STEM.star`` names each row's own ``rlnMicrographName``, so its order does not
matter to RELION. Defocus (U, V and angle) and pre-exposure follow the views; ``rlnTomoHand`` is icetide's
``ctf.defocus_hand`` (:mod:`icetide.io.relion`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import IcetideError
from .ctf_files import _star_column, read_defocus, read_pre_exposure
from .relion import _read_star

__all__ = ["RelionEntry", "RelionTiltSeries", "names_stack_slices", "read_relion_project", "read_relion_series",
           "relion_series"]

_GLOBAL_COLUMNS = ("rlnTomoName", "rlnTomoTiltSeriesStarFile", "rlnVoltage", "rlnSphericalAberration",
                   "rlnAmplitudeContrast", "rlnMicrographOriginalPixelSize", "rlnTomoHand")
_TILT_COLUMNS = ("rlnTomoNominalStageTiltAngle", "rlnTomoNominalTiltAxisAngle", "rlnMicrographPreExposure")
# Text columns: a name such as 01 must not become the number 1.
_TEXT_COLUMNS = ("rlnTomoName", "rlnTomoTiltSeriesStarFile", "rlnMicrographName", "rlnMicrographNameEven",
                 "rlnMicrographNameOdd", "rlnMicrographMovieName", "rlnCtfImage")
_HALF_COLUMNS = ("rlnMicrographNameEven", "rlnMicrographNameOdd")


@dataclass(frozen=True)
class RelionEntry:
    """One row of a RELION-5 global tilt-series STAR: a tilt series before its own STAR is read.

    ``source``: the global STAR; ``star``: the series' per-series STAR; ``project_dir``: the RELION project folder
    relative paths start from (``None`` when the global STAR names only absolute paths); ``pixel_size_A``:
    ``rlnTomoTiltSeriesPixelSize`` (A, of the motion-corrected images) or ``None`` when absent; ``hand``:
    ``rlnTomoHand``, +1 or -1.
    """

    name: str
    source: Path
    star: Path
    project_dir: Path | None
    voltage_kV: float
    spherical_aberration_mm: float
    amplitude_contrast: float
    pixel_size_A: float | None
    hand: int


@dataclass(frozen=True)
class RelionTiltSeries:
    """A RELION-5 tilt series ready to load, its ``M`` views in order of tilt angle (icetide's stack order).

    ``entry``: its row of the global STAR (optics, pixel size, hand); ``star_rows`` ``(M,)``: the 0-based row of
    the per-series STAR of each view; ``images``: each view's motion-corrected MRC (``rlnMicrographName``);
    ``even``, ``odd``: its even- and odd-frame sums, or ``None``; ``tilt_angles_deg``, ``pre_exposure_e_per_A2``
    (e/A^2) ``(M,)``; ``tilt_axis_angle_deg``: degrees counter-clockwise from the image Y axis; ``defocus_A``:
    ``(M, 3)`` rows ``(defocus_u_A, defocus_v_A, astigmatism_angle_deg)`` from CtfFind, or ``None``.
    """

    entry: RelionEntry
    star_rows: np.ndarray
    images: tuple[Path, ...]
    even: tuple[Path, ...] | None
    odd: tuple[Path, ...] | None
    tilt_angles_deg: np.ndarray
    tilt_axis_angle_deg: float
    pre_exposure_e_per_A2: np.ndarray
    defocus_A: np.ndarray | None

    @property
    def name(self) -> str:
        return self.entry.name


def _walk_up(start: Path, relative: str) -> Path | None:
    """The first of ``start`` and the folders above it in which ``relative`` exists, or ``None``."""
    start = start.resolve()
    return next((folder for folder in (start, *start.parents) if (folder / relative).exists()), None)


def _project_dir(source: Path, relative: str, column: str) -> Path:
    """The RELION project folder of the STAR ``source``: where ``relative`` (a path of ``column``) exists."""
    found = _walk_up(source.parent, relative)
    if found is None:
        raise IcetideError(f"{source}: {relative} ({column}) not found in its folder or any folder above it "
                           "(the RELION project folder)")
    return found


def _as_table(block) -> pd.DataFrame | None:
    """A STAR block as a table (a one-row block may be a plain ``key value`` block), or ``None``."""
    if isinstance(block, dict):
        return pd.DataFrame([block])
    return block if isinstance(block, pd.DataFrame) else None


def _global_table(path: Path) -> pd.DataFrame:
    """The ``global`` block of a RELION-5 tilt-series STAR, with its required columns."""
    blocks = _read_star(path, _TEXT_COLUMNS)
    table = _as_table(blocks.get("global"))
    if table is None or not {"rlnTomoName", "rlnTomoTiltSeriesStarFile"} <= set(table.columns):
        tables = [t for t in map(_as_table, blocks.values()) if t is not None]
        per_series = any("rlnTomoNominalStageTiltAngle" in t.columns for t in tables)
        hint = (" (this is the STAR of one series: give its job's tilt-series STAR, e.g. "
                "CtfFind/job003/tilt_series_ctf.star)") if per_series else ""
        raise IcetideError(f"{path}: not a RELION-5 tilt-series STAR (no data_global block with rlnTomoName and "
                           f"rlnTomoTiltSeriesStarFile){hint}")
    missing = [c for c in _GLOBAL_COLUMNS if c not in table.columns]
    if missing:
        raise IcetideError(f"{path}: data_global lacks {', '.join(missing)}")
    if table.empty:
        raise IcetideError(f"{path}: data_global lists no tilt series")
    return table


def read_relion_project(path: str | os.PathLike) -> list[RelionEntry]:
    """The tilt series of a RELION-5 global tilt-series STAR (ImportTomo's ``tilt_series.star``, MotionCorr's
    ``corrected_tilt_series.star``, CtfFind's ``tilt_series_ctf.star``, ...), in its row order. Reads only the
    global block; the project folder is found from the first relative ``rlnTomoTiltSeriesStarFile``."""
    path = Path(path)
    table = _global_table(path)
    names = [str(n) for n in table["rlnTomoName"]]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise IcetideError(f"{path}: rlnTomoName {', '.join(twice)} given more than once")
    stars = [str(s) for s in table["rlnTomoTiltSeriesStarFile"]]
    relative = next((s for s in stars if not Path(s).is_absolute()), None)
    project = _project_dir(path, relative, "rlnTomoTiltSeriesStarFile") if relative is not None else None
    voltage, cs, q0 = (_star_column(path, table, c) for c in ("rlnVoltage", "rlnSphericalAberration",
                                                               "rlnAmplitudeContrast"))
    hands = _star_column(path, table, "rlnTomoHand", signed=True)
    if not np.isin(hands, (1.0, -1.0)).all():
        raise IcetideError(f"{path}: rlnTomoHand must be 1 or -1, got {hands[~np.isin(hands, (1.0, -1.0))][0]:g}")
    pixel = (_star_column(path, table, "rlnTomoTiltSeriesPixelSize") if "rlnTomoTiltSeriesPixelSize" in table.columns
             else np.full(len(names), np.nan))
    if (pixel <= 0).any():
        raise IcetideError(f"{path}: rlnTomoTiltSeriesPixelSize must be positive")
    return [
        RelionEntry(name, path, Path(star) if Path(star).is_absolute() else project / star, project,
                    float(voltage[k]), float(cs[k]), float(q0[k]), None if np.isnan(pixel[k]) else float(pixel[k]),
                    int(hands[k]))
        for k, (name, star) in enumerate(zip(names, stars))
    ]


def _series_block(entry: RelionEntry) -> pd.DataFrame:
    """The rows of ``entry``'s per-series STAR (block ``data_<name>``), with the columns icetide needs."""
    star = entry.star
    if not star.is_file():
        raise IcetideError(f"{entry.source}: tilt series {entry.name}: {star} not found")
    blocks = _read_star(star, _TEXT_COLUMNS)
    block = _as_table(blocks.get(entry.name))
    if block is None:
        found = ", ".join(f"data_{b}" for b in blocks)
        raise IcetideError(f"{star}: no table data_{entry.name} (found {found}), as RELION names it after the series")
    if "rlnMicrographName" in block.columns and any("@" in str(n) for n in block["rlnMicrographName"]):
        raise IcetideError(f"{star}: rlnMicrographName names slices of a stack (k@stack, as icetide's own "
                           "STEM.star does), not one image per tilt: give that stack to icetide reconstruct")
    missing = [c for c in _TILT_COLUMNS if c not in block.columns]
    if missing:
        raise IcetideError(f"{star}: lacks {', '.join(missing)} (not a RELION-5 tilt-series STAR?)")
    if "rlnMicrographName" not in block.columns:
        movies = " names only the movies (rlnMicrographMovieName):" if "rlnMicrographMovieName" in block.columns else ""
        raise IcetideError(f"{star}:{movies} no rlnMicrographName (one motion-corrected image per tilt); give the "
                           "tilt-series STAR of RELION's MotionCorr job (corrected_tilt_series.star) or of a later job")
    return block


def _image_paths(star: Path, block: pd.DataFrame, column: str, project: Path | None) -> list[Path]:
    """``(rows,)`` each row's file in ``column``, as written when absolute, else in ``project`` (``None``: every
    path is absolute); a missing file raises naming it."""
    paths = []
    for row, text in enumerate(block[column].astype(str), 1):
        path = Path(text) if project is None or Path(text).is_absolute() else project / text
        if not path.is_file():
            where = "" if path == Path(text) else f" in the RELION project folder {project}"
            raise IcetideError(f"{star}: {text} ({column}, row {row}) not found{where}")
        paths.append(path)
    return paths


def read_relion_series(entry: RelionEntry) -> RelionTiltSeries:
    """Read ``entry``'s per-series STAR: its views in order of tilt angle, their image files (checked to exist),
    angles, tilt axis (the first row's, as RELION's aligners take it), pre-exposure and, after CtfFind, defocus."""
    star = entry.star
    block = _series_block(entry)
    n_rows = len(block)
    angles = _star_column(star, block, "rlnTomoNominalStageTiltAngle", signed=True)
    order = np.argsort(angles, kind="stable")
    axis = float(_star_column(star, block, "rlnTomoNominalTiltAxisAngle", signed=True)[0])
    project = entry.project_dir
    relative = next((t for t in block["rlnMicrographName"].astype(str) if not Path(t).is_absolute()), None)
    if project is None and relative is not None:  # the global STAR named absolute paths only
        project = _project_dir(star, relative, "rlnMicrographName")
    defocus = read_defocus(star, n_rows).rows()[order] if "rlnDefocusU" in block.columns else None

    def ordered(column: str) -> tuple[Path, ...]:
        paths = _image_paths(star, block, column, project)
        return tuple(paths[k] for k in order)

    images = ordered("rlnMicrographName")
    even, odd = (ordered(c) for c in _HALF_COLUMNS) if all(c in block.columns for c in _HALF_COLUMNS) else (None, None)
    pre_exposure = read_pre_exposure(star, n_rows)[order]
    return RelionTiltSeries(entry, order, images, even, odd, angles[order], axis, pre_exposure, defocus)


def relion_series(path: str | os.PathLike, name: str | None = None) -> RelionTiltSeries:
    """The tilt series ``name`` (its ``rlnTomoName``; may be left out when the STAR lists one) of the RELION-5
    global tilt-series STAR ``path``, read (:func:`read_relion_series`)."""
    entries = read_relion_project(path)
    names = [e.name for e in entries]
    if name is None and len(entries) > 1:
        raise IcetideError(f"{path}: holds {len(entries)} tilt series ({', '.join(names)}); name one (--relion-name)")
    if name is not None and name not in names:
        raise IcetideError(f"{path}: no tilt series {name!r} (rlnTomoName: {', '.join(names)})")
    return read_relion_series(entries[0] if name is None else entries[names.index(name)])


def names_stack_slices(star: str | os.PathLike) -> bool:
    """Whether the per-series STAR ``star`` names every image as a slice of a stack (``k@stack``, as icetide's
    own ``STEM.star`` does) rather than one file per tilt; ``False`` when it cannot be read."""
    try:
        blocks = _read_star(star, _TEXT_COLUMNS)
    except IcetideError:
        return False
    tables = [t for t in map(_as_table, blocks.values()) if t is not None and "rlnMicrographName" in t.columns]
    return bool(tables) and all("@" in str(n) for t in tables for n in t["rlnMicrographName"])
