"""``deformations.json``: the schema every command uses for true or estimated deformations.

Keys: ``tilt_angles_deg`` (M), ``shifts_px`` (M x 2, ``[du, dv]``), ``angles_deg`` (M, in-plane rotation
alpha), ``local_px`` (M x 2 x N1 x N2, ``[du, dv]`` at control points from the first to the last pixel
centre, rows along v), ``local_interpolation`` (``"bicubic"`` or ``"bilinear"``), ``detector_shape``
(``[ny, nx]``). Other keys are kept in ``Deformations.extra``. See :mod:`icetide.deform` for the model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..deform import Deformations
from ..errors import IcetideError
from .util import write_json

_KEYS = ("tilt_angles_deg", "shifts_px", "angles_deg", "local_px", "local_interpolation", "detector_shape")


def write_deformations(path: str | os.PathLike, d: Deformations) -> None:
    """Write ``d`` to ``path`` as JSON (atomically)."""
    data = {
        "tilt_angles_deg": d.tilt_angles_deg,
        "shifts_px": d.shifts_px,
        "angles_deg": d.angles_deg,
        "local_px": d.local_px,
        "local_interpolation": d.local_interpolation,
        "detector_shape": list(d.detector_shape),
    }
    data.update(d.extra)
    write_json(path, data)


def read_deformations(path: str | os.PathLike, detector_shape: tuple[int, int] | None = None) -> Deformations:
    """Read a ``deformations.json``. ``detector_shape`` is needed only when the file lacks it."""
    path = Path(path)
    if not path.is_file():
        raise IcetideError(f"{path}: no such file")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IcetideError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise IcetideError(f"{path}: expected a JSON object")
    shape = data.get("detector_shape", detector_shape)
    missing = [k for k in _KEYS[:4] if k not in data] + ([] if shape is not None else ["detector_shape"])
    if missing:
        raise IcetideError(f"{path}: missing keys {', '.join(missing)}")
    try:
        return Deformations(
            data["tilt_angles_deg"],
            data["shifts_px"],
            data["angles_deg"],
            data["local_px"],
            tuple(shape),
            data.get("local_interpolation", "bicubic"),
            {k: v for k, v in data.items() if k not in _KEYS},
        )
    except (ValueError, TypeError) as exc:
        raise IcetideError(f"{path}: {exc}") from None
