"""The built-in demonstration: simulate a tilt series with known truth, reconstruct it, compare and report.

Needs no data: the phantom is generated (:func:`icetide.simulate.crowded_phantom` with Gaussian-blob proteins). The
series follows the simulation protocol of docs/CONVENTIONS.md (paper deformation profile, 10 dB, 41 tilts) and every
method of :data:`icetide.experiments.case.METHODS` (icetide, FBP and SIRT of the icetide-aligned series, FBP of the
raw series, the FBP oracle) is scored against the same truth by :func:`icetide.experiments.case.run_case`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from . import __version__
from .config import ReconstructConfig
from .evaluation import REGISTRATION_NOTE
from .experiments.case import Acquisition, reconstruction_config, run_case
from .io import write_json
from .simulate import crowded_phantom

__all__ = ["DemoSettings", "run_demo"]


@dataclass(frozen=True)
class DemoSettings:
    """What the demo simulates and how long it fits.

    ``shape_zyx``: phantom (and tomogram) shape in voxels; ``acquisition``: tilts, SNR, deformation profile and
    the seed (also of the phantom and the fit); ``voxel_size_A``: the phantom's voxel size (written to the
    headers); ``max_minutes``: fitting time budget; ``proteins_dir``: density maps (MRC) to place as proteins
    instead of Gaussian blobs.
    """

    shape_zyx: tuple[int, int, int] = (48, 128, 128)
    acquisition: Acquisition = Acquisition()
    voxel_size_A: float = 10.0
    max_minutes: float = 3.0
    epochs: int = 400
    device: str = "auto"
    proteins_dir: str | None = None


def run_demo(
    out_dir: Path,
    settings: DemoSettings = DemoSettings(),
    on_phase: Callable[[str], None] | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    config: ReconstructConfig | None = None,
) -> dict:
    """Run the demo into ``out_dir`` (which must exist) and return the summary also written to ``summary.json``.

    ``config``: the reconstruction settings; default: the defaults with ``settings``' thickness, epochs, time
    budget, seed and device. Writes what :func:`icetide.experiments.case.run_case` writes and ``summary.json``.
    """
    s = settings
    phase = on_phase or (lambda name: None)
    phase(f"generating a {s.shape_zyx[2]} x {s.shape_zyx[1]} x {s.shape_zyx[0]} phantom")
    seed = s.acquisition.seed
    truth = crowded_phantom(s.shape_zyx, seed=seed, proteins_dir=s.proteins_dir, voxel_size_A=s.voxel_size_A)
    if config is None:
        config = reconstruction_config(s.shape_zyx[0], s.voxel_size_A, epochs=s.epochs, max_minutes=s.max_minutes,
                                       seed=seed, device=s.device)
    case = run_case(truth, s.voxel_size_A, s.acquisition, config, Path(out_dir), on_phase, on_epoch)
    summary = {
        "command": "demo",
        "icetide_version": __version__,
        "settings": {**asdict(s), "n_tilts": case["acquisition"]["n_tilts"]},
        "registration": REGISTRATION_NOTE,
        **case,
        "config": config.model_dump(mode="json"),
    }
    write_json(Path(out_dir) / "summary.json", summary)
    return summary
