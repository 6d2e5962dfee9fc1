"""One simulated case: a truth volume, its simulated series, and every method's reconstruction, all scored alike.

The methods (the paper's Figs. 4-7 plus SIRT):

- ``icetide``: the implicit volume fitted jointly with the deformations (:func:`icetide.reconstruct.reconstruct`);
- ``fbp_aligned``: FBP of the series aligned with icetide's estimated deformations;
- ``sirt_aligned``: SIRT of the same aligned series;
- ``fbp_raw``: FBP of the raw, unaligned series;
- ``fbp_oracle``: FBP of a series with no deformation and its own noise draw at the same level (the best FBP
  can do; docs/CONVENTIONS.md "Simulation protocol");
- ``sirt_oracle``: SIRT of that undeformed series.

Every volume is scored by :func:`icetide.evaluation.evaluate_volumes` (registration to the truth, CC, FSC with
an edge taper), so all tables and figures are made by one procedure.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..config import FitSettings, ReconstructConfig
from ..data import TiltSeries
from ..errors import IcetideError
from ..evaluation import evaluate_volumes
from ..io import read_deformations, read_mrc, read_volume, write_deformations, write_mrc, write_tlt
from ..metrics import FSC_TAPER_VOX
from ..classical import fbp, sirt
from ..correction import correct_optics
from ..reconstruct import reconstruct
from ..simulate import Optics, SimulatedTiltSeries, bin_volume, simulate_tilt_series

__all__ = [
    "Acquisition", "FSC_TAPER_VOX", "METHODS", "load_phantom", "reconstruction_config", "run_case", "simulate_case"
]

METHODS = ("icetide", "fbp_aligned", "sirt_aligned", "fbp_raw", "fbp_oracle", "sirt_oracle")
SIRT_ITERATIONS = 30


@dataclass(frozen=True)
class Acquisition:
    """A simulated acquisition: tilts ``tilt_min_deg:tilt_step_deg:tilt_max_deg`` (degrees, inclusive), SNR (dB, as
    defined in docs/CONVENTIONS.md "Simulation protocol"), deformation profile and the seed of deformations and noise;
    with ``dose_per_px``, counting (Poisson) noise at that mean count per pixel instead of the SNR's Gaussian noise;
    with ``defocus_um``, the CTF at that nominal defocus (:class:`icetide.simulate.Optics` defaults otherwise); with
    ``exposure_e_per_A2`` > 0, radiation damage from that total exposure."""

    tilt_min_deg: float = -60.0
    tilt_max_deg: float = 60.0
    tilt_step_deg: float = 3.0
    snr_db: float = 10.0
    profile: str = "paper"
    seed: int = 0
    dose_per_px: float | None = None
    defocus_um: float | None = None
    exposure_e_per_A2: float = 0.0

    def optics(self, pixel_size_A: float) -> Optics | None:
        """The simulation's CTF and damage at ``pixel_size_A``, or None when it has neither."""
        if self.defocus_um is None and self.exposure_e_per_A2 == 0:
            return None
        ctf = self.defocus_um is not None
        return Optics(pixel_size_A, ctf, self.defocus_um if ctf else 3.0, total_exposure_e_per_A2=self.exposure_e_per_A2)

    def tilt_angles_deg(self) -> np.ndarray:
        n = int(round((self.tilt_max_deg - self.tilt_min_deg) / self.tilt_step_deg)) + 1
        return np.linspace(self.tilt_min_deg, self.tilt_max_deg, n)


def load_phantom(path: str | Path, max_size: int | None = None) -> tuple[np.ndarray, float, int]:
    """Read a ground-truth volume (MRC, ``.mrc.gz`` too) and bin it so that ``ny, nx <= max_size``.

    Returns ``(volume (nz, ny, nx) float32, voxel_size_A, bin_factor)``; the voxel size is the header's (10 A
    when the header has none) times the bin factor.
    """
    volume, header_A = read_volume(path)
    if not volume.any():
        raise IcetideError(f"{path}: the volume is all zeros")
    factor = 1 if max_size is None else max(1, math.ceil(max(volume.shape[1:]) / max_size))
    if factor > 1:
        volume = bin_volume(volume, factor)
    return volume, (header_A or 10.0) * factor, factor


def reconstruction_config(thickness: int, voxel_size_A: float, **fit) -> ReconstructConfig:
    """The default reconstruction settings for a simulated case; ``fit``: :class:`FitSettings` to change."""
    return ReconstructConfig(thickness=thickness, pixel_size_A=voxel_size_A, fit=FitSettings(**fit))


def simulate_case(
    truth: np.ndarray,
    voxel_size_A: float,
    acquisition: Acquisition,
    out_dir: Path,
    on_phase: Callable[[str], None] | None = None,
) -> SimulatedTiltSeries:
    """Simulate ``acquisition`` of ``truth`` and write ``truth/volume.mrc``, ``truth/deformations.json`` and
    ``tilt_series.mrc`` + ``.tlt`` into ``out_dir`` (which must exist)."""
    a = acquisition
    angles = a.tilt_angles_deg()
    if on_phase is not None:
        noise = f"{a.snr_db:g} dB" if a.dose_per_px is None else f"Poisson noise at {a.dose_per_px:g} counts/px"
        on_phase(f"simulating {len(angles)} tilts, {a.profile} deformations, {noise}, seed {a.seed}")
    sim = simulate_tilt_series(truth, angles, profile=a.profile, snr_db=a.snr_db, seed=a.seed,
                               dose_per_px=a.dose_per_px, optics=a.optics(voxel_size_A))
    out_dir = Path(out_dir)
    (out_dir / "truth").mkdir(exist_ok=True)
    write_mrc(out_dir / "truth" / "volume.mrc", truth, voxel_size_A)
    write_deformations(out_dir / "truth" / "deformations.json", sim.deformations)
    write_mrc(out_dir / "tilt_series.mrc", sim.noisy, voxel_size_A, stack=True)
    write_tlt(out_dir / "tilt_series.tlt", angles)
    return sim


