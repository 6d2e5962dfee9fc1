"""Scaling on the CPU: one series on 1 process vs 2 gloo ranks, and a batch of series on 1 vs 2 Dask workers.

Usage: ``python benchmarks/scaling.py [--epochs 30] [--series 4]``

(1) ``torch.distributed``: a 96 x 96 x 32 crowded phantom, 41 tilts, 10 dB, paper deformations, ``--epochs``
epochs of the default lattice renderer, in one process with all cores and in two gloo ranks with half the
cores each (the ranks split the rows). (2) ``icetide batch``: ``--series`` simulated 64 x 64 series, 20 epochs
each, on a LocalCluster of one worker with all cores and of two workers with half the cores each. Prints one
JSON object with the wall times and their ratios (and the final validation losses of (1)).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from icetide import TiltSeries
from icetide.config import ReconstructConfig
from icetide.experiments import machine_info
from icetide.fit import Fitter, run_fit
from icetide.io import write_mrc, write_tlt
from icetide.simulate import crowded_phantom, simulate_tilt_series

ANGLES = np.linspace(-60, 60, 41)


def _series(shape, seed):
    sim = simulate_tilt_series(crowded_phantom(shape, seed=seed), ANGLES, snr_db=10.0, seed=seed)
    return sim.noisy


def _fit(images, epochs: int) -> tuple[float, float]:
    config = ReconstructConfig.model_validate({"thickness": 32, "fit": {"epochs": epochs, "patience": epochs + 1,
                                                                        "device": "cpu"}})
    t0 = time.monotonic()
    fitter = Fitter(TiltSeries(images, ANGLES), config)
    run_fit(fitter)
    return time.monotonic() - t0, fitter.stopping.best


def _rank(rank: int, world: int, port: int, path: str, epochs: int, threads: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        seconds, val = _fit(np.load(path), epochs)
        if rank == 0:
            Path(out).write_text(json.dumps({"seconds": seconds, "val_loss": val}))
    finally:
        dist.destroy_process_group()


def _ranks(images, epochs: int, cores: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        np.save(f"{tmp}/series.npy", images)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        t0 = time.monotonic()
        torch.multiprocessing.start_processes(
            _rank, args=(2, port, f"{tmp}/series.npy", epochs, max(1, cores // 2), f"{tmp}/out.json"), nprocs=2,
            start_method="spawn",
        )
        result = json.loads(Path(f"{tmp}/out.json").read_text())
        result["wall_s"] = time.monotonic() - t0
    return result


def _batch(n_series: int, workers: int, cores: int) -> float:
    from typer.testing import CliRunner

    from icetide.cli.main import app

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for k in range(n_series):
            (root / "in").mkdir(exist_ok=True)
            write_mrc(root / "in" / f"s{k}.mrc", _series((16, 64, 64), k), 10.0, stack=True)
            write_tlt(root / "in" / f"s{k}.tlt", ANGLES)
        t0 = time.monotonic()
        result = CliRunner().invoke(app, ["batch", str(root / "in"), "-o", str(root / "out"), "--workers", str(workers),
                                          "--epochs", "20", "--thickness", "16", "--device", "cpu"])
        if result.exit_code != 0:
            sys.exit(f"batch failed: {result.output}")
        return time.monotonic() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--series", type=int, default=4)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    images = _series((32, 96, 96), 0)
    torch.set_num_threads(cores)
    one_s, one_val = _fit(images, args.epochs)
    two = _ranks(images, args.epochs, cores)
    batch_one = _batch(args.series, 1, cores)
    batch_two = _batch(args.series, 2, cores)
    print(json.dumps({
        "benchmark": "scaling",
        "cores": cores,
        "distributed": {"one_process_s": one_s, "one_process_val_loss": one_val, "two_ranks_s": two["seconds"],
                        "two_ranks_wall_s": two["wall_s"], "two_ranks_val_loss": two["val_loss"],
                        "speedup": one_s / two["seconds"]},
        "batch": {"series": args.series, "one_worker_s": batch_one, "two_workers_s": batch_two,
                  "speedup": batch_one / batch_two},
        "machine": machine_info("cpu"),
    }, indent=1))


if __name__ == "__main__":
    main()
