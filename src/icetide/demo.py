"""The built-in demonstration: simulate a tilt series with known truth, reconstruct it, compare and report.

Needs no data: the phantom is generated (:func:`icetide.simulate.crowded_phantom` with Gaussian-blob proteins).
The series follows DESIGN.md's simulation protocol (paper deformation profile, 10 dB) and every method is
scored against the same truth by the same procedure (:func:`icetide.evaluation.evaluate_volumes`):

- ``icetide``: the implicit volume fitted jointly with the deformations;
- ``fbp_aligned``: FBP of the series aligned with icetide's estimated deformations;
- ``fbp_raw``: FBP of the raw, unaligned series;
- ``fbp_oracle``: FBP of a series with no deformation and the same noise level (the best FBP can do).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import __version__
from .config import FitSettings, ReconstructConfig
from .data import TiltSeries
from .evaluation import REGISTRATION_NOTE, evaluate_volumes
from .io import write_deformations, write_json, write_mrc, write_tlt
from .recon import fbp
from .reconstruct import reconstruct
from .simulate import crowded_phantom, simulate_tilt_series

__all__ = ["DemoSettings", "run_demo"]


@dataclass(frozen=True)
class DemoSettings:
    """What the demo simulates and how long it fits.

    ``shape_zyx``: phantom (and tomogram) shape in voxels; tilts ``tilt_min_deg:tilt_step_deg:tilt_max_deg``;
    ``voxel_size_A``: the phantom's voxel size (written to the headers); ``max_minutes``: fitting time budget;
    ``proteins_dir``: density maps (MRC) to place as proteins instead of Gaussian blobs.
    """

    shape_zyx: tuple[int, int, int] = (48, 128, 128)
    tilt_min_deg: float = -60.0
    tilt_max_deg: float = 60.0
    tilt_step_deg: float = 3.0
    snr_db: float = 10.0
    profile: str = "paper"
    voxel_size_A: float = 10.0
    max_minutes: float = 3.0
    epochs: int = 400
    seed: int = 0
    device: str = "auto"
    fsc_taper_vox: float = 4.0
    proteins_dir: str | None = None

    def tilt_angles_deg(self) -> np.ndarray:
        n = int(round((self.tilt_max_deg - self.tilt_min_deg) / self.tilt_step_deg)) + 1
        return np.linspace(self.tilt_min_deg, self.tilt_max_deg, n)


def run_demo(
    out_dir: Path,
    settings: DemoSettings = DemoSettings(),
    on_phase: Callable[[str], None] | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    config: ReconstructConfig | None = None,
) -> dict:
    """Run the demo into ``out_dir`` (which must exist) and return the summary also written to ``summary.json``.

    ``config``: the reconstruction settings; default: the defaults with ``settings``' thickness, epochs, time
    budget, seed and device.

    Writes ``truth/volume.mrc``, ``truth/deformations.json``, ``tilt_series.mrc`` + ``.tlt``, ``icetide/`` (every
    output of :func:`icetide.reconstruct.reconstruct`), ``fbp_raw.mrc``, ``fbp_oracle.mrc``, the figures of
    :func:`icetide.evaluation.evaluate_volumes` and ``summary.json``.
    """
    out_dir = Path(out_dir)
    phase = on_phase or (lambda name: None)
    s = settings
    timings: dict[str, float] = {}

    phase(f"generating a {s.shape_zyx[2]} x {s.shape_zyx[1]} x {s.shape_zyx[0]} phantom")
    t0 = time.monotonic()
    truth = crowded_phantom(s.shape_zyx, seed=s.seed, proteins_dir=s.proteins_dir, voxel_size_A=s.voxel_size_A)
    angles = s.tilt_angles_deg()
    phase(f"simulating {len(angles)} tilts, {s.profile} deformations, {s.snr_db:g} dB")
    sim = simulate_tilt_series(truth, angles, profile=s.profile, snr_db=s.snr_db, seed=s.seed)
    (out_dir / "truth").mkdir(exist_ok=True)
    write_mrc(out_dir / "truth" / "volume.mrc", truth, s.voxel_size_A)
    write_deformations(out_dir / "truth" / "deformations.json", sim.deformations)
    write_mrc(out_dir / "tilt_series.mrc", sim.noisy, s.voxel_size_A, stack=True)
    write_tlt(out_dir / "tilt_series.tlt", angles)
    timings["simulate_s"] = time.monotonic() - t0

    t0 = time.monotonic()
    if config is None:
        config = ReconstructConfig(
            thickness=s.shape_zyx[0],
            pixel_size_A=s.voxel_size_A,
            fit=FitSettings(epochs=s.epochs, max_minutes=s.max_minutes, seed=s.seed, device=s.device),
        )
    budget = "" if config.fit.max_minutes is None else f" (at most {config.fit.max_minutes:g} min of fitting)"
    phase(f"reconstructing with icetide{budget}")
    series = TiltSeries(sim.noisy, angles, s.voxel_size_A)
    rec_dir = out_dir / "icetide"
    rec_dir.mkdir(exist_ok=True)
    rec_report = reconstruct(series, config, rec_dir, on_epoch=on_epoch, on_phase=phase)
    timings["reconstruct_s"] = time.monotonic() - t0

    phase("FBP baselines")
    t0 = time.monotonic()
    nz = s.shape_zyx[0]
    fbp_raw = fbp(torch.from_numpy(sim.noisy), angles, nz).numpy()
    fbp_oracle = fbp(torch.from_numpy(sim.noisy_undeformed), angles, nz).numpy()
    write_mrc(out_dir / "fbp_raw.mrc", fbp_raw, s.voxel_size_A)
    write_mrc(out_dir / "fbp_oracle.mrc", fbp_oracle, s.voxel_size_A)
    timings["fbp_s"] = time.monotonic() - t0

    phase("scoring against the truth")
    t0 = time.monotonic()
    from .io import read_deformations, read_mrc

    volumes = {
        "icetide": read_mrc(rec_dir / "tomogram.mrc")[0],
        "fbp_aligned": read_mrc(rec_dir / "tomogram_fbp.mrc")[0],
        "fbp_raw": fbp_raw,
        "fbp_oracle": fbp_oracle,
    }
    estimated = read_deformations(rec_dir / "deformations.json")
    scores = evaluate_volumes(
        volumes, truth, out_dir, s.voxel_size_A, taper_vox=s.fsc_taper_vox, deformations=(sim.deformations, estimated)
    )
    timings["evaluate_s"] = time.monotonic() - t0

    summary = {
        "command": "demo",
        "icetide_version": __version__,
        "settings": {**asdict(s), "n_tilts": len(angles)},
        "snr_db_measured": sim.snr_db_measured,
        "registration": REGISTRATION_NOTE,
        "reconstructions": scores["reconstructions"],
        "deformations": scores["deformations"],
        "fit": {k: rec_report[k] for k in ("epochs", "stop_reason", "best_epoch", "fit_seconds", "device")},
        "config": config.model_dump(mode="json"),
        "timings_s": timings,
    }
    write_json(out_dir / "summary.json", summary)
    return summary
