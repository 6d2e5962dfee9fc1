"""AreTomo ``.aln`` alignment files (AreTomo2/AreTomo3).

Layout, as AreTomo2's ``MrcUtil/CSaveAlnFile.cpp`` writes it::

    # AreTomo Alignment / Priims bprmMn
    # RawSize = 4096 4096 41                      (nx ny nz of the raw stack)
    # NumPatches = 0
    # DarkFrame =     0    0   -60.00             (frame index, raw section index, tilt; one line each)
    # AlphaOffset =    12.30                      (AreTomo3; optional, like other "# key = value" lines)
    # SEC     ROT         GMAG       TX          TY      SMEAN     SFIT    SCALE     BASE     TILT
        0    85.3000    1.00000     12.345     -6.789     1.00     1.00     1.00     0.00   -57.00
    # Local Alignment                             (only with patches)
       0   0 -1537.16  -1363.14     -6.93    -36.22   1.0   (tilt, patch, x, y, shift x, shift y, good)

``ROT`` is the tilt-axis angle (degrees), ``TX, TY`` the global shifts in raw-stack pixels, ``TILT`` the tilt
angle. With ``-TiltCor`` AreTomo3 adds its ``AlphaOffset`` to ``TILT`` while ``DarkFrame`` tilts stay nominal
(as in AreTomo3 output such as teamtomo/alnfile's ``tests/test_data_with_local.aln``: dark frames at -68..-42,
rows from -27.71 = -40 + 12.3 with ``AlphaOffset = 12.30``). Rows skip the dark frames AreTomo removed, so
rows are matched to images by nominal tilt angle (:func:`icetide.alignment.aln_to_deformations`).

An AreTomo3 output folder holds, per tilt series ``X`` (:func:`aretomo3_series`): ``X.mrc`` (the tilt series,
in tilt-angle order), ``X_TLT.txt`` (one line per view of ``X.mrc``, dark views included: nominal tilt angle,
then acquisition order and dose), ``X.aln``, ``X_CTF.txt`` (CTFFIND4 columns), ``X_ODD.mrc``/``X_EVN.mrc``
(the odd and even frame sums, with ``-SplitSum 1``) and ``X_Vol.mrc`` (AreTomo3's tomogram, not used here).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import IcetideError
from .imod import parse_exclude

__all__ = ["AlnFile", "AreTomo3Series", "aretomo3_series", "dark_views", "exclude_dark_views", "read_aln"]

_GLOBAL_COLUMNS = ("SEC", "ROT", "GMAG", "TX", "TY", "SMEAN", "SFIT", "SCALE", "BASE", "TILT")
_LOCAL_WIDTH = 7
# AreTomo writes tilt angles with two decimals: a dark frame's tilt and its line in _TLT.txt agree to that.
_DARK_TOLERANCE_DEG = 0.02


@dataclass
class AlnFile:
    """The content of a ``.aln`` file; per-row arrays have shape ``(R,)`` in file order.

    ``raw_size``: ``(nx, ny, nz)`` of the raw stack or ``None``; ``dark_frames``: ``(frame index, section
    index, tilt_deg)`` per removed image; ``alpha_offset_deg``: AreTomo3's ``AlphaOffset`` (included in
    ``tilt_deg``; 0 when absent); ``header``: the other ``# key = value`` lines as strings;
    ``local``: the local-alignment rows ``(K, 7)`` (tilt, patch, x, y, shift x, shift y, good).
    """

    sec: np.ndarray
    rot_deg: np.ndarray
    gmag: np.ndarray
    tx_px: np.ndarray
    ty_px: np.ndarray
    smean: np.ndarray
    sfit: np.ndarray
    scale: np.ndarray
    base: np.ndarray
    tilt_deg: np.ndarray
    raw_size: tuple[int, int, int] | None = None
    num_patches: int = 0
    alpha_offset_deg: float = 0.0
    dark_frames: list[tuple[int, int, float]] = field(default_factory=list)
    header: dict[str, str] = field(default_factory=dict)
    local: np.ndarray = field(default_factory=lambda: np.zeros((0, _LOCAL_WIDTH)))


def _numbers(text: str, where: str) -> list[float]:
    try:
        return [float(t) for t in text.split()]
    except ValueError:
        raise IcetideError(f"{where}: not a row of numbers: {text.strip()!r}") from None


def _header_line(body: str, where: str, out: dict) -> None:
    """One ``# key = value`` comment line into ``out`` (raw size, patches, dark frames, the rest)."""
    key, _, value = body.partition("=")
    key, value = key.strip(), value.strip()
    if key == "RawSize":
        size = _numbers(value, where)
        if len(size) != 3:
            raise IcetideError(f"{where}: RawSize needs 3 numbers, got {value!r}")
        out["raw_size"] = tuple(int(v) for v in size)
    elif key == "NumPatches":
        out["num_patches"] = int(_numbers(value, where)[0]) if value else 0
    elif key == "AlphaOffset":
        out["alpha_offset_deg"] = _numbers(value, where)[0] if value else 0.0
    elif key == "DarkFrame":
        frame = _numbers(value, where)
        if len(frame) != 3:
            raise IcetideError(f"{where}: DarkFrame needs 3 numbers, got {value!r}")
        out["dark_frames"].append((int(frame[0]), int(frame[1]), frame[2]))
    else:
        out["header"][key] = value


