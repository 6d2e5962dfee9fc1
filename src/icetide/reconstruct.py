"""A whole reconstruction: fit the model to a tilt series and write every output into one folder.

Outputs (``out_dir``): ``tomogram.mrc`` (the implicit volume sampled on the voxel grid, ``(thickness, ny, nx)``,
DESIGN.md frame), ``deformations.json`` (estimated, gauge removed), ``aligned.mrc`` (the input series with the
estimated deformations undone), ``tomogram_fbp.mrc`` (FBP of the aligned series), ``alignment.xf`` and
``alignment.tlt`` (IMOD), ``alignment.star`` and ``tomograms.star`` (RELION-5, when the pixel size is known; like
``.xf`` it carries the shifts and rotations only, the local fields have no RELION/IMOD equivalent),
``config.yaml``, ``report.json``, ``checkpoint.pt``. With ``fit.half_maps``: ``tomogram_half1.mrc`` and
``tomogram_half2.mrc`` (the two half volumes; ``tomogram.mrc`` is their mean) and ``fsc_halves.png/.csv``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .alignment import deformations_to_xf
from .config import ReconstructConfig, save_config
from .data import TiltSeries
from .deform import Deformations
from .fit import Fitter, distributed_rank
from .io import write_deformations, write_json, write_mrc, write_tlt
from .io.imod import write_xf
from .io.relion import RelionTomogram, write_relion_tilt_series_star, write_relion_tomograms_star
from .metrics import FSC_TAPER_VOX, edge_taper, fsc
from .plots import plot_fsc
from .prealign import coarse_shifts
from .recon import align_series, fbp
from .volume import ImplicitVolume

__all__ = ["RelionMicroscope", "reconstruct", "sample_tomogram", "write_half_maps"]


@dataclass(frozen=True)
class RelionMicroscope:
    """What RELION-5's ``tomograms.star`` needs beyond the images: voltage (kV), Cs (mm), amplitude contrast."""

    voltage_kV: float = 300.0
    spherical_aberration_mm: float = 2.7
    amplitude_contrast: float = 0.1


