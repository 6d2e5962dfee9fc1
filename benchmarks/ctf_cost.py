"""Cost of the CTF in the forward model (``ctf.correction: model``) against fitting phase-flipped images.

Usage: ``python benchmarks/ctf_cost.py [--device cpu|cuda] [--size 128] [--pixel 5] [--repeats 3]``

A ``size x size`` detector, 41 tilts (-60..+60 degrees), a slab ``3/8 size`` thick of the crowded blob phantom
at ``--pixel`` A, the CTF at 3 um (``simulate --ctf`` defaults), 10 dB. Two fitters on the same data, the
default settings otherwise: ``phaseflip`` (images flipped once before the fit) and ``model`` (every predicted
image filtered by its tilt's CTF). A training epoch and a validation pass of each are timed, interleaved, best
of ``--repeats`` after one warm-up run each; the one-off phase flipping of the series is timed too.
Prints one JSON object with the timings and their ratios, and the number of defocus values each tilt's filter
interpolates between at that pixel size.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np

from icetide.ctf import defocus_offsets_A, defocus_step_A
from icetide.data import TiltSeries
from icetide.experiments import machine_info
from icetide.experiments.case import reconstruction_config
from icetide.fit import Fitter
from icetide.runtime import resolve_device
from icetide.correction import correct_optics
from icetide.simulate import Optics, crowded_phantom, simulate_tilt_series
from timing import best_times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--pixel", type=float, default=5.0, help="pixel size, A")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = resolve_device(args.device)
    angles = np.arange(-60, 61, 3.0)
    thickness = args.size * 3 // 8
    truth = crowded_phantom((thickness, args.size, args.size), seed=0)
    optics = Optics(pixel_size_A=args.pixel)
    sim = simulate_tilt_series(truth, angles, snr_db=10.0, seed=0, optics=optics)
    series = TiltSeries(sim.noisy, angles, args.pixel, defocus_A=sim.defocus_A)
    fitters, flip_s = {}, 0.0
    for mode in ("phaseflip", "model"):
        config = reconstruction_config(thickness, args.pixel, device=str(device), warmup_epochs=0)
        config.ctf.correction = mode
        t0 = time.perf_counter()
        fitted, _ = correct_optics(series, config)
        if mode == "phaseflip":
            flip_s = time.perf_counter() - t0
        fitters[mode] = Fitter(fitted, config)
    steps = {}
    for mode, fitter in fitters.items():
        steps[f"{mode}/epoch_s"] = fitter.train_epoch
        steps[f"{mode}/validation_s"] = fitter.validation_loss
    times = best_times(steps, args.repeats, device)
    best = {mode: {key: times[f"{mode}/{key}"] for key in ("epoch_s", "validation_s")} for mode in fitters}
    step = defocus_step_A(args.pixel, optics.microscope, math.radians(22.5))
    spreads = [float(np.ptp(defocus_offsets_A(series.shape, args.pixel, a).numpy())) for a in angles]
    nodes = [max(1, math.ceil(s / step - 1e-9) + 1) for s in spreads]
    print(json.dumps({
        "benchmark": "ctf_cost", "detector": [args.size, args.size], "n_tilts": len(angles), "thickness": thickness,
        "pixel_size_A": args.pixel, "defocus_values_per_tilt": {"min": min(nodes), "max": max(nodes)},
        "phase_flip_series_s": flip_s, **best,
        "model_over_phaseflip_epoch": best["model"]["epoch_s"] / best["phaseflip"]["epoch_s"],
        "model_over_phaseflip_validation": best["model"]["validation_s"] / best["phaseflip"]["validation_s"],
        "machine": machine_info(str(device)),
    }, indent=1))


if __name__ == "__main__":
    main()