def read_aln(path: str | os.PathLike) -> AlnFile:
    """Read an AreTomo ``.aln`` file; :class:`IcetideError` names the file and line of any problem."""
    path = Path(path)
    if not path.is_file():
        raise IcetideError(f"{path}: no such file")
    meta: dict = {"raw_size": None, "num_patches": 0, "alpha_offset_deg": 0.0, "dark_frames": [], "header": {}}
    rows: list[list[float]] = []
    local: list[list[float]] = []
    section = None  # None before the "# SEC" line, then "global", then "local"
    for lineno, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        where = f"{path}:{lineno}"
        text = line.strip()
        if not text:
            continue
        if text.startswith("#"):
            body = text.lstrip("#").strip()
            if body.split()[:1] == ["SEC"]:
                section = "global"
            elif body.lower().startswith("local alignment"):
                section = "local"
            elif "=" in body:
                _header_line(body, where, meta)
            continue
        values = _numbers(text, where)
        if section == "global":
            if len(values) != len(_GLOBAL_COLUMNS):
                raise IcetideError(
                    f"{where}: expected {len(_GLOBAL_COLUMNS)} columns ({' '.join(_GLOBAL_COLUMNS)}), got {len(values)}"
                )
            rows.append(values)
        elif section == "local":
            if len(values) != _LOCAL_WIDTH:
                raise IcetideError(f"{where}: expected {_LOCAL_WIDTH} columns in a local row, got {len(values)}")
            local.append(values)
        else:
            raise IcetideError(f"{where}: data before the '# SEC ROT ...' header line")
    if not rows:
        raise IcetideError(f"{path}: no global alignment rows (not an AreTomo .aln file?)")
    table = np.asarray(rows, dtype=np.float64)
    columns = {name: table[:, i] for i, name in enumerate(_GLOBAL_COLUMNS)}
    return AlnFile(
        sec=columns["SEC"].astype(int),
        rot_deg=columns["ROT"],
        gmag=columns["GMAG"],
        tx_px=columns["TX"],
        ty_px=columns["TY"],
        smean=columns["SMEAN"],
        sfit=columns["SFIT"],
        scale=columns["SCALE"],
        base=columns["BASE"],
        tilt_deg=columns["TILT"],
        local=np.asarray(local, dtype=np.float64).reshape(-1, _LOCAL_WIDTH),
        **meta,
    )


