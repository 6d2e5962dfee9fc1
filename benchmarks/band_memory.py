"""Epoch time and peak GPU memory of a paper-scale fit by lattice band size and activation recomputation.

Usage: ``python benchmarks/band_memory.py --phantom PHANTOM_MRC [--variants 86:0,24:0,86:524288]
[--precisions fp32,mixed] [--profile 86:524288]``

The 512 x 512 x 180 phantom (``--phantom``, unbinned; else a crowded blob phantom of that size), 61 tilts from -60
to +60 degrees, paper profile, 10 dB, the paper's volume configuration, deformations released from the first
epoch. Each variant ``ROWS:PIECE`` fits with lattice bands of ``ROWS`` rows and, when ``PIECE`` > 0, the field's
activations recomputed in pieces of ``PIECE`` voxels (``fit.recompute_field``; ``renderer.recompute_voxels``);
after one warm-up epoch and validation pass, three training epochs and one validation pass are timed, with the
allocator's peak reset before each. ``--profile`` names one variant whose third epoch also runs under
``torch.profiler`` (its 20 costliest CUDA operations go to stderr). Prints one JSON object. Needs CUDA (exit 3).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from icetide.config import VolumeSettings
from icetide.data import TiltSeries
from icetide.experiments import machine_info
from icetide.experiments.case import load_phantom, reconstruction_config
from icetide.fit import Fitter
from icetide.simulate import crowded_phantom, simulate_tilt_series


def measure(series: TiltSeries, thickness: int, rows: int, piece: int, precision: str, profile: bool) -> dict:
    config = reconstruction_config(thickness, 10.0, device="cuda", lattice_rows=rows, warmup_epochs=0,
                                   precision=precision, recompute_field=bool(piece))
    paper = VolumeSettings.paper()
    config.volume = VolumeSettings(**{k: getattr(paper, k) for k in VolumeSettings.model_fields})
    fitter = Fitter(series, config)
    if piece:
        fitter.scales[0].renderer.recompute_voxels = piece
    fitter.train_epoch()
    fitter.validation_loss()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    epochs = []
    for i in range(3):
        t0 = time.perf_counter()
        if profile and i == 2:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                                    torch.profiler.ProfilerActivity.CPU]) as prof:
                fitter.train_epoch()
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20), file=sys.stderr)
        else:
            fitter.train_epoch()
            torch.cuda.synchronize()
        epochs.append(time.perf_counter() - t0)
    train_peak = torch.cuda.max_memory_allocated() / 2**20
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    fitter.validation_loss()
    torch.cuda.synchronize()
    validation_s = time.perf_counter() - t0
    out = {"lattice_rows": rows, "recompute_voxels": piece, "precision": precision,
           "steps_per_epoch": len(fitter.epoch_bands(fitter.scale)), "epoch_s": min(epochs[:2]) if profile else min(epochs),
           "validation_s": validation_s, "train_peak_mb": train_peak,
           "validation_peak_mb": torch.cuda.max_memory_allocated() / 2**20}
    print(json.dumps(out), file=sys.stderr, flush=True)
    del fitter
    torch.cuda.empty_cache()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phantom", type=Path, default=None)
    parser.add_argument("--variants", default="86:0,24:0,86:524288")
    parser.add_argument("--precisions", default="fp32,mixed")
    parser.add_argument("--profile", default=None, help="ROWS:PIECE of the variant to profile (fp32)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("skipped: needs CUDA", file=sys.stderr)
        sys.exit(3)
    if args.phantom is not None:
        truth, _, _ = load_phantom(args.phantom)
    else:
        truth = crowded_phantom((180, 512, 512), seed=0)
    angles = np.arange(-60, 61, 2.0)
    sim = simulate_tilt_series(torch.from_numpy(truth).cuda(), angles, snr_db=10.0, seed=0)
    series = TiltSeries(sim.noisy, angles, 10.0)
    results = []
    for precision in args.precisions.split(","):
        for variant in args.variants.split(","):
            rows, piece = (int(v) for v in variant.split(":"))
            profile = precision == "fp32" and variant == args.profile
            results.append(measure(series, truth.shape[0], rows, piece, precision, profile))
    print(json.dumps({"benchmark": "band_memory", "volume_shape_zyx": list(truth.shape), "n_tilts": len(angles),
                      "volume": "paper", "results": results, "machine": machine_info("cuda")}, indent=1))


if __name__ == "__main__":
    main()
