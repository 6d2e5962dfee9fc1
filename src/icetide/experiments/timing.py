"""Experiment ``timing`` (paper Table I): wall time and peak memory of each method on one simulated series.

icetide with each renderer (``lattice``, the default, and ``rays``, the paper's random-ray sampling with the
paper's batch of 1500 rays per tilt, under a time budget), FBP, SIRT and the coarse cross-correlation
pre-alignment. Each method runs in a fresh process (so that memory freed by an earlier method cannot hide its
own), measured by :class:`icetide.memory.PeakMemory`: CPU peak RSS above the RSS once the series is loaded,
GPU ``max_memory_allocated``. The icetide times include writing all outputs; the classical methods are timed
on a second call (the first pays for lazy initialisation) and their memory taken from the first. CC with the
truth is given for every method that makes a volume.
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Callable

import torch

from ..config import ReconstructConfig
from ..data import TiltSeries
from ..runtime import resolve_device
from ..io import read_mrc, read_tlt, write_mrc
from ..memory import PeakMemory
from ..metrics import evaluate_reconstruction
from ..output_files import TOMOGRAM_LINK
from ..prealign import coarse_shifts
from ..classical import fbp, sirt
from ..reconstruct import reconstruct
from .case import SIRT_ITERATIONS, simulate_case
from .report import fmt, markdown_table, write_report
from .settings import machine_info, phantoms

# The rays renderer does not reach early stopping in a CPU-sized budget; it gets this many minutes by default.
RAYS_MINUTES_DEFAULT = 5.0


def _measure(method: str, case_dir: str, config_json: dict, device: str) -> dict:
    """Run one method on ``case_dir/tilt_series.mrc`` in this (fresh) process; writes ``case_dir/METHOD...``."""
    torch.manual_seed(0)
    folder = Path(case_dir)
    images_np, voxel = read_mrc(folder / "tilt_series.mrc")
    angles = read_tlt(folder / "tilt_series.tlt")
    config = ReconstructConfig.model_validate(config_json)
    dev = resolve_device(device)
    if method.startswith("icetide"):
        out = folder / method
        out.mkdir(exist_ok=True)
        with PeakMemory(dev) as used:
            report = reconstruct(TiltSeries(images_np, angles, voxel), config, out)
        return {**used.as_dict(), "epochs": report["epochs"], "stop_reason": report["stop_reason"]}
    images = torch.from_numpy(images_np).to(dev)
    nz = config.thickness
    work = {
        "fbp": lambda: fbp(images, angles, nz),
        "sirt": lambda: sirt(images, angles, nz, SIRT_ITERATIONS),
        "prealign": lambda: coarse_shifts(images, angles),
    }[method]
    with PeakMemory(dev) as first:
        work()
    with PeakMemory(dev) as timed:
        result = work()
    if method != "prealign":
        write_mrc(folder / f"{method}.mrc", result.cpu().numpy(), voxel)
    return {**first.as_dict(), "seconds": timed.seconds, "first_call_s": first.seconds}


def _in_fresh_process(*args) -> dict:
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(_measure, *args).result()


def run(
    settings, out_dir: Path, phase: Callable[[str], None], on_epoch: Callable[[dict], None] | None = None
) -> dict:

    phantom = phantoms(settings, first_only=True)[0]
    truth, voxel = phantom.volume, phantom.voxel_size_A
    nz = truth.shape[0]
    sim = simulate_case(truth, voxel, settings.acquisition(), out_dir, phase)
    angles = sim.tilt_angles_deg
    rays_minutes = settings.max_minutes or (None if settings.full else RAYS_MINUTES_DEFAULT)
    lattice = settings.reconstruction_config(phantom)
    configs = {
        "icetide_lattice": lattice,
        "icetide_rays": settings.reconstruction_config(phantom, max_minutes=rays_minutes, renderer="rays",
                                                       tilts_per_step=8),
        "fbp": lattice,
        "sirt": lattice,
        "prealign": lattice,
    }
    rows: dict[str, dict] = {}
    for method, config in configs.items():
        budget = config.fit.max_minutes if method.startswith("icetide") else None
        phase(f"{method} in a fresh process" + (f" (at most {budget:g} min)" if budget else ""))
        rows[method] = _in_fresh_process(method, str(out_dir), config.model_dump(mode="json"), settings.device)
        volume_path = out_dir / method / TOMOGRAM_LINK if method.startswith("icetide") else out_dir / f"{method}.mrc"
        rows[method]["cc"] = evaluate_reconstruction(read_mrc(volume_path)[0], truth)["cc"] if volume_path.is_file() \
            else None

    def note(name: str, r: dict) -> str:
        if "epochs" in r:
            return f"{r['epochs']} epochs, {r['stop_reason']}"
        return f"{SIRT_ITERATIONS} iterations" if name == "sirt" else ""

    table = markdown_table(
        ("method", "wall time (s)", "peak CPU memory (MB)", "peak GPU memory (MB)", "CC", "note"),
        [(name, r["seconds"], r["cpu_peak_mb"], r["gpu_peak_mb"], r["cc"], note(name, r)) for name, r in rows.items()],
    )
    nx, ny = truth.shape[2], truth.shape[1]
    body = (
        f"Phantom: {phantom.source}, {nx} x {ny} x {nz} voxels; {len(angles)} tilts of {ny} x {nx} pixels, paper "
        f"profile, {sim.snr_db:g} dB, seed {settings.seed}. Each method runs alone in a fresh process (CPU "
        "memory: peak RSS above the RSS once the series is loaded, sampled every 5 ms; GPU memory: "
        "`max_memory_allocated`). icetide times include writing all outputs (tomogram, aligned series, FBP of "
        "it); FBP, SIRT and the pre-alignment are timed on their second call. The rays renderer runs with 8 tilts "
        "x 1500 rays per step" + (f" for at most {rays_minutes:g} min" if rays_minutes else "") + ".\n\n" + table
        + f"\n\nicetide (lattice) takes {fmt(rows['icetide_lattice']['seconds'] / rows['fbp']['seconds'], 0)}x "
        "the time of FBP.\n"
    )
    return write_report(out_dir, "timing", settings, machine_info(settings.device),
                        {"phantom": phantom.source, "methods": rows}, body)
