"""Speed of the explicit-grid tomography in :mod:`icetide.classical`.

Usage: ``python benchmarks/fbp.py [--device cpu|cuda] [--repeats 3] [--threads N]``

Prints one JSON object:

- ``fbp_s``: :func:`icetide.classical.fbp` of a 512 x 512 detector, 61 tilts (-60..+60 in 2-degree steps),
  thickness 180 (random data; the cost does not depend on the values); ``sirt_iteration_s``: one SIRT
  iteration on the same problem (:func:`icetide.classical.sirt` with 2 iterations minus 1, setup included once).
- ``engine``: the engine's per-step projector cost, a 128 x 128 x 48 volume and 8 tilts:
  ``project_s`` (forward), ``backproject_s``, and ``project_grad_s`` (forward + autograd backward of a
  ``requires_grad`` volume, as in a training step); the system matrices are cached after the first call, as in
  a fit. ``band``: a training step's projection at the paper's scale (a band of 86 rows of a 512 x 512 x 180
  volume, 61 tilts in a new random order each call, forward + backward) with the matrices cached
  (``project_grad_cached_s``) and rebuilt at every call (``project_grad_cold_s``, the cache cleared).
- ``peak_rss_after_fbp_mb`` / ``peak_rss_mb``: the process' peak resident memory after the FBP runs / at the
  end (SIRT included); on CUDA also ``peak_cuda_mb``.

Each timing is the best of ``--repeats`` runs after one warm-up run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource

import numpy as np
import torch

from icetide import classical
from icetide.classical import backproject, fbp, project, sirt
from timing import best_time


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MB."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def fbp_timings(device: torch.device, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    angles = np.arange(-60, 61, 2.0)
    series = torch.rand(len(angles), 512, 512, generator=gen).to(device)
    fbp_s = best_time(lambda: fbp(series, angles, 180), repeats, device)
    rss_after_fbp = peak_rss_mb()
    one = best_time(lambda: sirt(series, angles, 180, iterations=1), 1, device)
    two = best_time(lambda: sirt(series, angles, 180, iterations=2), 1, device)
    return {
        "fbp_shape": [180, 512, 512],
        "n_tilts": len(angles),
        "fbp_s": round(fbp_s, 3),
        "peak_rss_after_fbp_mb": rss_after_fbp,
        "sirt_setup_plus_one_iteration_s": round(one, 3),
        "sirt_iteration_s": round(two - one, 3),
    }


def engine_timings(device: torch.device, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(1)
    volume = torch.rand(48, 128, 128, generator=gen).to(device)
    theta = torch.deg2rad(torch.linspace(-60, 60, 8)).to(device)
    projections = project(volume, theta)
    leaf = volume.clone().requires_grad_(True)

    def step() -> None:
        project(leaf, theta).square().sum().backward()
        leaf.grad = None

    return {
        "volume_shape": [48, 128, 128],
        "n_tilts": 8,
        "project_s": round(best_time(lambda: project(volume, theta), repeats, device), 5),
        "backproject_s": round(best_time(lambda: backproject(projections, theta, 48, 128), repeats, device), 5),
        "project_grad_s": round(best_time(step, repeats, device), 5),
    }


def band_timings(device: torch.device, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(2)
    leaf = torch.rand(180, 86, 512, generator=gen).to(device).requires_grad_(True)
    theta = torch.deg2rad(torch.arange(-60, 61, 2.0, dtype=torch.float64)).to(device)

    def step(cold: bool):
        def run() -> None:
            if cold:
                classical._MATRIX_CACHE.clear()
            order = torch.randperm(len(theta), generator=gen).to(device)
            project(leaf, theta[order]).square().sum().backward()
            leaf.grad = None

        return run

    cached = best_time(step(False), repeats, device)
    cold = best_time(step(True), repeats, device)
    return {"volume_shape": [180, 86, 512], "n_tilts": len(theta), "project_grad_cached_s": round(cached, 4),
            "project_grad_cold_s": round(cold, 4), "cache_speedup": round(cold / cached, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    result = {
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "engine": engine_timings(device, max(args.repeats, 5)),
        "band": band_timings(device, args.repeats),
        **fbp_timings(device, args.repeats),
        "peak_rss_mb": peak_rss_mb(),
    }
    if device.type == "cuda":
        result["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
