"""Tilt-axis search (``reconstruct --tilt-axis-search``) on simulated series with a known axis.

Usage: ``python benchmarks/tilt_axis.py [--search 6]``

An isolated object (a 64 x 64 x 24 crowded blob phantom centred in a 96 x 96 field, nothing outside it), 41 tilts
from -60 to +60 degrees, each image turned so that the tilt axis lies ``psi`` degrees from the image Y axis
(``alpha = -psi``) and shifted by up to ``--shift`` px per component, Gaussian noise at the SNR given; and the
same with the phantom filling the whole field (a slab wider than the view), with and without dense beads on its
two surfaces. For each case both measures of ``reconstruct``'s search (``deform.axis_search``) look within
``+-search`` degrees of 0: ``profiles`` (:func:`icetide.prealign.estimate_tilt_axis`) and ``sharpness``
(:func:`icetide.prealign.estimate_tilt_axis_by_sharpness`). Prints one JSON object: true and estimated axis,
error, and whether the estimate lies inside the range (``reconstruct`` keeps its start angle otherwise).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from icetide.deform import Deformations
from icetide.experiments import machine_info
from icetide.prealign import estimate_tilt_axis, estimate_tilt_axis_by_sharpness
from icetide.simulate import crowded_phantom, simulate_tilt_series

CASES = [  # (psi_deg, snr_db, max shift px, specimen)
    (3.0, 10.0, 5.0, "isolated"),
    (-1.7, 10.0, 5.0, "isolated"),
    (3.0, 0.0, 5.0, "isolated"),
    (0.8, 0.0, 10.0, "isolated"),
    (3.0, 10.0, 5.0, "filling the view"),
    (3.0, 10.0, 5.0, "filling the view, beads"),
    (-2.2, 0.0, 10.0, "filling the view, beads"),
]


def with_beads(volume: np.ndarray, seed: int = 4) -> np.ndarray:
    """``volume`` with ten 3-voxel beads of density 6 on each of its two surfaces (2 voxels inside)."""
    out = volume.copy()
    rng = np.random.default_rng(seed)
    nz, ny, nx = out.shape
    for z in (2, nz - 3):
        for y, x in rng.integers(8, min(ny, nx) - 8, (10, 2)):
            out[z - 1 : z + 2, y - 1 : y + 2, x - 1 : x + 2] += 6.0
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--search", type=float, default=6.0, help="search range, +- degrees")
    args = parser.parse_args()
    angles = np.arange(-60, 61, 3.0)
    isolated = np.zeros((24, 96, 96), np.float32)
    isolated[:, 16:-16, 16:-16] = crowded_phantom((24, 64, 64), seed=1)
    filling = crowded_phantom((24, 96, 96), seed=1)
    results = []
    for psi, snr, shift, specimen in CASES:
        rng = np.random.default_rng(0)
        m = len(angles)
        true = Deformations(angles, rng.uniform(-shift, shift, (m, 2)), np.full(m, -psi), np.zeros((m, 2, 3, 3)),
                            (96, 96))
        volume = {"isolated": isolated, "filling the view": filling}.get(specimen)
        volume = with_beads(filling) if volume is None else volume
        sim = simulate_tilt_series(volume, angles, deformations=true, snr_db=snr, seed=1, samples_per_voxel=1.0)
        for method, search in (("profiles", estimate_tilt_axis), ("sharpness", estimate_tilt_axis_by_sharpness)):
            t0 = time.perf_counter()
            found = search(sim.noisy, angles, 0.0, args.search)
            estimate = found["tilt_axis_angle_deg"]
            results.append({
                "peaked": found.get("peaked"),
                "specimen": specimen, "method": method, "true_deg": psi, "snr_db": snr, "max_shift_px": shift,
                "estimate_deg": estimate, "error_deg": estimate - psi, "inside_range": abs(estimate) < args.search - 0.5,
                "seconds": time.perf_counter() - t0,
            })
    print(json.dumps({"benchmark": "tilt_axis", "n_tilts": len(angles), "search_deg": args.search,
                      "results": results, "machine": machine_info("cpu")}, indent=1))


if __name__ == "__main__":
    main()
