"""Cost of a lattice epoch cut into bands: warping only the pixel rows that can see each band, or every row.

Usage: ``python benchmarks/band_step.py [--device cpu|cuda] [--size 256] [--rows 32] [--repeats 2]``

A ``size x size`` detector, 61 tilts (-60..+60 degrees), a 48-voxel slab of the crowded blob phantom, 10 dB,
paper profile; the fit's lattice bands are ``--rows`` rows (so an epoch is ``size / rows`` steps). After one
warm-up epoch, each variant's training epoch and validation pass are timed (best of ``--repeats``, the two
variants interleaved): ``restricted`` is the fit as it runs (:meth:`icetide.fit.problem.SamplingScale.pixel_rows`), ``all_rows`` warps and
scores every pixel of the detector at every band step (the behaviour before the restriction). Prints one JSON
object with both timings and their ratios.
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
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    device = resolve_device(args.device)
    angles = np.arange(-60, 61, 2.0)
    truth = crowded_phantom((48, args.size, args.size), seed=0)
    sim = simulate_tilt_series(truth, angles, snr_db=10.0, seed=0)
    series = TiltSeries(sim.noisy, angles, 10.0)
    config = reconstruction_config(48, 10.0, device=str(device), lattice_rows=args.rows, warmup_epochs=0)
    fitter = Fitter(series, config)
    fitter.train_epoch()
    scale = fitter.scale
    restricted = scale.pixel_rows
    everything = lambda rows, reach_px: slice(0, series.shape[0])  # noqa: E731
    best = {name: {"epoch_s": float("inf"), "validation_s": float("inf")} for name in ("restricted", "all_rows")}
    for _ in range(args.repeats):
        for name, rows in (("restricted", restricted), ("all_rows", everything)):
            scale.pixel_rows = rows
            t0 = time.perf_counter()
            fitter.train_epoch()
            t1 = time.perf_counter()
            fitter.validation_loss()
            t2 = time.perf_counter()
            best[name]["epoch_s"] = min(best[name]["epoch_s"], t1 - t0)
            best[name]["validation_s"] = min(best[name]["validation_s"], t2 - t1)
    print(json.dumps({
        "benchmark": "band_step", "detector": [args.size, args.size], "n_tilts": len(angles), "thickness": 48,
        "lattice_rows": args.rows, "steps_per_epoch": len(fitter.epoch_bands(scale)), **best,
        "epoch_speedup": best["all_rows"]["epoch_s"] / best["restricted"]["epoch_s"],
        "validation_speedup": best["all_rows"]["validation_s"] / best["restricted"]["validation_s"],
        "machine": machine_info(str(device)),
    }))


if __name__ == "__main__":
    main()
