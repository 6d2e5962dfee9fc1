"""Throughput of the implicit volume: fast hash encoding vs the straightforward reference, and the lattice path.

Usage: ``python benchmarks/throughput.py [--device cpu|cuda] [--n 262144] [--repeats 3]``

Prints one JSON object. A *sample* is one point through encoding + MLP, forward and backward (the training
step of the rays renderer: loss = mean squared density, gradients for every parameter). ``samples_per_s`` /
``baseline_samples_per_s`` / ``ratio`` are the default configuration (:class:`icetide.volume.VolumeConfig`)
with :class:`HashEncoding` / :class:`ReferenceHashEncoding` (same parameters, same points, same run);
``paper`` holds the same for the paper's configuration; ``*_position_grad`` also differentiates the positions
(as when deformations are fitted). ``lattice_voxels_per_s`` is :meth:`ImplicitVolume.lattice` on the whole
box, forward and backward; ``sample_grid_voxels_per_s`` is :meth:`ImplicitVolume.sample_grid` (no gradients).
Each timing is the best of ``--repeats`` runs after one warm-up, fast and reference interleaved so that other
load on the machine hits both alike.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
from dataclasses import asdict
from typing import Callable

import torch

from icetide.volume import ImplicitVolume, ReferenceHashEncoding, VolumeConfig
from timing import best_times

BOX_ZYX = (48, 128, 128)


def reference_of(volume: ImplicitVolume) -> ImplicitVolume:
    """A copy of ``volume`` whose encoding is the straightforward reference (same parameter values)."""
    cfg = volume.config
    ref = copy.deepcopy(volume)
    ref.encoding = ReferenceHashEncoding(**cfg.encoding_args(), box_shape_zyx=volume.box_shape_zyx).to(
        volume.encoding.table.device
    )
    ref.encoding.load_state_dict(volume.encoding.state_dict())
    return ref


def training_step(volume: ImplicitVolume, points: torch.Tensor) -> Callable[[], None]:
    """Forward + backward of ``mean(volume(points)^2)``, gradients cleared first."""

    def step() -> None:
        volume.zero_grad(set_to_none=True)
        if points.grad is not None:
            points.grad = None
        volume(points).square().mean().backward()

    return step


def random_points(n: int, device: torch.device, requires_grad: bool = False) -> torch.Tensor:
    """``n`` uniform points in the box, voxel coordinates ``(x, y, z)``."""
    nz, ny, nx = BOX_ZYX
    half = torch.tensor([nx / 2, ny / 2, nz / 2], device=device)
    return ((torch.rand(n, 3, device=device) * 2 - 1) * half).requires_grad_(requires_grad)


def point_throughput(cfg: VolumeConfig, n: int, repeats: int, device: torch.device) -> dict[str, float]:
    """Samples/s of fast and reference, with and without position gradients, and their ratios."""
    volume = ImplicitVolume.from_config(cfg, BOX_ZYX).to(device)
    reference = reference_of(volume)
    points = random_points(n, device)
    moving = random_points(n, device, requires_grad=True)
    t = best_times(
        {
            "fast": training_step(volume, points),
            "reference": training_step(reference, points),
            "fast_position_grad": training_step(volume, moving),
            "reference_position_grad": training_step(reference, moving),
        },
        repeats,
        device,
    )
    with torch.no_grad():
        t_forward = best_times({"fast": lambda: volume(points)}, repeats, device)["fast"]
    return {
        "samples_per_s": n / t["fast"],
        "baseline_samples_per_s": n / t["reference"],
        "ratio": t["reference"] / t["fast"],
        "samples_per_s_position_grad": n / t["fast_position_grad"],
        "baseline_samples_per_s_position_grad": n / t["reference_position_grad"],
        "ratio_position_grad": t["reference_position_grad"] / t["fast_position_grad"],
        "forward_only_samples_per_s": n / t_forward,
    }


def lattice_throughput(cfg: VolumeConfig, repeats: int, device: torch.device) -> dict[str, float]:
    """Voxels/s of the lattice path (forward + backward) and of ``sample_grid`` over the whole box."""
    volume = ImplicitVolume.from_config(cfg, BOX_ZYX).to(device)
    offset = torch.rand(3, device=device) - 0.5

    def lattice_step() -> None:
        volume.zero_grad(set_to_none=True)
        volume.lattice(offset).square().mean().backward()

    t = best_times({"lattice": lattice_step, "grid": lambda: volume.sample_grid()}, repeats, device)
    n_voxels = BOX_ZYX[0] * BOX_ZYX[1] * BOX_ZYX[2]
    return {"lattice_voxels_per_s": n_voxels / t["lattice"], "sample_grid_voxels_per_s": n_voxels / t["grid"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--n", type=int, default=262144, help="points per training step")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (best is kept)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)

    default, paper = VolumeConfig(), VolumeConfig.paper()
    result: dict = {"n": args.n, "box_shape_zyx": list(BOX_ZYX), "config": asdict(default)}
    result.update(point_throughput(default, args.n, args.repeats, device))
    result.update(lattice_throughput(default, args.repeats, device))
    result["paper"] = {"config": asdict(paper), **point_throughput(paper, args.n, args.repeats, device)}
    result["paper"].update(lattice_throughput(paper, args.repeats, device))
    result["machine"] = {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
