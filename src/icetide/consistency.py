"""How well an alignment explains a tilt series without ground truth: the even/odd-tilt FSC score.

The series is aligned (:func:`icetide.classical.align_series`), its tilts are split by angle order into the even
and the odd ones, each half is reconstructed by FBP, and the Fourier shell correlation of the two half
tomograms is averaged over the shells up to half Nyquist. The halves share no image, so their noise is
independent; a misaligned view puts its features in different places in each half's reconstruction and lowers
the correlation. The score ranks alignments of the same series; it does not compare series.
"""

from __future__ import annotations

import numpy as np
import torch

from .deform import Deformations
from .metrics import edge_taper, fsc
from .classical import align_series, fbp, standardised

__all__ = ["even_odd_fsc"]

# Shells averaged by the score: up to this fraction of Nyquist (0.5 cycles per voxel).
SCORE_UP_TO_NYQUIST = 0.5
# Soft edge of the half tomograms before their FSC, voxels (the box faces would add a shared signal).
TAPER_VOX = 8


def even_odd_fsc(images, deformations: Deformations, thickness: int) -> dict:
    """Even/odd-tilt FSC of ``images (M, ny, nx)`` aligned by ``deformations`` (module docstring).

    Each aligned image is normalised to mean 0 and standard deviation 1 first (the score ignores per-tilt
    levels and gains). ``thickness``: voxels of the half tomograms along z. Returns ``{"score"}`` (the mean FSC
    over the shells in ``(0, SCORE_UP_TO_NYQUIST * 0.5]`` cycles per voxel), ``frequency`` and ``fsc`` (lists).
    """
    aligned = standardised(align_series(torch.as_tensor(np.asarray(images), dtype=torch.float32), deformations))
    order = np.argsort(deformations.tilt_angles_deg, kind="stable")
    halves = [
        fbp(aligned[torch.as_tensor(part)], deformations.tilt_angles_deg[part], thickness).numpy()
        for part in (order[0::2], order[1::2])
    ]
    taper = min(TAPER_VOX, max(1, min(halves[0].shape) // 4))
    curve = fsc(halves[0], halves[1], mask=edge_taper(halves[0].shape, taper))
    frequency, values = curve["frequency"], curve["fsc"]
    shells = (frequency > 0) & (frequency <= 0.5 * SCORE_UP_TO_NYQUIST)
    return {"score": float(values[shells].mean()), "frequency": frequency.tolist(), "fsc": values.tolist()}
