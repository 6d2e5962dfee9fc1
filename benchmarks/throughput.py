"""Throughput of the implicit volume: fast hash encoding vs the straightforward reference, and the lattice path.

Usage: ``python benchmarks/throughput.py [--device cpu|cuda] [--n N] [--repeats 3]``

Prints one JSON object. A *sample* is one point through encoding + MLP, forward and backward (the training
step of the rays renderer: loss = mean squared density, gradients for every parameter). ``samples_per_s`` /
``baseline_samples_per_s`` / ``ratio`` are the default configuration (:class:`icetide.config.VolumeSettings`)
with :class:`HashEncoding` as a fit uses it (``kernel`` says which: the Triton kernels on CUDA when Triton
imports, the Numba kernels on CPU, else the PyTorch path) / :class:`ReferenceHashEncoding` (the
straightforward PyTorch hash grid; same parameters, same points, same run); ``torch_path_*`` is the PyTorch
path of :class:`HashEncoding` and, on CUDA, ``mixed_*`` the Triton kernels with fp16 table reads and the MLP
in bf16 (``fit.precision: mixed``).
``paper`` holds the same for the paper's configuration; ``*_position_grad`` also differentiates the positions
(as when deformations are fitted); ``encoding_*`` times the encoding alone (no MLP) of the fast and reference
variants. ``lattice_voxels_per_s`` is :meth:`ImplicitVolume.lattice` on the box
(a band of ``--lattice-rows`` rows), forward and backward; ``sample_grid_voxels_per_s`` is
:meth:`ImplicitVolume.sample_grid` of the whole box (no gradients). Each timing is the best of ``--repeats``
runs after one warm-up, all variants interleaved so that other load on the machine hits them alike.
``mlp_columns_s`` / ``mlp_rows_s`` time the default MLP alone, forward and backward, on the features of every voxel
of the box, channels first (what the lattice path runs) and channels last (what the points path runs).
On CPU, ``adam_fused_step_s`` / ``adam_default_step_s`` / ``adam_foreach_step_s`` time one Adam step over the
volume's parameters (the fused kernel a CPU fit uses / PyTorch's default / its ``foreach`` variant) and
``adam_fused_ratio`` is default over fused.
``peak_memory`` is the process's peak (CPU RSS; on CUDA also the allocator's peak) over the whole run.
Defaults: CPU 2**18 points and a 48 x 128 x 128 box; CUDA 2**22 points and the paper's 180 x 512 x 512 box
in bands of 86 rows (7.9 M voxels, what a fit evaluates per step there).
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

from icetide.geometry import box_to_unit
from icetide.memory import PeakMemory
from icetide.config import VolumeSettings
from icetide.volume import ImplicitVolume, ReferenceHashEncoding
from timing import best_times

BOX_ZYX = {"cpu": (48, 128, 128), "cuda": (180, 512, 512)}
POINTS = {"cpu": 2**18, "cuda": 2**22}
LATTICE_ROWS = {"cpu": None, "cuda": 86}


def reference_of(volume: ImplicitVolume) -> ImplicitVolume:
    """A copy of ``volume`` whose encoding is the straightforward reference (same parameter values)."""
    cfg = volume.config
    ref = copy.deepcopy(volume)
    ref.encoding = ReferenceHashEncoding(**cfg.encoding_args(), box_shape_zyx=volume.box_shape_zyx).to(
        volume.encoding.table.device
    )
    ref.encoding.load_state_dict(volume.encoding.state_dict())
    return ref


def variants(volume: ImplicitVolume) -> dict[str, ImplicitVolume]:
    """The volume as a fit runs it (``fast``), its PyTorch path, the reference and, on CUDA, mixed precision."""
    out = {"fast": volume, "reference": reference_of(volume)}
    if volume.encoding.kernel_for(volume.encoding.table.device) != "torch":
        out["torch_path"] = copy.deepcopy(volume).set_execution("torch")
    if volume.encoding.table.is_cuda:
        out["mixed"] = copy.deepcopy(volume).set_execution("auto", mixed_precision=True)
    return out


def training_step(volume: ImplicitVolume, points: torch.Tensor, encoding_only: bool = False) -> Callable[[], None]:
    """Forward + backward of ``mean(volume(points)^2)`` (``encoding_only``: of the mean squared encoding of the
    points' unit coordinates, no MLP), gradients cleared first."""
    box_zyx = volume.box_shape_zyx

    def step() -> None:
        volume.zero_grad(set_to_none=True)
        if points.grad is not None:
            points.grad = None
        out = volume.encoding(box_to_unit(points, box_zyx)) if encoding_only else volume(points)
        out.square().mean().backward()

    return step


def random_points(n: int, box_zyx: tuple[int, int, int], device: torch.device, requires_grad: bool = False):
    """``n`` uniform points in the box, voxel coordinates ``(x, y, z)``."""
    nz, ny, nx = box_zyx
    half = torch.tensor([nx / 2, ny / 2, nz / 2], device=device)
    return ((torch.rand(n, 3, device=device) * 2 - 1) * half).requires_grad_(requires_grad)


def point_throughput(cfg: VolumeSettings, box_zyx, n: int, repeats: int, device: torch.device) -> dict:
    """Samples/s of every variant, with and without position gradients, and the ratios to the reference."""
    volumes = variants(ImplicitVolume.from_config(cfg, box_zyx).to(device))
    points = random_points(n, box_zyx, device)
    moving = random_points(n, box_zyx, device, requires_grad=True)
    steps = {}
    for name, volume in volumes.items():
        steps[name] = training_step(volume, points)
        steps[f"{name}_position_grad"] = training_step(volume, moving)
    for name in ("fast", "reference"):
        steps[f"{name}_encoding"] = training_step(volumes[name], points, encoding_only=True)
    t = best_times(steps, repeats, device)
    with torch.no_grad():
        t_forward = best_times({"fast": lambda: volumes["fast"](points)}, repeats, device)["fast"]
    out = {
        "kernel": volumes["fast"].encoding.kernel_for(device),
        "samples_per_s": n / t["fast"],
        "baseline_samples_per_s": n / t["reference"],
        "ratio": t["reference"] / t["fast"],
        "samples_per_s_position_grad": n / t["fast_position_grad"],
        "baseline_samples_per_s_position_grad": n / t["reference_position_grad"],
        "ratio_position_grad": t["reference_position_grad"] / t["fast_position_grad"],
        "forward_only_samples_per_s": n / t_forward,
        "encoding_samples_per_s": n / t["fast_encoding"],
        "baseline_encoding_samples_per_s": n / t["reference_encoding"],
        "encoding_ratio": t["reference_encoding"] / t["fast_encoding"],
    }
    for name in volumes.keys() - {"fast", "reference"}:
        out[f"{name}_samples_per_s"] = n / t[name]
        out[f"{name}_samples_per_s_position_grad"] = n / t[f"{name}_position_grad"]
    return out


def lattice_throughput(cfg: VolumeSettings, box_zyx, rows: int | None, repeats: int, device: torch.device) -> dict:
    """Voxels/s of the lattice path (forward + backward, a band of ``rows`` rows) of each variant but the
    reference, and of ``sample_grid`` over the whole box."""
    volumes = variants(ImplicitVolume.from_config(cfg, box_zyx).to(device))
    del volumes["reference"]
    offset = torch.rand(3, device=device) - 0.5
    band = slice(0, rows) if rows else None

    def lattice_step(volume: ImplicitVolume):
        def step() -> None:
            volume.zero_grad(set_to_none=True)
            volume.lattice(offset, band).square().mean().backward()

        return step

    steps = {name: lattice_step(volume) for name, volume in volumes.items()}
    steps["grid"] = lambda: volumes["fast"].sample_grid()
    t = best_times(steps, repeats, device)
    nz, ny, nx = box_zyx
    band_voxels = nz * (rows or ny) * nx
    out = {"lattice_band_voxels": band_voxels, "lattice_voxels_per_s": band_voxels / t["fast"],
           "sample_grid_voxels_per_s": nz * ny * nx / t["grid"]}
    for name in volumes.keys() - {"fast"}:
        out[f"{name}_lattice_voxels_per_s"] = band_voxels / t[name]
    return out


def mlp_layout_times(cfg: VolumeSettings, box_zyx, repeats: int, device: torch.device) -> dict:
    """Seconds of the MLP alone, forward + backward, on the features of every voxel of the box: channels first
    (``MLP.forward_channels_first``, what the lattice path runs) and channels last (``MLP.forward``, the points
    path)."""
    mlp = ImplicitVolume.from_config(cfg, box_zyx).to(device).mlp
    n = box_zyx[0] * box_zyx[1] * box_zyx[2]
    columns = torch.randn(mlp[0].in_features, n, device=device, requires_grad=True)
    rows = columns.detach().t().contiguous().requires_grad_()
    grad = torch.randn(1, n, device=device)

    def step(forward: Callable[[], torch.Tensor], out_grad: torch.Tensor) -> Callable[[], None]:
        def run() -> None:
            mlp.zero_grad(set_to_none=True)
            columns.grad = rows.grad = None
            forward().backward(out_grad)

        return run

    t = best_times({"columns": step(lambda: mlp.forward_channels_first(columns), grad),
                    "rows": step(lambda: mlp(rows), grad.t())}, repeats, device)
    return {"mlp_columns_s": t["columns"], "mlp_rows_s": t["rows"]}


def adam_step_times(cfg: VolumeSettings, box_zyx, repeats: int, device: torch.device) -> dict:
    """Seconds per Adam step over the volume's parameters (random gradients), as a fit runs it (CPU: the fused
    kernel) and with PyTorch's default implementation and its ``foreach`` one; 10 steps per timed run."""
    params = list(ImplicitVolume.from_config(cfg, box_zyx).to(device).parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    optimizers = {"fused": torch.optim.Adam(params, fused=True), "default": torch.optim.Adam(params, foreach=False),
                  "foreach": torch.optim.Adam(params, foreach=True)}

    def ten_steps(opt: torch.optim.Optimizer) -> Callable[[], None]:
        return lambda: [opt.step() for _ in range(10)]

    t = best_times({name: ten_steps(opt) for name, opt in optimizers.items()}, repeats, device)
    return {"adam_parameters": sum(p.numel() for p in params), **{f"adam_{k}_step_s": v / 10 for k, v in t.items()},
            "adam_fused_ratio": t["default"] / t["fused"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--n", type=int, default=None, help="points per training step (CPU 2**18, CUDA 2**22)")
    parser.add_argument("--box", default=None, help="box nz,ny,nx (CPU 48,128,128; CUDA 180,512,512)")
    parser.add_argument("--lattice-rows", type=int, default=None, help="rows of the lattice band (CUDA 86)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (best is kept)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    n = args.n or POINTS[device.type]
    box = tuple(int(v) for v in args.box.split(",")) if args.box else BOX_ZYX[device.type]
    rows = args.lattice_rows or LATTICE_ROWS[device.type]

    default, paper = VolumeSettings(), VolumeSettings.paper()
    result: dict = {"n": n, "box_shape_zyx": list(box), "config": asdict(default)}
    with PeakMemory(device) as used:
        result.update(point_throughput(default, box, n, args.repeats, device))
        result.update(lattice_throughput(default, box, rows, args.repeats, device))
        result["paper"] = {"config": asdict(paper), **point_throughput(paper, box, n, args.repeats, device)}
        result["paper"].update(lattice_throughput(paper, box, rows, args.repeats, device))
        result.update(mlp_layout_times(default, box, args.repeats, device))
        if device.type == "cpu":
            result.update(adam_step_times(default, box, args.repeats, device))
            result["paper"].update(adam_step_times(paper, box, args.repeats, device))
    result["peak_memory"] = used.as_dict()
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
