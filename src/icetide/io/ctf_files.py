"""Per-view defocus and exposure (dose) metadata for the CTF and dose correction of a tilt series.

Conventions of the results: defocus in Angstrom, positive = underfocus; astigmatism as in
:mod:`icetide.ctf` (Rohou & Grigorieff 2015): the defocus is ``defocus_u`` along the direction
``astigmatism_angle_deg`` (degrees counter-clockwise from the image X axis) and ``defocus_v`` across it;
exposure in electrons per square Angstrom. Every array is in stack order (view 1 first). Malformed input,
negative or non-finite values, and a view count that differs from the stack's raise :class:`IcetideError`
naming the file (and the line where there is one).

Formats read (and, for IMOD and the plain exposure list, written):

- CTFFIND4 diagnostic text (``diagnostic_output.txt``): ``#`` comment lines, the first
  ``# Output from CTFFind version ...``, one of them ``# Columns: #1 - micrograph number; #2 - defocus 1
  [Angstroms]; #3 - defocus 2; #4 - azimuth of astigmatism; #5 - additional phase shift [radians];
  #6 - cross correlation; #7 - spacing (in Angstroms) up to which CTF rings were fit successfully``, then one
  row of numbers per image of the input stack, in stack order, numbered from 1 (printed as ``1.000000``).
  CTFFIND5 appends columns 8-10 (tilt axis angle, tilt angle, sample thickness); only 1-4 are used here:
  defocus 1 -> ``u``, defocus 2 -> ``v``, azimuth (degrees, the direction of defocus 1) -> the angle.
- IMOD ``.defocus`` (written by ctfplotter, read by ctfphaseflip; per IMOD's ``ctfutils.cpp``
  ``readDefocusFile`` and the ctfphaseflip ``-DefocusFile`` manual entry). Each data line is
  ``start_view end_view start_tilt end_tilt defocus_nm`` with views numbered from 1 (inclusive range),
  tilt angles in degrees, defocus in nanometres, positive = underfocus.

  * Version 1 (no version number): plain data lines. Ctfplotter before IMOD 4.0.29 numbered views from 0;
    ctfphaseflip detects that from the tilt angles, here (without tilt angles) a file of this version
    whose views start at 0 has all its view numbers raised by 1.
  * Version 2: the same, with a sixth number ``2`` (the version) on the first line only.
  * Version 3: a first, header-only line ``flags 0 0.0 0.0 0 3`` (flags in the first field, version in the
    sixth); flags are the sum of 1 (astigmatism columns present), 2 (astigmatism angle in radians, not
    degrees), 4 (phase-shift column present), 8 (phase shift in radians, not degrees), 16 (tilt angles
    inverted), 32 (cut-on frequency column present). Data lines are ``start end tilt1 tilt2 defocus1_nm``
    followed, in this order, by ``defocus2_nm astig_angle`` (flag 1), ``phase_shift`` (flag 4),
    ``cut_on`` (flag 32). Where defocus 2 is larger than defocus 1 IMOD swaps them and turns the angle by
    -90 degrees (the same CTF); this reader does likewise, so ``u >= v``. An entry whose defocus 2 is 0
    carries no astigmatism (as in ctfphaseflip).

  Ranges map to views as ctfphaseflip maps them: each line's value belongs to the middle view of its
  range (``(start + end) // 2``, 1-based; a repeated ``start end`` pair replaces the earlier line); views
  between two such middles are interpolated linearly in view number (the astigmatism angle the short way
  round modulo 180 degrees, defocus 2 through the ratio defocus2/defocus1), and views before the first or
  after the last middle take the nearest value. A line covering views 1-2 thus sets view 1 and, with a
  following line for view 3, view 2 is their mean. A file naming views beyond the stack is an error;
  ``write_imod_defocus`` writes one line per view (``start = end``), so its files map one-to-one.
- RELION-5 tilt-series STAR (one per tilt series, one row per tilt, rows in stack order), read with
  ``starfile``: ``rlnDefocusU``, ``rlnDefocusV`` (Angstrom), ``rlnDefocusAngle`` (degrees, CTFFIND's
  azimuth) and ``rlnMicrographPreExposure`` (e/A^2 received before that tilt). Of several data blocks, the
  single one holding the needed columns is used.
- SerialEM ``.mdoc`` (via :func:`icetide.io.mdoc.read_mdoc`, SerialEM's "File Formats" help page):
  ``Defocus`` is the microscope's *relative* defocus readout in micrometres, negative = underfocus, so
  ``defocus_A = -1e4 * Defocus`` (it is the nominal focus setting, not a CTF measurement, and is only as
  absolute as the scope's zero of focus); ``ExposureDose`` is the dose on the specimen during the camera
  exposure in e/A^2 (pre-exposure time excluded); ``PriorRecordDose`` is, for a Low Dose tilt series,
  the cumulative dose in the Record area before this image (Record, Preview and task View images) and is
  used directly as the pre-exposure when every image has it; otherwise the pre-exposure of an image is the
  sum of ``ExposureDose`` of the images acquired before it, the acquisition order coming from ``DateTime``
  (``dd-Mon-yy hh:mm:ss``, ``yyyy`` since SerialEM 4.1, English month names whatever the locale; images with
  equal times keep their stack order) or else ``TimeStamp`` (integer seconds since 2020-01-01).
- Plain pre-exposure list (what ``icetide simulate`` writes): one number per line, the e/A^2 received
  before each view, in stack order; ``#`` starts a comment, blank lines are ignored.
"""