def dark_views(aln: AlnFile, tilt_angles_deg) -> list[int]:
    """The 0-based stack indices whose tilt angle is that of one of the ``.aln``'s dark frames (AreTomo3's
    stack and ``_TLT.txt`` keep the dark views that its ``.aln`` leaves out)."""
    angles = np.asarray(tilt_angles_deg, dtype=np.float64).reshape(-1)
    dark = np.asarray([tilt for _, _, tilt in aln.dark_frames], dtype=np.float64)
    if dark.size == 0:
        return []
    return np.flatnonzero(np.abs(angles[:, None] - dark[None, :]).min(1) <= _DARK_TOLERANCE_DEG).tolist()


def exclude_dark_views(exclude: str | None, aln: AlnFile, tilt_angles_deg) -> tuple[str | None, list[int]]:
    """The ``--exclude`` text ``exclude`` with the :func:`dark_views` added (each once), and those views."""
    dark = dark_views(aln, tilt_angles_deg)
    if not dark:
        return exclude, []
    views = sorted(set(parse_exclude(exclude, len(np.ravel(tilt_angles_deg))).tolist()) | set(dark))
    return ",".join(map(str, views)), dark


@dataclass(frozen=True)
class AreTomo3Series:
    """The files of one tilt series in an AreTomo3 output folder (see the module docstring).

    ``angles``: ``X_TLT.txt`` (else an IMOD ``X.tlt``/``X.rawtlt``), or ``None`` when only the ``.aln`` gives
    them; ``odd``/``even``: both half stacks or neither; ``aln``, ``ctf``: ``None`` when absent.
    """

    name: str
    stack: Path
    angles: Path | None
    aln: Path | None
    ctf: Path | None
    odd: Path | None
    even: Path | None

    def angles_deg(self) -> np.ndarray | None:
        """The nominal tilt angles of the ``.aln`` rows in section order (its TILT less the AlphaOffset), for a
        series without an angle file; ``None`` when there is an angle file or no ``.aln``."""
        if self.angles is not None or self.aln is None:
            return None
        aln = read_aln(self.aln)
        return (aln.tilt_deg - aln.alpha_offset_deg)[np.argsort(aln.sec, kind="stable")]


def aretomo3_series(folder: str | os.PathLike, name: str | None = None) -> AreTomo3Series:
    """The files of the tilt series ``name`` in the AreTomo3 output folder ``folder`` (``name`` may be left out
    when the folder holds one series: one ``X.aln`` or ``X_TLT.txt``). The stack is required, and the angles (a
    ``_TLT.txt``, ``.tlt``/``.rawtlt`` or the ``.aln``); what is missing raises a one-line :class:`IcetideError`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise IcetideError(f"{folder}: not a folder")
    names = sorted({p.name.removesuffix(".aln") for p in folder.glob("*.aln")}
                   | {p.name.removesuffix("_TLT.txt") for p in folder.glob("*_TLT.txt")})
    if not names:
        raise IcetideError(f"{folder}: no AreTomo3 tilt series in it (no X.aln or X_TLT.txt)")
    if name is None and len(names) > 1:
        raise IcetideError(f"{folder}: holds {len(names)} AreTomo3 tilt series ({', '.join(names)}); name one")
    name = names[0] if name is None else name
    if name not in names:
        raise IcetideError(f"{folder}: no AreTomo3 tilt series {name!r} (it holds {', '.join(names)})")

    def found(*endings: str) -> Path | None:
        return next((folder / (name + e) for e in endings if (folder / (name + e)).is_file()), None)

    # A name comes from an X.aln or X_TLT.txt, so the angles are always at hand: only the stack can be missing.
    stack = found(".mrc", ".st")
    if stack is None:
        raise IcetideError(f"{folder}: tilt series {name}: missing the stack {name}.mrc")
    odd, even = found("_ODD.mrc"), found("_EVN.mrc")
    halves = (odd, even) if odd and even else (None, None)
    return AreTomo3Series(name, stack, found("_TLT.txt", ".tlt", ".rawtlt"), found(".aln"), found("_CTF.txt"), *halves)
