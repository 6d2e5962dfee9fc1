"""Score several reconstructions against one truth by one procedure and write the figures.

The procedure: docs/CONVENTIONS.md "Evaluation".

Shared by ``icetide evaluate`` and ``icetide demo`` so that every number in a table was made the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from .deform import Deformations
from .metrics import apply_translation, deformation_errors, evaluate_reconstruction
from .plots import plot_deformation_errors, plot_fourier_slices, plot_fsc, plot_local_fields, plot_orthoslices

__all__ = ["REGISTRATION_NOTE", "display_tilts", "evaluate_volumes"]

REGISTRATION_NOTE = (
    "sub-voxel translation maximising the cross-correlation with the truth, applied as a periodic Fourier shift; "
    "no scaling"
)


def display_tilts(tilt_angles_deg: np.ndarray) -> list[int]:
    """The first tilt, the one nearest 0 degrees and the last (distinct, in order)."""
    return sorted({0, int(np.argmin(np.abs(tilt_angles_deg))), len(tilt_angles_deg) - 1})


def evaluate_volumes(
    volumes: Mapping[str, np.ndarray],
    truth: np.ndarray,
    folder: Path,
    voxel_size_A: float | None = None,
    mask: np.ndarray | None = None,
    register: bool = True,
    taper_vox: float = 0.0,
    deformations: tuple[Deformations, Deformations] | None = None,
) -> dict:
    """Score each ``(nz, ny, nx)`` volume against ``truth`` and write figures into ``folder`` (which must exist).

    Returns ``{"reconstructions": {name: evaluate_reconstruction(...)}, "deformations": deformation_errors(...)
    or absent}``. Figures: ``fsc.png``, ``orthoslices.png``, ``fourier_slices.png`` (each with its data file) and,
    with ``deformations = (true, estimated)``, ``deformation_errors.png`` and ``local_fields.png``.
    """
    folder = Path(folder)
    results = {
        name: evaluate_reconstruction(volume, truth, voxel_size_A, mask, register, taper_vox)
        for name, volume in volumes.items()
    }
    registered = {name: apply_translation(v, results[name]["shift_zyx_vox"]) for name, v in volumes.items()}
    plot_fsc({name: r["fsc"] for name, r in results.items()}, folder / "fsc.png", voxel_size_A)
    plot_orthoslices({"truth": truth, **registered}, folder / "orthoslices.png")
    plot_fourier_slices({"truth": truth, **registered}, folder / "fourier_slices.png")
    report: dict = {"reconstructions": results}
    if deformations is not None:
        true, est = deformations
        errors = deformation_errors(true, est)
        report["deformations"] = errors
        plot_deformation_errors(errors, true.tilt_angles_deg, folder / "deformation_errors.png")
        plot_local_fields(true, est, display_tilts(true.tilt_angles_deg), folder / "local_fields.png")
    return report
