"""IMOD text formats: ``.tlt`` / ``.rawtlt`` tilt angles (one angle in degrees per line, stack order)."""

from __future__ import annotations

import os
from pathlib import Path

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