def run_case(
    truth: np.ndarray,
    voxel_size_A: float,
    acquisition: Acquisition,
    config: ReconstructConfig,
    out_dir: Path,
    on_phase: Callable[[str], None] | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    taper_vox: float = FSC_TAPER_VOX,
) -> dict:
    """Simulate ``acquisition`` of ``truth (nz, ny, nx)``, run every method of :data:`METHODS`, score them.

    ``out_dir`` (must exist) receives ``truth/volume.mrc``, ``truth/deformations.json``, ``tilt_series.mrc`` +
    ``.tlt``, ``icetide/`` (every output of :func:`icetide.reconstruct.reconstruct`), one MRC per baseline and
    the figures of :func:`icetide.evaluation.evaluate_volumes`. Returns a JSON-friendly dict:
    ``reconstructions`` (scores per method), ``deformations`` (errors of icetide's estimate), ``fit``,
    ``seconds`` (wall time per method; the ``timing`` experiment measures time and memory properly, each method
    in a fresh process), ``acquisition``, ``snr_db_measured`` and ``timings_s``.
    """
    out_dir = Path(out_dir)
    phase = on_phase or (lambda name: None)
    timings: dict[str, float] = {}
    seconds: dict[str, float] = {}
    angles = acquisition.tilt_angles_deg()
    nz = truth.shape[0]

    t0 = time.monotonic()
    sim = simulate_case(truth, voxel_size_A, acquisition, out_dir, phase)
    timings["simulate_s"] = time.monotonic() - t0

    budget = "" if config.fit.max_minutes is None else f" (at most {config.fit.max_minutes:g} min of fitting)"
    phase(f"reconstructing with icetide{budget}")
    series = TiltSeries(sim.noisy, angles, voxel_size_A, defocus_A=sim.defocus_A,
                        pre_exposure_e_per_A2=sim.pre_exposure_e_per_A2)
    rec_dir = out_dir / "icetide"
    rec_dir.mkdir(exist_ok=True)
    t0 = time.monotonic()
    rec_report = reconstruct(series, config, rec_dir, on_epoch=on_epoch, on_phase=phase)
    timings["reconstruct_s"] = seconds["icetide"] = time.monotonic() - t0

    phase("baselines: FBP of the raw series, FBP and SIRT of the aligned and of the undeformed series")
    names = rec_report["outputs"]
    volumes = {"icetide": read_mrc(rec_dir / names["tomogram"])[0], "fbp_aligned": read_mrc(rec_dir / names["fbp"])[0]}
    aligned = torch.tensor(read_mrc(rec_dir / names["aligned"])[0])  # already CTF/exposure-corrected
    # The raw and oracle series get the same correction as the aligned stack, so that only the alignment differs.
    raw = torch.from_numpy(correct_optics(series, config, for_fit=False)[0].images)
    oracle = TiltSeries(sim.noisy_undeformed, angles, voxel_size_A, defocus_A=sim.defocus_A,
                        pre_exposure_e_per_A2=sim.pre_exposure_e_per_A2)
    undeformed = torch.from_numpy(correct_optics(oracle, config, for_fit=False)[0].images)
    baselines = {
        "sirt_aligned": lambda: sirt(aligned, angles, nz, SIRT_ITERATIONS),
        "fbp_raw": lambda: fbp(raw, angles, nz),
        "fbp_oracle": lambda: fbp(undeformed, angles, nz),
        "sirt_oracle": lambda: sirt(undeformed, angles, nz, SIRT_ITERATIONS),
    }
    for name, make in baselines.items():
        t0 = time.monotonic()
        volumes[name] = make().numpy()
        seconds[name] = time.monotonic() - t0
        write_mrc(out_dir / f"{name}.mrc", volumes[name], voxel_size_A)
    timings["baselines_s"] = sum(seconds[name] for name in baselines)

    phase("scoring against the truth")
    t0 = time.monotonic()
    estimated = read_deformations(rec_dir / "deformations.json")
    scores = evaluate_volumes(
        {name: volumes[name] for name in METHODS}, truth, out_dir, voxel_size_A, taper_vox=taper_vox,
        deformations=(sim.deformations, estimated),
    )
    timings["evaluate_s"] = time.monotonic() - t0
    return {
        "acquisition": {**asdict(acquisition), "n_tilts": len(angles)},
        "volume_shape_zyx": list(truth.shape),
        "voxel_size_A": voxel_size_A,
        "snr_db_measured": sim.snr_db_measured,
        "snr_zero_mean_db": sim.snr_zero_mean_db,
        "reconstructions": scores["reconstructions"],
        "deformations": scores["deformations"],
        "fit": {k: rec_report[k] for k in ("epochs", "binned_epochs", "stop_reason", "best_epoch", "fit_seconds",
                                           "device")},
        "sirt_iterations": SIRT_ITERATIONS,
        "seconds": seconds,
        "timings_s": timings,
    }
