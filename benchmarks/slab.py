"""A laterally unbounded specimen: ``specimen: box`` against ``specimen: slab`` on a slab wider than the detector.

Usage: ``python benchmarks/slab.py [--epochs 150] [--seed 5]``

A 144 x 48 x 24 crowded phantom (three detector widths) seen by a 48 x 48 detector at its centre, 31 tilts from -60
to +60 degrees, 10 dB, no deformations (so the comparison is about the forward model only, and nothing is
estimated but the volume). icetide fits it with the detector-sized box and with the padded slab; both tomograms
are scored against the central 48 columns of the phantom (registration, CC), next to FBP of an undeformed
series. Prints one JSON object: CC, epochs, seconds and the modelled shape for each, and the FBP CC.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from icetide import TiltSeries
from icetide.config import ReconstructConfig
from icetide.deform import Deformations
from icetide.experiments import machine_info
from icetide.fit import Fitter, run_fit
from icetide.metrics import evaluate_reconstruction
from icetide.classical import fbp
from icetide.tomogram import sample_tomogram
from icetide.simulate import crowded_phantom, simulate_tilt_series


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args()
    nz, ny, nx = 24, 48, 48
    wide = crowded_phantom((nz, ny, 3 * nx), seed=args.seed)
    angles = np.arange(-60.0, 61.0, 4.0)
    still = Deformations.identity(angles, (ny, nx))
    sim = simulate_tilt_series(wide, angles, snr_db=10, seed=0, detector_shape=(ny, nx), deformations=still,
                               samples_per_voxel=1.0)
    truth = wide[:, :, nx : 2 * nx]
    result: dict = {"benchmark": "slab", "phantom_shape_zyx": list(wide.shape), "detector": [ny, nx],
                    "n_tilts": len(angles)}
    for specimen in ("box", "slab"):
        config = ReconstructConfig.model_validate({
            "thickness": nz, "specimen": specimen,
            "deform": {"shifts": False, "rotations": False, "local": False, "prealign": False},
            "fit": {"epochs": args.epochs, "device": "cpu", "seed": 0},
        })
        t0 = time.monotonic()
        fitter = Fitter(TiltSeries(sim.noisy, angles), config)
        fit = run_fit(fitter)
        tomogram = sample_tomogram(fit.volume, fit.translation_xyz, fit.density_scale, nx)
        result[specimen] = {"cc": evaluate_reconstruction(tomogram, truth)["cc"], "epochs": fit.report["epochs"],
                            "seconds": time.monotonic() - t0, "model_shape_zyx": list(fitter.model_shape_zyx)}
    oracle = fbp(torch.from_numpy(sim.noisy_undeformed), angles, nz).numpy()
    result["fbp_cc"] = evaluate_reconstruction(oracle, truth)["cc"]
    result["machine"] = machine_info("cpu")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
