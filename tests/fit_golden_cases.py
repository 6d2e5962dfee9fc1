"""The short CPU fits of the golden test (tests/test_fit_golden.py) and what is compared of them.

Each case fits a tiny simulated series for a few epochs on one thread with the PyTorch encoding kernel (so the
numbers do not depend on Numba or on the thread count) and a fixed memory budget (so the band plan does not depend
on the machine's free memory).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from icetide import TiltSeries
from icetide.config import ReconstructConfig
from icetide.deform import Deformations
from icetide.fit import Fitter, run_fit
from icetide.simulate import crowded_phantom, simulate_tilt_series

SHAPE = (8, 24, 24)
ANGLES = np.arange(-45.0, 46.0, 15.0)  # 7 tilts

# Per case: (fit settings, deformation settings, CTF forward model)
CASES: dict[str, tuple[dict, dict, bool]] = {
    "lattice": (
        {"epochs": 4, "warmup_epochs": 1, "local_delay_epochs": 1, "lattice_rows": 8, "tilt_weighting": "cos"},
        {"local": True, "local_grid": [4, 4], "axis_offset": True, "gain": True, "offset": "per_tilt",
         "penalty_smooth": 0.1},
        False,
    ),
    "rays": (
        {"epochs": 3, "renderer": "rays", "rays_per_tilt": 100, "half_maps": "tilts", "loss": "l2"},
        {"local": False, "offset": "common"},
        False,
    ),
    "binned": (
        {"epochs": 4, "binned_epochs": 2, "lattice_rows": 12, "validation": "pass"},
        {"local": False},
        False,
    ),
    "ctf": (
        {"epochs": 2},
        {"local": False},
        True,
    ),
}

# Report entries that depend on the machine or the clock, not on the fit.
UNCOMPARED = ("fit_seconds", "pixels_per_s", "versions", "cpu_peak_rss_mb", "gpu_max_allocated_mb")


def _series(ctf: bool) -> TiltSeries:
    rng = np.random.default_rng(5)
    m = len(ANGLES)
    truth = Deformations(ANGLES, rng.uniform(-2, 2, (m, 2)), np.zeros(m), np.zeros((m, 2, 5, 5)), SHAPE[1:])
    sim = simulate_tilt_series(crowded_phantom(SHAPE, seed=2), ANGLES, snr_db=20.0, deformations=truth, seed=0,
                               samples_per_voxel=1.0)
    if not ctf:
        return TiltSeries(sim.noisy, ANGLES)
    return TiltSeries(sim.noisy, ANGLES, 3.0, defocus_A=np.linspace(9000.0, 11000.0, m))


def _config(fit: dict, deform: dict, ctf: bool) -> ReconstructConfig:
    return ReconstructConfig.model_validate({
        "thickness": SHAPE[0],
        "volume": {"log2_table_size": 10, "n_levels": 3, "hidden": 8},
        "deform": deform,
        "ctf": {"correction": "model" if ctf else "phaseflip"},
        "fit": {"tilts_per_step": 4, "warmup_epochs": 1, "validation_fraction": 0.1, "device": "cpu",
                "binned_epochs": 0, "kernel": "torch", "max_memory_gb": 0.5, "seed": 3, **fit},
    })


def _plain(value):
    """JSON-comparable: NaN as the string "nan" (NaN != NaN), tuples as lists."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return value


def run_case(name: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The fit of case ``name``: its learned tensors (best state, deformations handed out) and its report (the
    curves included, without ``UNCOMPARED``), JSON-comparable."""
    fit, deform, ctf = CASES[name]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fitter = Fitter(_series(ctf), _config(fit, deform, ctf))
        result = run_fit(fitter)
    finally:
        torch.set_num_threads(threads)
    tensors = {}
    for key, value in fitter.snapshot().items():
        if isinstance(value, dict):  # a volume's state dict
            tensors.update({f"{key}.{k}": v for k, v in value.items()})
        elif value is not None:
            tensors[key] = value
    d = result.deformations
    for key in ("shifts_px", "angles_deg", "local_px"):
        tensors[f"result.{key}"] = torch.as_tensor(getattr(d, key))
    tensors["result.translation_xyz"] = torch.as_tensor(result.translation_xyz)
    report = {k: v for k, v in result.report.items() if k not in UNCOMPARED}
    report["curves"] = {k: v for k, v in report["curves"].items() if k != "elapsed_s"}
    report["density_scale"] = result.density_scale
    return {k: v.detach().cpu().clone() for k, v in tensors.items()}, _plain(report)


def golden_versions() -> dict:
    """The library versions and CPU the golden numbers hold for: other builds of torch or numpy, or a CPU with other
    instruction sets (whose kernels the libraries pick at run time), may round differently."""
    features = np._core._multiarray_umath.__cpu_features__
    return {"torch": torch.__version__, "numpy": np.__version__,
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_features": sorted(name for name, present in features.items() if present)}
