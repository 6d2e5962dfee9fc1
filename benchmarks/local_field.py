"""Local deformation fields on the detector grid: two matrix products per tilt vs ``grid_sample``.

Usage: ``python benchmarks/local_field.py [--device cpu|cuda] [--size 128] [--tilts 41] [--controls 10]
[--repeats 3]``

``field``: the local fields of ``--tilts`` tilts on a ``--controls``-square grid of control points, evaluated
at every pixel of a ``--size``-square detector, forward + backward (loss = mean squared field), by
:func:`icetide.deform.local_displacement_grid` (``separable``, what a fit runs) and by
:func:`icetide.deform.local_displacement` on the meshgrid (``grid_sample``, the fit's path before). ``epoch``:
a training epoch of the default fit on the quality benchmark's geometry (a 48-voxel slab of the crowded blob
phantom under the detector, the tilts from -60 to +60 degrees, 10 dB), once as it runs and once with its
coordinates computed by :func:`icetide.deform.deform_coords` (``grid_sample``), interleaved, best of
``--repeats`` after a warm-up epoch. Prints one JSON object with the times and their ratios.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from icetide.data import TiltSeries
from icetide.deform import deform_coords, local_displacement, local_displacement_grid
from icetide.experiments import machine_info
from icetide.experiments.case import reconstruction_config
from icetide.fit import Fitter
from icetide.runtime import resolve_device
from icetide.geometry import centered_coords
from icetide.simulate import crowded_phantom, simulate_tilt_series
from timing import best_times


def deform_grid_by_grid_sample(u_px, v_px, shifts_px, angles_rad, local_px, detector_shape, interpolation):
    """:func:`icetide.deform.deform_grid` the way it was computed before: ``grid_sample`` on the meshgrid."""
    vv, uu = torch.meshgrid(v_px, u_px, indexing="ij")
    return deform_coords(uu, vv, shifts_px, angles_rad, local_px, detector_shape, interpolation)


def field_times(size: int, tilts: int, controls: int, repeats: int, device: torch.device) -> dict[str, float]:
    local = (torch.randn(tilts, 2, controls, controls, device=device)).requires_grad_()
    u = v = centered_coords(size, device=device)
    vv, uu = torch.meshgrid(v, u, indexing="ij")

    def step(fn):
        def run() -> None:
            local.grad = None
            fn().square().mean().backward()
        return run

    return best_times({
        "separable": step(lambda: local_displacement_grid(local, u, v, (size, size))),
        "grid_sample": step(lambda: local_displacement(local, uu, vv, (size, size))),
    }, repeats, device)


def epoch_times(size: int, tilts: int, repeats: int, device: torch.device) -> dict[str, float]:
    angles = np.linspace(-60, 60, tilts)
    truth = crowded_phantom((48, size, size), seed=0)
    series = TiltSeries(simulate_tilt_series(truth, angles, snr_db=10.0, seed=0).noisy, angles, 10.0)
    fitter = Fitter(series, reconstruction_config(48, 10.0, device=str(device), warmup_epochs=0))
    separable = fitter.deformations.warp

    def epoch(fn):
        def run() -> None:
            fitter.deformations.warp = fn
            try:
                fitter.train_epoch()
            finally:
                fitter.deformations.warp = separable
        return run

    return best_times({"separable": epoch(separable), "grid_sample": epoch(deform_grid_by_grid_sample)},
                      repeats, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--tilts", type=int, default=41)
    parser.add_argument("--controls", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = resolve_device(args.device)
    field = field_times(args.size, args.tilts, args.controls, args.repeats, device)
    epoch = epoch_times(args.size, args.tilts, args.repeats, device)
    print(json.dumps({
        "benchmark": "local_field", "detector": [args.size, args.size], "n_tilts": args.tilts,
        "controls": [args.controls, args.controls], "field_s": field,
        "field_speedup": field["grid_sample"] / field["separable"], "epoch_s": epoch,
        "epoch_speedup": epoch["grid_sample"] / epoch["separable"], "machine": machine_info(str(device)),
    }))


if __name__ == "__main__":
    main()
