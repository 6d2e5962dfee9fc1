"""SerialEM ``.mdoc`` metadata files (the autodoc format SerialEM writes beside a tilt-series stack).

Layout: global ``key = value`` lines (``PixelSpacing``, ``ImageFile``, ``ImageSize``, ...), ``[T = ...]`` title
lines (the first usually holds ``Tilt axis angle = 85.3, binning = 1 ...``), then one ``[ZValue = N]``
section per image in the stack with its own ``key = value`` lines (``TiltAngle``, ``ExposureDose`` in
e/A^2, ``Defocus`` in micrometres, ``DateTime``, ...). Other bracketed sections (``[FrameSet = N]``,
``[MontSection = N]``) are kept apart from the images.

The values icetide uses are read by the data models of teamtomo's ``mdocfile``; the layout is scanned here,
because ``mdocfile`` keeps neither line numbers (for the error messages) nor the values as written, reads
only exactly spaced section lines, skips lines without ``=`` and, in ``mdocfile.read``, drops an image's
``PixelSpacing`` when the header has none.
"""

from __future__ import annotations

import datetime
import os
import re
from pathlib import Path
from typing import TypeVar

import numpy as np
from pydantic import BaseModel, ValidationError

from ..errors import IcetideError
from .util import atomic_path

__all__ = ["read_mdoc", "write_mdoc"]

_SECTION = re.compile(r"^\[\s*(\w+)\s*=\s*(.*?)\s*\]$")
_TILT_AXIS = re.compile(r"tilt\s*axis\s*angle\s*=\s*([-+0-9.eE]+)", re.IGNORECASE)
# The keys icetide reads as numbers; only these are checked, so that an odd value elsewhere never refuses a file.
_NUMBERS = ("ZValue", "TiltAngle", "PixelSpacing", "ExposureDose", "Defocus")
Model = TypeVar("Model", bound=BaseModel)


def _scan(path: Path) -> tuple[dict[str, str], list[str], list[tuple[str, dict[str, str], str]]]:
    """Global keys, title texts and ``(ZValue, keys, where)`` of each image section, in file order, with every
    value as written; other sections are skipped."""
    header: dict[str, str] = {}
    titles: list[str] = []
    images: list[tuple[str, dict[str, str], str]] = []
    current = header
    for lineno, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        where = f"{path}:{lineno}"
        text = line.strip()
        if not text:
            continue
        section = _SECTION.match(text)
        if section:
            kind, value = section.groups()
            if kind == "T":
                titles.append(value)
                current = header
            elif kind == "ZValue":
                current = {}
                images.append((value, current, where))
            else:
                current = {}  # a frame or montage section: read, not returned
            continue
        key, eq, value = text.partition("=")
        if not eq or not key.strip():
            raise IcetideError(f"{where}: expected 'key = value' or a [section], got {text!r}")
        current[key.strip()] = value.strip()
    return header, titles, images


def _numbers(model: type[Model], keys: dict[str, str], where: str) -> Model:
    """The numbers of ``keys`` read by the ``mdocfile`` data ``model``; a bad one raises naming ``where``."""
    try:
        return model.model_validate({k: v for k, v in keys.items() if k in _NUMBERS})
    except ValidationError as exc:
        error = exc.errors()[0]
        kind = "an integer" if error["type"].startswith("int") else "a number"
        raise IcetideError(f"{where}: {error['loc'][0]} is not {kind}: {error['input']!r}") from None