@torch.no_grad()
def sample_tomogram(
    volume: ImplicitVolume, translation_xyz, density_scale: float, width_x: int | None = None,
    rows_per_chunk: int = 32,
) -> np.ndarray:
    """The fitted density on the voxel grid, float32 ``(nz, ny, width_x)``, in the units of the input data.

    ``translation_xyz`` (voxels): the gauge translation; the volume is sampled as ``rho(p - d)`` so that it
    matches the reported, gauge-free deformations. ``density_scale``: the fit's data scale (see
    :class:`icetide.fit.FitResult`). ``width_x``: keep the central columns of a volume modelled wider than the
    detector (a laterally unbounded slab); default all. Sampled in bands of rows to bound memory.
    """
    nz, ny, nx = volume.box_shape_zyx
    width_x = nx if width_x is None else int(width_x)
    keep = slice((nx - width_x) // 2, (nx - width_x) // 2 + width_x)
    device = next(volume.parameters()).device
    offset = -torch.as_tensor(translation_xyz, dtype=torch.float32, device=device)
    bands = [
        volume.lattice(offset, rows=slice(r, min(r + rows_per_chunk, ny)))[..., keep].float().cpu()
        for r in range(0, ny, rows_per_chunk)
    ]
    return (torch.cat(bands, dim=1) * density_scale).numpy()


def write_half_maps(
    out_dir: Path, first: np.ndarray, second: np.ndarray, voxel_size_A: float | None, split: str
) -> dict:
    """Write the half tomograms, their FSC (``fsc_halves.png/.csv``, a soft edge of ``FSC_TAPER_VOX``)
    and return the report entry: the split, the resolution at FSC 0.143 and 0.5 (voxels, and Angstrom when the
    pixel size is known) and the curve."""
    write_mrc(out_dir / "tomogram_half1.mrc", first, voxel_size_A)
    write_mrc(out_dir / "tomogram_half2.mrc", second, voxel_size_A)
    curve = fsc(first, second, voxel_size_A, mask=edge_taper(first.shape, FSC_TAPER_VOX))
    plot_fsc({f"half 1 vs half 2 ({split})": curve}, out_dir / "fsc_halves.png", voxel_size_A,
             title="FSC between the half tomograms (0.143: the full tomogram's resolution)")
    return {
        "split": split,
        "resolution": curve["resolution"],
        "frequency_cycles_per_voxel": curve["frequency"].tolist(),
        "fsc": curve["fsc"].tolist(),
        "taper_vox": FSC_TAPER_VOX,
    }


def coarse_start(series: TiltSeries, config: ReconstructConfig) -> Deformations:
    """Starting deformations with shifts from :func:`icetide.prealign.coarse_shifts` and no rotation.

    With a tilt axis at ``psi`` degrees from the image Y axis the images are first turned by ``alpha = -psi``
    (:func:`icetide.recon.align_series`), which puts the axis along Y as the correlation needs; in that frame
    a remaining translation is exactly the model's ``tau`` (``x' = R(alpha) x - tau``), so the shifts carry
    over unchanged, and the fit adds the tilt-axis rotation itself.
    """
    d = Deformations.identity(
        series.tilt_angles_deg, series.shape, config.deform.local_grid, config.deform.local_interpolation
    )
    images = torch.tensor(series.images)
    if series.tilt_axis_angle_deg != 0:
        turn = Deformations.identity(series.tilt_angles_deg, series.shape)
        turn.angles_deg = np.full(series.n_tilts, -series.tilt_axis_angle_deg)
        images = align_series(images, turn)
    d.shifts_px = coarse_shifts(images, series.tilt_angles_deg)
    return d


def reconstruct(
    series: TiltSeries,
    config: ReconstructConfig,
    out_dir: Path,
    init: Deformations | None = None,
    resume: bool = False,
    on_epoch: Callable[[dict], None] | None = None,
    on_phase: Callable[[str], None] | None = None,
    source_path: Path | None = None,
    microscope: RelionMicroscope | None = None,
) -> dict:
    """Fit ``series`` and write all outputs to ``out_dir`` (which must exist). Returns the report.

    ``source_path``: the tilt-series file, named in ``alignment.star`` (``k@path``) so RELION finds the images.
    ``microscope``: when given (and the pixel size is known), also write ``tomograms.star`` for RELION-5.
    In a ``torch.distributed`` run (see :func:`icetide.fit.distributed_rank`) every rank fits and only rank 0
    writes; the other ranks return their fit report.
    """
    out_dir = Path(out_dir)
    phase = on_phase or (lambda name: None)
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    writer = distributed_rank()[0] == 0
    if writer:
        save_config(out_dir / "config.yaml", config)
    prealigned = init is None and not resume and config.deform.prealign and config.deform.shifts
    if prealigned:
        init = coarse_start(series, config)
    fitter = Fitter(series, config, init)
    ckpt = out_dir / "checkpoint.pt"
    if resume:
        fitter.load_checkpoint(ckpt)
    timings["setup_s"] = time.monotonic() - t0

    phase("fitting")
    t0 = time.monotonic()
    result = fitter.run(checkpoint_path=ckpt, on_epoch=on_epoch)  # only rank 0 saves checkpoints
    timings["fit_s"] = time.monotonic() - t0
    if not writer:
        return result.report

    phase("sampling the tomogram")
    t0 = time.monotonic()
    voxel = series.pixel_size_A
    width = series.shape[1]
    tomogram = sample_tomogram(result.volume, result.translation_xyz, result.density_scale, width)
    half_maps = None
    if result.half_volume is not None:
        second = sample_tomogram(result.half_volume, result.translation_xyz, result.density_scale, width)
        half_maps = write_half_maps(out_dir, tomogram, second, voxel, config.fit.half_maps)
        tomogram = (tomogram + second) / 2
    write_mrc(out_dir / "tomogram.mrc", tomogram, voxel)
    timings["sample_s"] = time.monotonic() - t0

    phase("aligning the series and FBP")
    t0 = time.monotonic()
    d = result.deformations
    write_deformations(out_dir / "deformations.json", d)
    write_xf(out_dir / "alignment.xf", deformations_to_xf(d))
    write_tlt(out_dir / "alignment.tlt", d.tilt_angles_deg)
    if voxel is not None:
        name = Path(source_path).stem if source_path is not None else "tilt_series"
        images = str(Path(source_path).resolve()) if source_path is not None else None
        name = name.replace(" ", "_")
        write_relion_tilt_series_star(out_dir / "alignment.star", d, voxel, name, images)
        if microscope is not None:
            nz, ny, nx = tomogram.shape
            entry = RelionTomogram(
                name, str((out_dir / "alignment.star").resolve()), microscope.voltage_kV,
                microscope.spherical_aberration_mm, microscope.amplitude_contrast, voxel, voxel, (nx, ny, nz),
            )
            write_relion_tomograms_star(out_dir / "tomograms.star", [entry])
    aligned = align_series(torch.tensor(series.images), d)
    write_mrc(out_dir / "aligned.mrc", aligned.numpy(), voxel, stack=True)
    thickness = tomogram.shape[0]
    write_mrc(out_dir / "tomogram_fbp.mrc", fbp(aligned, d.tilt_angles_deg, thickness).numpy(), voxel)
    timings["outputs_s"] = time.monotonic() - t0

    report = dict(result.report)
    report["timings_s"] = timings
    report["prealigned"] = prealigned
    report["gauge_translation_xyz_vox"] = result.translation_xyz.tolist()
    report["exported_alignment"] = (
        "alignment.xf, alignment.tlt" + (", alignment.star" if voxel is not None else " (no alignment.star: pixel size unknown)")
        + ": shifts and in-plane rotations only; the local fields are in deformations.json"
    )
    if half_maps is not None:
        report["half_maps"] = half_maps
    report["input"] = {
        "n_tilts": series.n_tilts,
        "detector_shape": list(series.shape),
        "pixel_size_A": voxel,
        "tilt_axis_angle_deg": series.tilt_axis_angle_deg,
    }
    write_json(out_dir / "report.json", report)
    return report
