"""The held-out loss scored in the training steps (``fit.validation: steps``) against a separate pass.

Usage: ``python benchmarks/validation_in_steps.py [--epochs 170] [--device cpu]``

The demo's problem (a 128 x 128 x 48 crowded blob phantom, 41 tilts from -60 to +60 degrees, the paper's
deformation profile, 10 dB), default settings; after every epoch both estimates of the validation loss are
taken: the one the training steps gathered (``in_steps``) and a separate pass over the held-out pixels
(``pass``, timed). Prints one JSON object: both curves, their correlation and largest relative difference over
the epochs after ``--skip`` (default 20), the epoch each would call best, and the mean seconds of a training
epoch and of a pass.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from icetide.data import TiltSeries
from icetide.experiments import machine_info
from icetide.experiments.case import reconstruction_config
from icetide.fit import Fitter
from icetide.runtime import resolve_device
from icetide.simulate import crowded_phantom, simulate_tilt_series


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=170)
    parser.add_argument("--skip", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = resolve_device(args.device)
    angles = np.arange(-60, 61, 3.0)
    truth = crowded_phantom((48, 128, 128), seed=0)
    sim = simulate_tilt_series(truth, angles, profile="paper", snr_db=10.0, seed=0)
    fitter = Fitter(TiltSeries(sim.noisy, angles, 10.0), reconstruction_config(48, 10.0, device=str(device)))
    in_steps, by_pass, epoch_s, pass_s = [], [], [], []
    for _ in range(args.epochs):
        t0 = time.perf_counter()
        fitter.train_epoch()
        t1 = time.perf_counter()
        in_steps.append(fitter.epoch_validation_loss(fitter.scale, rolled_back=False))
        t2 = time.perf_counter()
        by_pass.append(fitter.validation_loss())
        t3 = time.perf_counter()
        epoch_s.append(t1 - t0)
        pass_s.append(t3 - t2)
    a, b = np.array(in_steps[args.skip:]), np.array(by_pass[args.skip:])
    print(json.dumps({
        "benchmark": "validation_in_steps", "epochs": args.epochs, "skip": args.skip,
        "in_steps": in_steps, "pass": by_pass,
        "correlation": float(np.corrcoef(a, b)[0, 1]),
        "max_relative_difference": float(np.max(np.abs(a - b) / b)),
        "best_epoch_in_steps": int(np.argmin(in_steps)) + 1, "best_epoch_pass": int(np.argmin(by_pass)) + 1,
        "epoch_s": float(np.mean(epoch_s)), "pass_s": float(np.mean(pass_s)),
        "machine": machine_info(str(device)),
    }))


if __name__ == "__main__":
    main()
