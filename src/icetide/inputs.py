"""A tilt series and its starting alignment from the files a user names: what ``icetide reconstruct``, ``icetide
fbp`` and ``icetide batch`` all read the same way (the series, the views kept, an alignment file for every view
of the stack, a RELION-5 project's series)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .alignment import aln_to_deformations, xf_to_deformations
from .data import InputStack
from .errors import IcetideError
from .io import read_aln, read_deformations, read_xf
from .io.relion_project import RelionTiltSeries
from .io.series import load_series

__all__ = ["ANGLE_TOLERANCE_DEG", "load_inputs", "read_alignment", "relion_inputs"]

# IMOD writes tilt angles with two decimals.
ANGLE_TOLERANCE_DEG = 0.01


def read_alignment(
    tilt_angles_deg, detector_shape: tuple[int, int], deformations: Path | None, xf: Path | None, aln: Path | None,
    keep=None,
):
    """The alignment of the kept views of a stack from deformations.json, an IMOD ``.xf`` or an AreTomo ``.aln``,
    or ``None``.

    ``tilt_angles_deg``: of every view of the stack, in stack order; ``detector_shape``: ``(ny, nx)``; ``keep``:
    the 0-based stack indices of the views kept (default all). A deformations.json or ``.xf`` has one entry per
    view of the stack (as IMOD's files and icetide's ``STEM.xf`` do) or one per kept view (as icetide's
    deformations.json of a run with the same ``--exclude``); deformations.json's tilt angles must match.
    ``.aln`` rows are matched by tilt angle to the kept views.
    """
    angles = np.asarray(tilt_angles_deg, dtype=np.float64).reshape(-1)
    keep = np.arange(len(angles)) if keep is None else np.asarray(keep, dtype=int)

    def kept_rows(n_rows: int, source: Path, noun: str):
        """The rows of a file of ``n_rows`` entries (``noun``) that describe the kept views."""
        if n_rows == len(angles):
            return keep
        if n_rows == len(keep):
            return slice(None)
        also = f" or the {len(keep)} it keeps" if len(keep) < len(angles) else ""
        raise IcetideError(f"{source}: {n_rows} {noun} for a series of {len(angles)} views{also}")

    if deformations is not None:
        d = read_deformations(deformations, detector_shape)
        d = d.subset(kept_rows(d.n_tilts, deformations, "tilts"))
        worst = float(np.abs(d.tilt_angles_deg - angles[keep]).max())
        if worst > ANGLE_TOLERANCE_DEG:
            raise IcetideError(f"{deformations}: tilt angles differ from the angle file by up to {worst:.3g} degrees")
        return d
    if xf is not None:
        transforms = read_xf(xf)
        transforms = transforms[kept_rows(len(transforms), xf, "transforms")]
        # Real .xf files often carry a slight magnification or stretch: keep the nearest rotation (warns).
        return xf_to_deformations(transforms, angles[keep], detector_shape, non_rotation="nearest")
    if aln is not None:
        return aln_to_deformations(read_aln(aln), angles[keep], detector_shape)
    return None


def load_inputs(
    stack, angles, mdoc: Path | None, pixel_size_A: float | None, tilt_axis_angle_deg: float | None,
    exclude: str | None, invert: bool, deformations: Path | None = None, xf: Path | None = None,
    aln: Path | None = None, image_names=None, **series_options,
):
    """The tilt series to fit (:func:`icetide.io.series.load_series`, ``series_options`` passed on), its starting
    alignment (:func:`read_alignment`, or ``None``) and the :class:`icetide.data.InputStack` it came from
    (``image_names``: each view's own file where ``stack`` is one file per view). With a start, the series'
    tilt-axis angle is 0: the starting rotations already hold the axis (one read from the ``.mdoc`` must not
    count twice)."""
    series, keep, all_angles = load_series(stack, angles, mdoc, pixel_size_A, tilt_axis_angle_deg, exclude, invert,
                                           **series_options)
    init = read_alignment(all_angles, series.shape, deformations, xf, aln, keep)
    if init is not None:
        series.tilt_axis_angle_deg = 0.0
    names = None if image_names is None else tuple(str(n) for n in image_names)
    return series, init, InputStack(all_angles, keep, invert, names)


def relion_inputs(found: RelionTiltSeries, given: dict) -> tuple[dict, str]:
    """The inputs a RELION-5 tilt series (:class:`icetide.io.relion_project.RelionTiltSeries`) gives where the
    options ``given`` (``angles``, ``mdoc``, ``defocus``, ``pre_exposure``, ``half_series``, ``half_maps``) leave
    them open, plus ``tilt_series`` (one MRC per view, in order of tilt angle), ``image_names`` (each view's
    micrograph, for the written STAR), ``source_path`` (its per-series STAR, named after the series),
    ``pixel_size`` and ``tilt_axis_angle`` (to use where no option gives them) and ``ctf`` (the STAR's optics
    and defocus hand by :class:`icetide.config.CtfSettings` field); and a line saying what the STAR gave.
    Its even/odd frame sums become the two half series unless other half maps or a half series are asked for."""
    entry = found.entry
    out = dict(given, tilt_series=list(found.images), source_path=entry.star,
               image_names=[str(p.resolve()) for p in found.images], pixel_size=entry.pixel_size_A,
               tilt_axis_angle=found.tilt_axis_angle_deg,
               ctf={"voltage_kV": entry.voltage_kV, "spherical_aberration_mm": entry.spherical_aberration_mm,
                    "amplitude_contrast": entry.amplitude_contrast, "defocus_hand": entry.hand})
    used = [f"RELION-5 series {found.name}: {len(found.images)} micrographs in tilt-angle order"]
    if given["angles"] is None and given["mdoc"] is None:
        out["angles"] = found.tilt_angles_deg
    if found.defocus_A is not None and given["defocus"] is None:
        out["defocus"] = found.defocus_A
        used.append("defocus (rlnDefocusU/V)")
    if given["pre_exposure"] is None:
        out["pre_exposure"] = found.pre_exposure_e_per_A2
    if found.odd is not None and given["half_series"] is None and given["half_maps"] in (None, "series"):
        out["tilt_series"], out["half_series"] = list(found.odd), list(found.even)
        used.append("half series rlnMicrographNameOdd/Even")
    pixel = "" if entry.pixel_size_A is None else f"pixel {entry.pixel_size_A:g} A, "
    used.append(f"{pixel}nominal tilt axis {found.tilt_axis_angle_deg:g} deg, hand {entry.hand:+d}")
    return out, ", ".join(used)