from __future__ import annotations

import datetime
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import IcetideError
from .mdoc import read_mdoc
from .relion import _read_star
from .util import atomic_path

__all__ = [
    "DefocusTable",
    "read_defocus",
    "write_imod_defocus",
    "read_pre_exposure",
    "write_pre_exposure",
]

_SUPPORTED_DEFOCUS = (
    "CTFFIND4 diagnostic .txt, IMOD .defocus, RELION-5 tilt-series .star or SerialEM .mdoc"
)
_SUPPORTED_EXPOSURE = (
    "SerialEM .mdoc, RELION-5 tilt-series .star (rlnMicrographPreExposure) or a plain list of one number per line"
)

# IMOD defocus-file flags (ctfutils.h)
_IMOD_ASTIG, _IMOD_ASTIG_RAD, _IMOD_PHASE, _IMOD_CUT_ON = 1, 2, 4, 32

_MONTHS = {m: i for i, m in enumerate(
    ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"), 1)}


@dataclass(frozen=True)
class DefocusTable:
    """Per-view defocus in stack order.

    ``defocus_u_A``, ``defocus_v_A``: ``(M,)`` Angstrom, positive = underfocus; ``astigmatism_angle_deg``:
    ``(M,)`` degrees counter-clockwise from the image X axis, the direction along which the defocus is
    ``defocus_u_A``; ``source``: the format read (``"CTFFIND4"``, ``"IMOD"``, ``"RELION"``, ``"SerialEM"``).
    """

    defocus_u_A: np.ndarray
    defocus_v_A: np.ndarray
    astigmatism_angle_deg: np.ndarray
    source: str

    @property
    def mean_defocus_A(self) -> np.ndarray:
        """``(M,)`` Angstrom, ``(u + v) / 2``."""
        return 0.5 * (self.defocus_u_A + self.defocus_v_A)

    def rows(self) -> np.ndarray:
        """``(M, 3)`` rows ``(defocus_u_A, defocus_v_A, astigmatism_angle_deg)``, as :class:`icetide.data.TiltSeries`
        holds them."""
        return np.stack([self.defocus_u_A, self.defocus_v_A, self.astigmatism_angle_deg], axis=1)


# ----------------------------------------------------------------------------------------------- helpers


def _existing(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise IcetideError(f"{path}: no such file")
    return path


def _check_n_views(path: Path, n_found: int, n_views: int, what: str) -> None:
    if n_found != n_views:
        raise IcetideError(f"{path}: {what} for {n_found} views, the stack has {n_views}")


def _check_values(where: str, name: str, values: np.ndarray) -> None:
    """Finite and non-negative, or an error naming the first offending view (1-based)."""
    bad = ~np.isfinite(values)
    if bad.any():
        raise IcetideError(f"{where}: {name} of view {int(np.argmax(bad)) + 1} is not a finite number")
    if (values < 0).any():
        k = int(np.argmax(values < 0))
        raise IcetideError(f"{where}: {name} of view {k + 1} is negative ({values[k]:g})")


def _table(path: Path, u, v, angle, source: str, n_views: int) -> DefocusTable:
    u, v, angle = (np.asarray(a, dtype=np.float64).reshape(-1) for a in (u, v, angle))
    _check_n_views(path, u.shape[0], n_views, "defocus")
    _check_values(str(path), "defocus U", u)
    _check_values(str(path), "defocus V", v)
    if not np.isfinite(angle).all():
        k = int(np.argmax(~np.isfinite(angle)))
        raise IcetideError(f"{path}: astigmatism angle of view {k + 1} is not a finite number")
    return DefocusTable(u, v, angle, source)


def _wrap180(angle_deg):
    """Angle(s) in degrees to [-90, 90), the period of an astigmatism axis."""
    return (np.asarray(angle_deg, dtype=np.float64) + 90.0) % 180.0 - 90.0


def _numbers(text: str) -> list[float] | None:
    try:
        return [float(t) for t in text.split()]
    except ValueError:
        return None


def _data_lines(path: Path) -> list[tuple[int, str]]:
    """``(line number, text)`` of the non-blank lines, with ``#`` comments removed."""
    out = []
    for lineno, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if text:
            out.append((lineno, text))
    return out


def _header_lines(path: Path) -> list[str]:
    """The leading ``#`` lines of a text file (stops at the first other non-blank line)."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        text = line.strip()
        if not text:
            continue
        if not text.startswith("#"):
            break
        out.append(text)
    return out


def _is_ctffind(path: Path) -> bool:
    for text in _header_lines(path):
        low = text.lower()
        if "ctffind" in low or ("micrograph number" in low and "defocus 1" in low):
            return True
    return False


def _looks_like_star(path: Path) -> bool:
    for line in path.read_text(errors="replace").splitlines():
        text = line.strip()
        if text and not text.startswith("#"):
            return text.startswith("data_")
    return False


def _looks_like_mdoc(path: Path) -> bool:
    return any(line.strip().startswith("[ZValue") for line in path.read_text(errors="replace").splitlines())


# --------------------------------------------------------------------------------------------- defocus


def read_defocus(path: str | os.PathLike, n_views: int) -> DefocusTable:
    """Per-view defocus of a stack of ``n_views`` views from a CTFFIND4, IMOD, RELION-5 or SerialEM file.

    Dispatch: ``.mdoc`` -> SerialEM, ``.star`` -> RELION-5 tilt-series STAR, ``.defocus`` -> IMOD; any other
    text is CTFFIND4 when its ``#`` header says so, else IMOD when it parses as such. The result has exactly
    ``n_views`` rows (see the module docstring for how each format maps to views).
    """
    path = _existing(path)
    n_views = int(n_views)
    if n_views < 1:
        raise IcetideError(f"{path}: the stack must have at least one view, got {n_views}")
    suffix = path.suffix.lower()
    if suffix == ".mdoc":
        return _defocus_mdoc(path, n_views)
    if suffix == ".star":
        return _defocus_star(path, n_views)
    if suffix == ".defocus":
        return _defocus_imod(path, n_views)
    if _is_ctffind(path):
        return _defocus_ctffind(path, n_views)
    if _looks_like_star(path):
        return _defocus_star(path, n_views)
    if _looks_like_mdoc(path):
        return _defocus_mdoc(path, n_views)
    try:
        parsed = _parse_imod(path)
    except IcetideError:
        raise IcetideError(f"{path}: not a recognised defocus file (supported: {_SUPPORTED_DEFOCUS})") from None
    return _defocus_imod(path, n_views, parsed)


def _defocus_ctffind(path: Path, n_views: int) -> DefocusTable:
    rows = []
    for lineno, text in _data_lines(path):
        values = _numbers(text)
        if values is None or len(values) < 7:
            raise IcetideError(
                f"{path}:{lineno}: expected the 7 CTFFIND4 columns (number, defocus 1, defocus 2, azimuth, "
                f"phase shift, cross correlation, fit resolution), got {text!r}"
            )
        if values[0] != len(rows) + 1:
            raise IcetideError(f"{path}:{lineno}: micrograph number {values[0]:g}, expected {len(rows) + 1}")
        if not all(math.isfinite(x) for x in values[1:4]):
            raise IcetideError(f"{path}:{lineno}: defocus or azimuth is not a finite number")
        if values[1] < 0 or values[2] < 0:
            raise IcetideError(f"{path}:{lineno}: negative defocus ({values[1]:g}, {values[2]:g} A)")
        rows.append(values[1:4])
    if not rows:
        raise IcetideError(f"{path}: no CTFFIND4 result rows")
    u, v, angle = np.asarray(rows, dtype=np.float64).T
    return _table(path, u, v, angle, "CTFFIND4", n_views)


@dataclass
class _ImodEntry:
    start: int  # views, 1-based, after the old-version fix
    end: int
    angle_sum: float  # start_tilt + end_tilt: IMOD keeps its list ordered by this
    defocus1_nm: float
    defocus2_nm: float  # 0: no astigmatism for this entry
    astig_deg: float
    lineno: int


def _parse_imod(path: Path) -> tuple[list[_ImodEntry], int, int]:
    """Entries in file order, the version (0 when absent) and the flags of an IMOD ``.defocus`` file."""
    lines = _data_lines(path)
    if not lines:
        raise IcetideError(f"{path}: no defocus lines")
    version, flags = 0, 0
    lineno, text = lines[0]
    first = text.split()
    first_has_version = False
    if len(first) == 6:
        try:
            version = int(first[5])
        except ValueError:
            raise IcetideError(f"{path}:{lineno}: the sixth number (the version) is not an integer: {text!r}") from None
        if version > 2:
            try:
                flags = int(first[0])
            except ValueError:
                raise IcetideError(f"{path}:{lineno}: version-{version} flags are not an integer: {text!r}") from None
            if version > 3:
                raise IcetideError(f"{path}:{lineno}: IMOD defocus-file version {version} is not supported (1-3)")
            lines = lines[1:]
        else:
            first_has_version = True
    elif len(first) != 5:
        raise IcetideError(
            f"{path}:{lineno}: expected 'start_view end_view start_tilt end_tilt defocus_nm [version]', got {text!r}"
        )
    astig = bool(flags & _IMOD_ASTIG)
    n_cols = 5 + 2 * astig + bool(flags & _IMOD_PHASE) + bool(flags & _IMOD_CUT_ON)
    columns = "start_view end_view start_tilt end_tilt defocus_nm" + (" defocus2_nm astig_angle" if astig else "")
    entries = []
    for i, (lineno, text) in enumerate(lines):
        tokens = text.split()
        expected = n_cols + (1 if first_has_version and i == 0 else 0)
        values = _numbers(text)
        if values is None or len(tokens) != expected:
            extra = f" (flags {flags})" if version > 2 else ""
            raise IcetideError(f"{path}:{lineno}: expected {expected} numbers '{columns} ...'{extra}, got {text!r}")
        try:
            start, end = int(tokens[0]), int(tokens[1])
        except ValueError:
            raise IcetideError(f"{path}:{lineno}: view numbers are not integers: {text!r}") from None
        if not all(math.isfinite(x) for x in values[2:n_cols]):
            raise IcetideError(f"{path}:{lineno}: a value is not a finite number: {text!r}")
        d1 = values[4]
        d2, angle = (values[5], values[6]) if astig else (0.0, 0.0)
        if d1 < 0 or d2 < 0:
            raise IcetideError(f"{path}:{lineno}: negative defocus ({text!r}; positive = underfocus)")
        if flags & _IMOD_ASTIG_RAD:
            angle = math.degrees(angle)
        entries.append(_ImodEntry(start, end, values[2] + values[3], d1, d2, angle, lineno))
    if not entries:
        raise IcetideError(f"{path}: no defocus lines after the version-{version} header")
    if version < 2 and min(e.start for e in entries) == 0:  # ctfplotter before IMOD 4.0.29 counted from 0
        for e in entries:
            e.start, e.end = e.start + 1, e.end + 1
    for e in entries:
        if e.start < 1 or e.end < e.start:
            raise IcetideError(f"{path}:{e.lineno}: bad view range {e.start}-{e.end} (views are numbered from 1)")
    return entries, version, flags


def _interp_angles(x: np.ndarray, xp: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """Linear interpolation of axis angles (period 180 degrees) the short way round, constant beyond the ends."""
    steps = _wrap180(np.diff(angles))
    unwrapped = angles[0] + np.concatenate([[0.0], np.cumsum(steps)])
    return _wrap180(np.interp(x, xp, unwrapped))


def _defocus_imod(path: Path, n_views: int, parsed: tuple | None = None) -> DefocusTable:
    entries, _, flags = parsed if parsed is not None else _parse_imod(path)
    max_view = max(e.end for e in entries)
    if max_view > n_views:
        raise IcetideError(f"{path}: defocus for {max_view} views, the stack has {n_views}")
    # IMOD's list: a repeated (start, end) replaces the entry in place; others are inserted after every
    # entry whose angle sum is not larger; entries are then applied in list order to their middle views.
    ordered: list[_ImodEntry] = []
    for e in entries:
        same = [i for i, o in enumerate(ordered) if (o.start, o.end) == (e.start, e.end)]
        if same:
            ordered[same[0]] = e
        else:
            at = sum(1 for o in ordered if o.angle_sum <= e.angle_sum)
            ordered.insert(at, e)
    d1 = np.full(n_views, np.nan)
    d2 = np.full(n_views, np.nan)
    angle = np.full(n_views, np.nan)
    for e in ordered:
        k = (e.start - 1 + e.end - 1) // 2
        first, second, ang = e.defocus1_nm * 10.0, e.defocus2_nm * 10.0, e.astig_deg
        if second > first:  # IMOD keeps defocus 1 >= defocus 2
            first, second, ang = second, first, ang - 90.0
        d1[k] = first
        if second != 0:  # as ctfphaseflip: an entry without defocus 2 leaves the astigmatism unknown
            d2[k], angle[k] = second, ang
    views = np.arange(n_views, dtype=np.float64)
    known = ~np.isnan(d1)
    u = np.interp(views, views[known], d1[known])
    has_astig = ~np.isnan(d2)
    if flags & _IMOD_ASTIG and has_astig.any():
        ratio = np.interp(views, views[has_astig], d2[has_astig] / d1[has_astig])
        v = u * ratio
        ang = _interp_angles(views, views[has_astig], _wrap180(angle[has_astig]))
    else:
        v, ang = u.copy(), np.zeros(n_views)
    return _table(path, u, v, ang, "IMOD", n_views)


def _star_block(path: Path, columns: tuple[str, ...]) -> pd.DataFrame:
    """The single data block of a STAR file holding ``columns`` (a one-row block may be a plain block)."""
    tables = {}
    for name, block in _read_star(path).items():
        if isinstance(block, dict):
            block = pd.DataFrame([block])
        if isinstance(block, pd.DataFrame):
            tables[name] = block
    full = [name for name, t in tables.items() if all(c in t.columns for c in columns)]
    if len(full) > 1:
        raise IcetideError(f"{path}: {len(full)} data blocks ({', '.join(full)}) have {', '.join(columns)}; "
                           "expected one (a per-tilt-series file)")
    if not full:
        best = max(tables.values(), key=lambda t: sum(c in t.columns for c in columns), default=None)
        missing = [c for c in columns if best is None or c not in best.columns]
        raise IcetideError(f"{path}: no data block has {', '.join(missing)} (not a RELION-5 tilt-series STAR?)")
    return tables[full[0]]


def _star_column(path: Path, block: pd.DataFrame, column: str, signed: bool = False) -> np.ndarray:
    """``(rows,)`` the numbers of ``column``: finite, and non-negative unless ``signed`` (or an astigmatism angle)."""
    values = pd.to_numeric(block[column], errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        raise IcetideError(f"{path}: {column} of row {int(np.argmax(bad)) + 1} is not a finite number")
    if not signed and column != "rlnDefocusAngle" and (values < 0).any():
        k = int(np.argmax(values < 0))
        raise IcetideError(f"{path}: {column} of row {k + 1} is negative ({values[k]:g})")
    return values


def _defocus_star(path: Path, n_views: int) -> DefocusTable:
    columns = ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle")
    block = _star_block(path, columns)
    _check_n_views(path, len(block), n_views, "defocus")
    u, v, angle = (_star_column(path, block, c) for c in columns)
    return _table(path, u, v, angle, "RELION", n_views)


def _defocus_mdoc(path: Path, n_views: int) -> DefocusTable:
    info = read_mdoc(path)
    z_values = info["z_values"]
    _check_n_views(path, len(z_values), n_views, "defocus")
    defocus_um = info.get("defocus_um")
    if defocus_um is None:
        raise IcetideError(f"{path}: no Defocus entries in the [ZValue] sections")
    missing = np.isnan(defocus_um)
    if missing.any():
        raise IcetideError(f"{path}: [ZValue = {z_values[int(np.argmax(missing))]}] has no Defocus")
    defocus_A = -1e4 * defocus_um
    if (defocus_A < 0).any():
        k = int(np.argmax(defocus_A < 0))
        raise IcetideError(f"{path}: [ZValue = {z_values[k]}] Defocus = {defocus_um[k]:g} um is overfocus "
                           "(SerialEM's defocus is negative for underfocus)")
    return _table(path, defocus_A, defocus_A.copy(), np.zeros(n_views), "SerialEM", n_views)


def write_imod_defocus(
    path: str | os.PathLike,
    tilt_angles_deg,
    defocus_u_A,
    defocus_v_A=None,
    astigmatism_angle_deg=None,
) -> None:
    """Write an IMOD ``.defocus`` file with one line per view (``start = end`` = view number from 1), in nm.

    ``tilt_angles_deg``, ``defocus_u_A`` (and ``defocus_v_A``, ``astigmatism_angle_deg``, degrees): ``(M,)``,
    stack order, Angstrom, positive = underfocus. The version-3 format with the astigmatism flag (flags 1,
    angles in degrees) is written when ``defocus_v_A`` differs from ``defocus_u_A`` anywhere, else the
    version-2 format. Atomic.
    """
    tilts = np.asarray(tilt_angles_deg, dtype=np.float64).reshape(-1)
    u = np.asarray(defocus_u_A, dtype=np.float64).reshape(-1)
    v = u if defocus_v_A is None else np.asarray(defocus_v_A, dtype=np.float64).reshape(-1)
    angle = (np.zeros_like(u) if astigmatism_angle_deg is None
             else np.asarray(astigmatism_angle_deg, dtype=np.float64).reshape(-1))
    m = tilts.shape[0]
    if m == 0:
        raise IcetideError(f"{path}: no views to write")
    for name, a in (("defocus_u_A", u), ("defocus_v_A", v), ("astigmatism_angle_deg", angle)):
        if a.shape[0] != m:
            raise IcetideError(f"{path}: {name} has {a.shape[0]} values for {m} tilt angles")
    if not np.isfinite(tilts).all() or not np.isfinite(angle).all():
        raise IcetideError(f"{path}: tilt or astigmatism angles are not all finite")
    _check_values(str(path), "defocus U", u)
    _check_values(str(path), "defocus V", v)
    astig = bool((v != u).any())
    if astig and (v == 0).any():
        k = int(np.argmax(v == 0))
        raise IcetideError(f"{path}: defocus V of view {k + 1} is 0, which IMOD reads as 'no astigmatism'")
    lines = []
    if astig:
        lines.append(f"{_IMOD_ASTIG} 0 0.0 0.0 0 3\n")
        for k in range(m):
            lines.append(f"{k + 1} {k + 1} {tilts[k]:.4f} {tilts[k]:.4f} {u[k] / 10:.4f} {v[k] / 10:.4f} "
                         f"{angle[k]:.4f}\n")
    else:
        for k in range(m):
            version = " 2" if k == 0 else ""
            lines.append(f"{k + 1} {k + 1} {tilts[k]:.4f} {tilts[k]:.4f} {u[k] / 10:.4f}{version}\n")
    with atomic_path(path) as tmp:
        tmp.write_text("".join(lines))


# --------------------------------------------------------------------------------------------- exposure


def read_pre_exposure(path: str | os.PathLike, n_views: int) -> np.ndarray:
    """``(M,)`` e/A^2 received before each view, stack order, ``M = n_views``.

    From a SerialEM ``.mdoc`` (``PriorRecordDose``, or ``ExposureDose`` summed in ``DateTime`` order), a
    RELION-5 tilt-series STAR (``rlnMicrographPreExposure``), or a plain text file with one number per line
    (``#`` comments allowed; what ``icetide simulate`` writes).
    """
    path = _existing(path)
    n_views = int(n_views)
    suffix = path.suffix.lower()
    if suffix == ".mdoc" or (suffix != ".star" and _looks_like_mdoc(path)):
        values = _pre_exposure_mdoc(path)
    elif suffix == ".star" or _looks_like_star(path):
        values = _star_column(path, _star_block(path, ("rlnMicrographPreExposure",)), "rlnMicrographPreExposure")
    else:
        values = _pre_exposure_plain(path)
    _check_n_views(path, values.shape[0], n_views, "pre-exposure")
    _check_values(str(path), "pre-exposure", values)
    return values


def _pre_exposure_plain(path: Path) -> np.ndarray:
    values = []
    for lineno, text in _data_lines(path):
        numbers = _numbers(text)
        if numbers is None or len(numbers) != 1:
            raise IcetideError(f"{path}:{lineno}: expected one pre-exposure value (e/A^2) per line, got {text!r} "
                               f"(supported: {_SUPPORTED_EXPOSURE})")
        if not math.isfinite(numbers[0]) or numbers[0] < 0:
            raise IcetideError(f"{path}:{lineno}: pre-exposure must be a finite number >= 0, got {text!r}")
        values.append(numbers[0])
    if not values:
        raise IcetideError(f"{path}: no pre-exposure values")
    return np.asarray(values, dtype=np.float64)


def _section_float(path: Path, z: int, key: str, value: str) -> float:
    try:
        out = float(value.split()[0])
    except (ValueError, IndexError):
        raise IcetideError(f"{path}: [ZValue = {z}] {key} is not a number: {value!r}") from None
    if not math.isfinite(out) or out < 0:
        raise IcetideError(f"{path}: [ZValue = {z}] {key} must be a finite number >= 0, got {value!r}")
    return out


def _serialem_time(path: Path, z: int, value: str) -> float:
    """Seconds since 2000-01-01 of a SerialEM ``DateTime`` (``dd-Mon-yy hh:mm:ss`` or ``dd-Mon-yyyy ...``)."""
    try:
        date, clock = value.split()
        day, month, year = date.split("-")
        hour, minute, second = (int(t) for t in clock.split(":"))
        year_n = int(year) + (2000 if len(year) == 2 else 0)
        when = datetime.datetime(year_n, _MONTHS[month.lower()], int(day), hour, minute, second)
        return (when - datetime.datetime(2000, 1, 1)).total_seconds()
    except (ValueError, KeyError):
        raise IcetideError(f"{path}: [ZValue = {z}] DateTime is not 'dd-Mon-yy hh:mm:ss': {value!r}") from None


def _pre_exposure_mdoc(path: Path) -> np.ndarray:
    info = read_mdoc(path)
    sections, z_values = info["sections"], [int(z) for z in info["z_values"]]
    if all("PriorRecordDose" in s for s in sections):
        return np.array([_section_float(path, z, "PriorRecordDose", s["PriorRecordDose"])
                         for z, s in zip(z_values, sections)])
    lacking = [z for z, s in zip(z_values, sections) if "ExposureDose" not in s]
    if lacking:
        raise IcetideError(f"{path}: [ZValue = {lacking[0]}] has neither PriorRecordDose nor ExposureDose")
    dose = np.array([_section_float(path, z, "ExposureDose", s["ExposureDose"]) for z, s in zip(z_values, sections)])
    if all("DateTime" in s for s in sections):
        times = [_serialem_time(path, z, s["DateTime"]) for z, s in zip(z_values, sections)]
    elif all("TimeStamp" in s for s in sections):
        times = [_section_float(path, z, "TimeStamp", s["TimeStamp"]) for z, s in zip(z_values, sections)]
    else:
        z = next(z for z, s in zip(z_values, sections) if "DateTime" not in s)
        raise IcetideError(f"{path}: [ZValue = {z}] has no DateTime (nor TimeStamp or PriorRecordDose) to give "
                           "the acquisition order")
    order = np.argsort(np.asarray(times, dtype=np.float64), kind="stable")
    before = np.concatenate([[0.0], np.cumsum(dose[order])[:-1]])
    pre = np.empty_like(dose)
    pre[order] = before
    return pre


def write_pre_exposure(path: str | os.PathLike, pre_exposure_e_per_A2) -> None:
    """Write ``(M,)`` pre-exposures (e/A^2, stack order) one per line under a ``#`` header naming the unit. Atomic."""
    values = np.asarray(pre_exposure_e_per_A2, dtype=np.float64).reshape(-1)
    if values.shape[0] == 0:
        raise IcetideError(f"{path}: no pre-exposure values to write")
    _check_values(str(path), "pre-exposure", values)
    header = "# pre-exposure: electrons per square Angstrom received before each view, one per line, stack order\n"
    with atomic_path(path) as tmp:
        tmp.write_text(header + "".join(f"{float(x)!r}\n" for x in values))
