"""The fitted field as a tomogram: sampled on the voxel grid in the input's units, and the half tomograms with
their FSC."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .io import write_mrc
from .metrics import FSC_TAPER_VOX, edge_taper, fsc
from .output_files import OutputNames
from .plots import plot_fsc
from .volume import ImplicitVolume

__all__ = ["sample_tomogram", "write_half_maps"]


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
    out_dir: Path, names: OutputNames, first: np.ndarray, second: np.ndarray, voxel_size_A: float | None,
    split: str, label: str | None = None,
) -> dict:
    """Write the half tomograms (``names.half(k)``, MRC header ``label``), their FSC (``fsc_halves.png/.csv``, a soft edge of
    ``FSC_TAPER_VOX``) and return the report entry: the split, the resolution at FSC 0.143 and 0.5 (voxels, and
    Angstrom when the pixel size is known) and the curve."""
    write_mrc(out_dir / names.half(1), first, voxel_size_A, label=label)
    write_mrc(out_dir / names.half(2), second, voxel_size_A, label=label)
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
