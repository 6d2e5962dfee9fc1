"""IMOD text formats.

- ``.tlt`` / ``.rawtlt``: tilt angles, one angle in degrees per line, stack order.
- ``.xf``: one linear transform per image, a line ``A11 A12 A21 A22 DX DY`` mapping raw to aligned
  coordinates about the image centre, ``X' = A11 X + A12 Y + DX``, ``Y' = A21 X + A22 Y + DY``
  (see :mod:`icetide.alignment` for the exact centre and axis conventions and the conversion).
- view lists: the views ``tilt`` leaves out (its ``EXCLUDELIST``, IMOD's ``autodoc/tilt.adoc``) are numbered
  from 1, single views or ranges separated by commas, e.g. ``1-3,41``; ``newstack -exclude`` takes the same list
  with ``-fromone`` (it counts from 0 otherwise). icetide's ``--exclude`` takes the same syntax counted from 0,
  as ``newstack -exclude`` does (:func:`parse_exclude`).
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import IcetideError
from .util import atomic_path


def read_tlt(path: str | os.PathLike) -> np.ndarray:
    """Read tilt angles (degrees) from an IMOD ``.tlt``/``.rawtlt`` file; returns float64 ``(M,)``."""
    path = Path(path)
    if not path.is_file():
        raise IcetideError(f"{path}: no such file")
    values = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        text = line.strip()
        if not text:
            continue
        try:
            values.append(float(text.split()[0]))
        except ValueError:
            raise IcetideError(f"{path}:{lineno}: not a tilt angle: {text!r}") from None
    if not values:
        raise IcetideError(f"{path}: no tilt angles")
    return np.asarray(values, dtype=np.float64)


def write_tlt(path: str | os.PathLike, tilt_angles_deg) -> None:
    """Write tilt angles (degrees), one per line, as IMOD does (two decimals are IMOD's; we keep more)."""
    angles = np.asarray(tilt_angles_deg, dtype=np.float64).reshape(-1)
    with atomic_path(path) as tmp:
        tmp.write_text("".join(f"{a:9.4f}\n" for a in angles))


def read_xf(path: str | os.PathLike) -> np.ndarray:
    """Read an IMOD ``.xf`` file; returns float64 ``(M, 2, 3)`` = ``[[A11, A12, DX], [A21, A22, DY]]``."""
    path = Path(path)
    if not path.is_file():
        raise IcetideError(f"{path}: no such file")
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        text = line.strip()
        if not text:
            continue
        try:
            values = [float(t) for t in text.split()]
        except ValueError:
            values = []
        if len(values) != 6 or not np.all(np.isfinite(values)):
            raise IcetideError(f"{path}:{lineno}: expected 6 numbers A11 A12 A21 A22 DX DY, got {text!r}")
        rows.append(values)
    if not rows:
        raise IcetideError(f"{path}: no transforms")
    a11, a12, a21, a22, dx, dy = np.asarray(rows, dtype=np.float64).T
    return np.stack([np.stack([a11, a12, dx], -1), np.stack([a21, a22, dy], -1)], -2)


def write_xf(path: str | os.PathLike, xf) -> None:
    """Write transforms ``(M, 2, 3)`` as IMOD does (A to 7 decimals, shifts to 3), always space-separated."""
    xf = np.asarray(xf, dtype=np.float64)
    if xf.ndim != 3 or xf.shape[1:] != (2, 3):
        raise IcetideError(f"transforms must have shape (M, 2, 3), got {xf.shape}")
    lines = []
    for (a11, a12, dx), (a21, a22, dy) in xf:
        lines.append(f"{a11:11.7f} {a12:11.7f} {a21:11.7f} {a22:11.7f} {dx:11.3f} {dy:11.3f}\n")
    with atomic_path(path) as tmp:
        tmp.write_text("".join(lines))


def imod_view_list(indices) -> str:
    """0-based stack indices -> IMOD's view list, numbered from 1 with runs as ranges: ``[0, 1, 2, 40]`` ->
    ``"1-3,41"`` (``""`` for none)."""
    views = sorted({int(i) + 1 for i in np.asarray(indices, dtype=int).reshape(-1)})
    runs: list[list[int]] = []
    for v in views:
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def write_view_list(path: str | os.PathLike, indices) -> None:
    """Write the 0-based stack ``indices`` as one line of :func:`imod_view_list` (e.g. for ``EXCLUDELIST``)."""
    with atomic_path(path) as tmp:
        tmp.write_text(imod_view_list(indices) + "\n")


def parse_exclude(text: Optional[str], n_tilts: int) -> np.ndarray:
    """``"0-2,40"`` -> the sorted 0-based stack indices to drop (single views and inclusive ranges, comma-separated),
    checked against ``n_tilts``. Not a number or range, a view given twice, a view outside the stack or fewer
    than 2 views left raise a one-line :class:`IcetideError`."""
    if not text:
        return np.zeros(0, dtype=int)
    indices: list[int] = []
    outside: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        first, dash, last = part.partition("-")
        try:
            start, stop = int(first), int(last if dash else first)
        except ValueError:
            raise IcetideError(f"--exclude: {part!r} is neither a view nor a range of views (0-based, e.g. 0-2,40)") from None
        if stop < start:
            raise IcetideError(f"--exclude: range {part!r} runs backwards")
        if stop >= n_tilts:  # checked before the range is expanded: a typo must not allocate millions of views
            outside.append(part)
            continue
        indices.extend(range(start, stop + 1))
    if outside:
        raise IcetideError(f"--exclude: view(s) {', '.join(outside)} outside 0..{n_tilts - 1}")
    twice = sorted(i for i, n in Counter(indices).items() if n > 1)
    if twice:
        raise IcetideError(f"--exclude: view(s) {', '.join(map(str, twice))} given more than once")
    if n_tilts - len(indices) < 2:
        raise IcetideError("--exclude leaves fewer than 2 views")
    return np.asarray(sorted(indices), dtype=int)
