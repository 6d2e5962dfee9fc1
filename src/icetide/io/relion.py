"""RELION-5 tomography STAR files, written and read with ``starfile``.

- Tilt-series STAR (one per tilt series, one data block named after it, one row per tilt in stack order):
  ``rlnMicrographName`` (when image paths are given), ``rlnTomoNominalStageTiltAngle``, and the alignment
  ``rlnTomoXTilt``, ``rlnTomoYTilt``, ``rlnTomoZRot`` (degrees), ``rlnTomoXShiftAngst``,
  ``rlnTomoYShiftAngst`` (Angstrom). The geometry they encode and its relation to icetide's model are in
  :mod:`icetide.alignment`.
- ``tomograms.star`` (block ``global``, one row per tilt series): ``rlnTomoName``,
  ``rlnTomoTiltSeriesStarFile``, ``rlnVoltage`` (kV), ``rlnSphericalAberration`` (mm),
  ``rlnAmplitudeContrast``, ``rlnMicrographOriginalPixelSize`` and ``rlnTomoTiltSeriesPixelSize`` (A),
  ``rlnTomoHand``, ``rlnTomoSizeX/Y/Z`` (voxels of the tomogram at the tilt-series pixel size), and for a
  reconstructed tomogram ``rlnTomoReconstructedTomogram`` (its MRC) and ``rlnTomoTomogramBinning`` (its voxel
  over the tilt-series pixel), the columns RELION-5's own reconstruction adds.

``rlnTomoHand`` is icetide's ``ctf.defocus_hand``: RELION's ``Tomogram::getCtf`` adds ``hand * pixel * dz`` to the
defocus, ``dz`` the depth along the beam in the frame its projection matrices rotate the specimen into, i.e.
icetide's ``t = -x sin(theta) + z cos(theta)`` under the geometry mapping of :mod:`icetide.alignment`, as in
icetide's ``df + hand * t * pixel`` (docs/CONVENTIONS.md).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import starfile

from ..alignment import deformations_to_relion, relion_to_deformations
from ..deform import Deformations
from ..errors import IcetideError
from .util import atomic_path

__all__ = [
    "RelionTomogram",
    "write_relion_tilt_series_star",
    "read_relion_tilt_series_star",
    "write_relion_tomograms_star",
    "read_relion_tomograms_star",
]

_ALIGNMENT_COLUMNS = ("rlnTomoXTilt", "rlnTomoYTilt", "rlnTomoZRot", "rlnTomoXShiftAngst", "rlnTomoYShiftAngst")


@dataclass
class RelionTomogram:
    """One row of a RELION-5 ``tomograms.star``.

    ``size_xyz``: tomogram size in voxels at ``tilt_series_pixel_size_A``. ``hand``: RELION's defocus
    handedness flag, +1 or -1 (RELION-5 tutorial data carry -1; it depends on the microscope), icetide's
    ``ctf.defocus_hand``. ``tomogram_file``: the reconstructed tomogram's MRC, or ``None``; ``binning``: its
    voxel size over ``tilt_series_pixel_size_A``.
    """

    name: str
    tilt_series_star_file: str
    voltage_kV: float
    spherical_aberration_mm: float
    amplitude_contrast: float
    original_pixel_size_A: float
    tilt_series_pixel_size_A: float
    size_xyz: tuple[int, int, int]
    hand: int = -1
    tomogram_file: str | None = None
    binning: float = 1.0


def _write_star(path: str | os.PathLike, blocks: dict[str, pd.DataFrame]) -> None:
    with atomic_path(path) as tmp:
        starfile.write(blocks, tmp, float_format="%.6f")


def _read_star(path: str | os.PathLike, parse_as_string: Sequence[str] = ()) -> dict:
    """The data blocks of a STAR file by name; the columns ``parse_as_string`` stay text (names such as ``01``)."""
    path = Path(path)
    if not path.is_file():
        raise IcetideError(f"{path}: no such file")
    try:
        blocks = starfile.read(path, always_dict=True, parse_as_string=list(parse_as_string))
    except Exception as exc:  # starfile raises many exception types on malformed text
        raise IcetideError(f"{path}: not a readable STAR file ({type(exc).__name__}: {exc})") from None
    if not blocks:
        raise IcetideError(f"{path}: no data blocks")
    return blocks


def _micrograph_names(image_paths, n_tilts: int, stack_indices: Sequence[int] | None) -> list[str]:
    """``k@stack`` (``k`` the 1-based position in the stack) for a stack path, or the given per-tilt names."""
    if isinstance(image_paths, (str, os.PathLike)):
        indices = range(n_tilts) if stack_indices is None else [int(k) for k in stack_indices]
        if len(indices) != n_tilts:
            raise IcetideError(f"{len(indices)} stack indices for {n_tilts} tilts")
        return [f"{k + 1}@{image_paths}" for k in indices]
    names = [str(p) for p in image_paths]
    if len(names) != n_tilts:
        raise IcetideError(f"{len(names)} image paths for {n_tilts} tilts")
    return names


def write_relion_tilt_series_star(
    path: str | os.PathLike,
    d: Deformations,
    pixel_size_A: float,
    tilt_series_name: str,
    image_paths: str | os.PathLike | Sequence[str] | None = None,
    stack_indices: Sequence[int] | None = None,
) -> None:
    """Write the RELION-5 tilt-series STAR of ``d`` (global part) as block ``data_<tilt_series_name>``.

    ``pixel_size_A``: of the images ``d`` refers to (``d.detector_shape``). ``image_paths``: one stack path
    (written ``k@path``) or M per-tilt image names, stored as ``rlnMicrographName``. ``stack_indices`` ``(M,)``:
    the 0-based position in that stack of each of ``d``'s tilts (default ``0..M-1``; ``k`` is it plus 1), so
    that the rows of a series with views left out name the right images.
    """
    if not tilt_series_name or any(c.isspace() for c in tilt_series_name):
        raise IcetideError(f"tilt-series name must be non-empty without spaces, got {tilt_series_name!r}")
    table = {}
    if image_paths is not None:
        table["rlnMicrographName"] = _micrograph_names(image_paths, d.n_tilts, stack_indices)
    table["rlnTomoNominalStageTiltAngle"] = d.tilt_angles_deg
    table.update(deformations_to_relion(d, pixel_size_A))
    _write_star(path, {tilt_series_name: pd.DataFrame(table)})


def _alignment_block(path: Path, blocks: dict, tilt_series_name: str | None) -> pd.DataFrame:
    if tilt_series_name is not None:
        if tilt_series_name not in blocks:
            raise IcetideError(f"{path}: no data block named {tilt_series_name!r} (found {', '.join(blocks)})")
        block = blocks[tilt_series_name]
    else:
        tables = [b for b in blocks.values() if isinstance(b, pd.DataFrame) and "rlnTomoYTilt" in b.columns]
        if len(tables) != 1:
            raise IcetideError(f"{path}: {len(tables)} blocks have rlnTomoYTilt; name the tilt series to read")
        block = tables[0]
    if not isinstance(block, pd.DataFrame):
        raise IcetideError(f"{path}: block {tilt_series_name!r} is not a loop_ table")
    missing = [c for c in _ALIGNMENT_COLUMNS if c not in block.columns]
    if missing:
        raise IcetideError(f"{path}: missing columns {', '.join(missing)}")
    return block


def read_relion_tilt_series_star(
    path: str | os.PathLike,
    pixel_size_A: float,
    detector_shape: tuple[int, int],
    tilt_series_name: str | None = None,
    grid: tuple[int, int] = (2, 2),
) -> Deformations:
    """Global deformations from a RELION-5 tilt-series STAR (rows in stack order).

    ``pixel_size_A``: the tilt-series pixel size (``rlnTomoTiltSeriesPixelSize`` in ``tomograms.star``);
    ``detector_shape``: ``(ny, nx)`` of its images. ``tilt_series_name`` picks the data block when the file
    holds several. The local field is zero on a ``grid`` of control points.
    """
    path = Path(path)
    block = _alignment_block(path, _read_star(path), tilt_series_name)
    try:
        columns = {c: block[c].to_numpy(dtype=np.float64) for c in _ALIGNMENT_COLUMNS}
    except (ValueError, TypeError):
        raise IcetideError(f"{path}: non-numeric values in the alignment columns") from None
    if not all(np.isfinite(v).all() for v in columns.values()):
        raise IcetideError(f"{path}: NaN or missing values in the alignment columns")
    return relion_to_deformations(columns, pixel_size_A, detector_shape, grid)


_TOMOGRAM_COLUMNS = {
    "rlnTomoName": "name",
    "rlnTomoTiltSeriesStarFile": "tilt_series_star_file",
    "rlnVoltage": "voltage_kV",
    "rlnSphericalAberration": "spherical_aberration_mm",
    "rlnAmplitudeContrast": "amplitude_contrast",
    "rlnMicrographOriginalPixelSize": "original_pixel_size_A",
    "rlnTomoHand": "hand",
    "rlnTomoTiltSeriesPixelSize": "tilt_series_pixel_size_A",
}


def write_relion_tomograms_star(path: str | os.PathLike, entries: Sequence[RelionTomogram]) -> None:
    """Write a RELION-5 ``tomograms.star`` (block ``data_global``) with one row per entry."""
    if not entries:
        raise IcetideError("tomograms.star needs at least one tomogram")
    rows = []
    for e in entries:
        row = {label: getattr(e, attr) for label, attr in _TOMOGRAM_COLUMNS.items()}
        row["rlnTomoHand"] = int(e.hand)
        row.update(zip(("rlnTomoSizeX", "rlnTomoSizeY", "rlnTomoSizeZ"), (int(n) for n in e.size_xyz)))
        row["rlnTomoTomogramBinning"] = float(e.binning)
        if e.tomogram_file is not None:
            row["rlnTomoReconstructedTomogram"] = str(e.tomogram_file)
        rows.append(row)
    _write_star(path, {"global": pd.DataFrame(rows)})


def _optional_text(value) -> str | None:
    """A STAR value that may be absent (no column, or empty in this row of a table that has one)."""
    return None if value is None or pd.isna(value) else str(value)


def read_relion_tomograms_star(path: str | os.PathLike) -> list[RelionTomogram]:
    """Read the ``global`` block of a RELION-5 ``tomograms.star``; missing required columns raise (the tomogram
    and its binning are optional: RELION writes them once it has reconstructed one)."""
    path = Path(path)
    block = _read_star(path).get("global")
    if block is None:
        raise IcetideError(f"{path}: no data_global block")
    table = pd.DataFrame([block]) if isinstance(block, dict) else block
    required = list(_TOMOGRAM_COLUMNS) + ["rlnTomoSizeX", "rlnTomoSizeY", "rlnTomoSizeZ"]
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise IcetideError(f"{path}: missing columns {', '.join(missing)}")
    try:
        return [
            RelionTomogram(
                name=str(row["rlnTomoName"]),
                tilt_series_star_file=str(row["rlnTomoTiltSeriesStarFile"]),
                voltage_kV=float(row["rlnVoltage"]),
                spherical_aberration_mm=float(row["rlnSphericalAberration"]),
                amplitude_contrast=float(row["rlnAmplitudeContrast"]),
                original_pixel_size_A=float(row["rlnMicrographOriginalPixelSize"]),
                tilt_series_pixel_size_A=float(row["rlnTomoTiltSeriesPixelSize"]),
                size_xyz=(int(row["rlnTomoSizeX"]), int(row["rlnTomoSizeY"]), int(row["rlnTomoSizeZ"])),
                hand=int(row["rlnTomoHand"]),
                tomogram_file=_optional_text(row.get("rlnTomoReconstructedTomogram")),
                binning=float(row.get("rlnTomoTomogramBinning", 1.0)),
            )
            for _, row in table.iterrows()
        ]
    except (ValueError, TypeError) as exc:
        raise IcetideError(f"{path}: bad value in tomograms.star ({exc})") from None
