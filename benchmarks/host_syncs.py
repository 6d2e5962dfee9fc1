"""Host synchronisations of a fit on CUDA: how often the host waits for the GPU in an epoch, and where.

Usage: ``python benchmarks/host_syncs.py [--size 128] [--lattice-rows 32] [--renderer lattice|rays]``

A ``size x size`` detector, 41 tilts (-60..+60 degrees), a ``size / 8 * 3``-voxel slab of the crowded blob
phantom, 10 dB, paper profile, default fit settings with deformations released from the first epoch;
``--lattice-rows`` cuts each epoch into bands. After two warm-up epochs (kernels compiled, projector
matrices built), one training epoch and one validation pass run under ``torch.cuda.set_sync_debug_mode("warn")``,
which reports every operation that makes the host wait for the GPU. Prints one JSON object: the steps of the
epoch, the synchronisations counted in the epoch and in the validation pass, the icetide source lines they
came from, and the epoch and validation times without the debug mode (best of 3). Exits 3 without CUDA.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch

from icetide.data import TiltSeries
from icetide.experiments import machine_info
from icetide.experiments.case import reconstruction_config
from icetide.fit import Fitter
from icetide.simulate import crowded_phantom, simulate_tilt_series

SOURCE = str(Path(__file__).resolve().parents[1] / "src" / "icetide")


def count_syncs(work) -> tuple[int, dict[str, int]]:
    """Run ``work()`` under the sync debug mode "warn": the number of synchronisations and, per icetide source
    line (the innermost icetide frame of each), how many came from it."""
    sites: collections.Counter = collections.Counter()
    count = 0
    show = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        nonlocal count
        if "called a synchronizing CUDA operation" not in str(message):
            return show(message, category, filename, lineno, file, line)
        count += 1
        stack = traceback.extract_stack()[:-1]
        ours = [f for f in stack if f.filename.startswith(SOURCE)]
        if ours:
            where = f"{Path(ours[-1].filename).name}:{ours[-1].lineno} {ours[-1].line}"
        else:  # e.g. a backward function run by autograd's device thread: its own innermost frames
            where = "outside icetide: " + " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in stack[-3:][::-1])
        sites[where] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            work()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return count, dict(sites.most_common())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--lattice-rows", type=int, default=None)
    parser.add_argument("--renderer", choices=["lattice", "rays"], default="lattice")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("skipped: needs CUDA", file=sys.stderr)
        sys.exit(3)
    angles = np.arange(-60, 61, 3.0)
    thickness = args.size // 8 * 3
    truth = crowded_phantom((thickness, args.size, args.size), seed=0)
    sim = simulate_tilt_series(truth, angles, snr_db=10.0, seed=0)
    config = reconstruction_config(thickness, 10.0, device="cuda", lattice_rows=args.lattice_rows,
                                   renderer=args.renderer, warmup_epochs=0)
    fitter = Fitter(TiltSeries(sim.noisy, angles, 10.0), config)
    for _ in range(2):
        fitter.train_epoch()
        fitter.validation_loss()
    steps_before = fitter.step
    epoch_syncs, epoch_sites = count_syncs(fitter.train_epoch)
    steps = fitter.step - steps_before
    validation_syncs, validation_sites = count_syncs(fitter.validation_loss)
    times = {"epoch_s": [], "validation_s": []}
    for _ in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fitter.train_epoch()
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        fitter.validation_loss()
        torch.cuda.synchronize()
        times["epoch_s"].append(t1 - t0)
        times["validation_s"].append(time.perf_counter() - t1)
    print(json.dumps({
        "benchmark": "host_syncs", "detector": [args.size, args.size], "thickness": thickness,
        "n_tilts": len(angles), "renderer": args.renderer, "lattice_rows": fitter.scales[0].lattice_rows,
        "steps_per_epoch": steps, "syncs_per_epoch": epoch_syncs, "epoch_sync_sites": epoch_sites,
        "syncs_per_validation": validation_syncs, "validation_sync_sites": validation_sites,
        "epoch_s": min(times["epoch_s"]), "validation_s": min(times["validation_s"]),
        "machine": machine_info("cuda"),
    }, indent=1))


if __name__ == "__main__":
    main()
