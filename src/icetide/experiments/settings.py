"""What every experiment shares: its settings, the phantoms it simulates from, and the machine it ran on."""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..config import ReconstructConfig
from ..runtime import resolve_device
from ..simulate import crowded_phantom
from .case import Acquisition, load_phantom, reconstruction_config

__all__ = ["ExperimentSettings", "Phantom", "machine_info", "phantoms"]


@dataclass(frozen=True)
class ExperimentSettings:
    """What every experiment shares.

    ``phantoms``: ground-truth MRC volumes (``single``, ``timing``, ``noise`` and ``epochs`` use the first;
    ``volumes`` all); none: a generated crowded phantom per seed. ``full``: the paper's scale. ``seed``: the
    simulation and fit seed; ``seeds``: those of ``volumes``. ``snrs_db``: the ``noise`` sweep. ``epochs`` and
    ``max_minutes``: limits of each fit (None: the defaults, early stopping ends a fit; ``epochs`` defaults to
    250 in the ``epochs`` experiment, which runs without early stopping). ``every``: epochs between scores in
    ``epochs``. ``command``: the command line, quoted in ``summary.md``.
    """

    phantoms: tuple[str, ...] = ()
    full: bool = False
    seed: int = 0
    seeds: tuple[int, ...] = (0, 1)
    snrs_db: tuple[float, ...] = (-20.0, -10.0, 0.0, 10.0, 20.0, 30.0)
    epochs: int | None = None
    max_minutes: float | None = None
    every: int = 5
    device: str = "auto"
    command: str = ""

    @property
    def max_size(self) -> int | None:
        """Largest lateral size after binning (None at full scale)."""
        return None if self.full else 128

    def reconstruction_config(
        self, phantom: "Phantom", seed: int | None = None, default_epochs: int = 500, **fit
    ) -> ReconstructConfig:
        """icetide's settings for ``phantom``: the defaults with this experiment's epoch limit (else
        ``default_epochs``), time budget, device and ``seed`` (default: this experiment's), then ``fit``."""
        limits = {"epochs": self.epochs or default_epochs, "max_minutes": self.max_minutes,
                  "seed": self.seed if seed is None else seed, "device": self.device}
        return reconstruction_config(phantom.volume.shape[0], phantom.voxel_size_A, **{**limits, **fit})

    def acquisition(self, **changes) -> Acquisition:
        """The default acquisition of this scale (41 tilts at 3 degrees, or 61 at 2 with ``full``)."""
        return Acquisition(**{"tilt_step_deg": 2.0 if self.full else 3.0, "seed": self.seed, **changes})


@dataclass(frozen=True)
class Phantom:
    """A ground truth ready to simulate: ``volume (nz, ny, nx)`` at ``voxel_size_A``; ``source`` says where from."""

    name: str
    volume: np.ndarray
    voxel_size_A: float
    source: str


def _phantom_names(paths: tuple[str, ...]) -> list[str]:
    """File names without ``.mrc``/``.gz``; the parent folder's name where file names repeat (polnet's
    ``tomo_001_den.mrc`` in every folder)."""
    stems = [Path(p).name.removesuffix(".gz").removesuffix(".mrc") for p in paths]
    return [Path(p).parent.name if stems.count(s) > 1 else s for p, s in zip(paths, stems)]


def phantoms(settings: ExperimentSettings, seed: int | None = None, first_only: bool = False) -> list[Phantom]:
    """The phantoms of ``settings`` (read and binned to the scale), or a generated one for ``seed``."""
    paths = settings.phantoms[:1] if first_only else settings.phantoms
    if paths:
        out = []
        for name, path in zip(_phantom_names(paths), paths):
            volume, voxel_A, factor = load_phantom(path, settings.max_size)
            out.append(Phantom(name, volume, voxel_A, f"{path} (binned {factor}x)" if factor > 1 else str(path)))
        return out
    seed = settings.seed if seed is None else seed
    shape = (180, 512, 512) if settings.full else (48, 128, 128)
    volume = crowded_phantom(shape, seed=seed)
    return [Phantom(f"generated_seed{seed}", volume, 10.0, f"crowded_phantom({shape}, seed={seed}), blob proteins")]


def machine_info(device: str) -> dict:
    """Where the numbers were measured: CPU threads, platform, torch, the device (GPU name)."""
    dev = resolve_device(device)
    return {
        "device": str(dev),
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "icetide": __version__,
    }