def read_mdoc(path: str | os.PathLike) -> dict:
    """Read a SerialEM ``.mdoc``.

    Returns a dict with ``tilt_angles_deg`` ``(M,)`` in ZValue order (= stack order), ``z_values`` ``(M,)``,
    ``pixel_size_A`` (``PixelSpacing``, global or else the first image's; ``None`` if absent),
    ``tilt_axis_angle_deg`` (from a ``Tilt axis angle = ...`` title, else ``None``), and, when at least one
    image has them, ``exposure_dose`` (e/A^2, ``(M,)``, NaN where missing), ``defocus_um`` (SerialEM's
    ``Defocus``, micrometres, negative = underfocus, ``(M,)``, NaN where missing) and ``date_time`` (list of
    strings or ``None``). ``header`` and ``sections`` keep every ``key = value`` as strings; ``titles`` the
    ``[T = ...]`` texts. Malformed input raises :class:`IcetideError` naming the file and line.
    """
    from mdocfile.data_models import MdocGlobalData, MdocSectionData

    path = Path(path)
    if not path.is_file():
        raise IcetideError(f"{path}: no such file")
    header, titles, found = _scan(path)
    if not found:
        raise IcetideError(f"{path}: no [ZValue = N] sections (not a SerialEM tilt-series .mdoc?)")
    images: dict[int, tuple[MdocSectionData, dict[str, str]]] = {}
    for z_text, keys, where in found:
        image = _numbers(MdocSectionData, {**keys, "ZValue": z_text}, where)
        if image.ZValue in images:
            raise IcetideError(f"{where}: duplicated section [ZValue = {image.ZValue}]")
        if image.TiltAngle is None:
            raise IcetideError(f"{where}: section [ZValue = {image.ZValue}] has no TiltAngle")
        images[image.ZValue] = (image, keys)
    z_values = sorted(images)
    typed = [images[z][0] for z in z_values]
    sections = [images[z][1] for z in z_values]
    pixel_size = _numbers(MdocGlobalData, header, str(path)).PixelSpacing
    out: dict = {
        "tilt_angles_deg": np.asarray([t.TiltAngle for t in typed], dtype=np.float64),
        "z_values": np.asarray(z_values, dtype=int),
        "pixel_size_A": typed[0].PixelSpacing if pixel_size is None else pixel_size,
        "tilt_axis_angle_deg": _tilt_axis(titles),
        "header": header,
        "titles": titles,
        "sections": sections,
    }
    for key, name in (("ExposureDose", "exposure_dose"), ("Defocus", "defocus_um")):
        values = [getattr(t, key) for t in typed]
        if any(v is not None for v in values):
            out[name] = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    if any("DateTime" in s for s in sections):
        out["date_time"] = [s.get("DateTime") for s in sections]
    return out


def _tilt_axis(titles: list[str]) -> float | None:
    for title in titles:
        found = _TILT_AXIS.search(title)
        if found:
            return float(found.group(1).rstrip("."))
    return None


def write_mdoc(
    path: str | os.PathLike,
    tilt_angles_deg,
    pixel_size_A: float,
    image_file: str,
    image_size: tuple[int, int],
    tilt_axis_angle_deg: float | None = None,
    exposure_dose=None,
    acquisition_order=None,
    defocus_um=None,
    voltage_kV: float = 300.0,
    start: datetime.datetime = datetime.datetime(2026, 1, 1, 9, 0, 0),
    seconds_per_view: float = 20.0,
) -> None:
    """Write a SerialEM ``.mdoc`` for a stack, one ``[ZValue = N]`` section per view in stack order. Atomic.

    ``tilt_angles_deg (M,)``; ``image_size`` ``(nx, ny)`` as SerialEM writes it; ``exposure_dose (M,)`` e/A^2
    per view; ``acquisition_order (M,)`` (0 = first) sets ``DateTime`` (``seconds_per_view`` apart from
    ``start``) and, with doses, ``PriorRecordDose``; ``defocus_um (M,)`` positive = underfocus, written as
    SerialEM does (negative = underfocus).
    """
    angles = np.asarray(tilt_angles_deg, dtype=np.float64).reshape(-1)
    m = angles.shape[0]
    dose = None if exposure_dose is None else np.broadcast_to(np.asarray(exposure_dose, dtype=np.float64), (m,))
    order = np.arange(m) if acquisition_order is None else np.asarray(acquisition_order, dtype=int).reshape(m)
    lines = [f"PixelSpacing = {pixel_size_A:g}", f"Voltage = {voltage_kV:g}", f"ImageFile = {image_file}",
             f"ImageSize = {int(image_size[0])} {int(image_size[1])}", "DataMode = 2", ""]
    axis = "" if tilt_axis_angle_deg is None else f"Tilt axis angle = {tilt_axis_angle_deg:.2f}, "
    lines += ["[T = SerialEM: simulated by icetide]", "", f"[T =     {axis}binning = 1  spot = 8  camera = 0]", ""]
    before = None
    if dose is not None:
        taken = np.argsort(order, kind="stable")
        before = np.empty(m)
        before[taken] = np.concatenate([[0.0], np.cumsum(dose[taken])[:-1]])
    for z in range(m):
        when = start + datetime.timedelta(seconds=seconds_per_view * int(order[z]))
        lines += [f"[ZValue = {z}]", f"TiltAngle = {angles[z]:.2f}", f"PixelSpacing = {pixel_size_A:g}"]
        if dose is not None:
            lines += [f"ExposureDose = {dose[z]:g}", f"PriorRecordDose = {before[z]:g}"]
        if defocus_um is not None:
            lines.append(f"Defocus = {-float(np.asarray(defocus_um).reshape(-1)[z]):.4f}")
        lines += [f"DateTime = {when.strftime('%d-%b-%y  %H:%M:%S')}", ""]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines))
