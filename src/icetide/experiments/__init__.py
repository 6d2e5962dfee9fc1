"""The ICE-TIDE paper's experiments as re-runnable commands (``icetide experiment NAME``).

Each experiment writes into one folder: figures (PNG with their CSV/JSON), ``results.json`` and a markdown
``summary.md`` that names the command, the machine and the numbers. The default size fits a CPU (phantoms
binned to at most 128 voxels across, 41 tilts from -60 to +60 degrees); ``full=True`` is the paper's scale
(unbinned phantoms, 61 tilts in 2-degree steps), meant for a GPU.

- ``single`` (paper Figs. 4-7): every method on one volume; FSC, CC table, orthoslices, Fourier slices,
  local-field quivers, deformation errors.
- ``timing`` (Table I): wall time and peak memory of icetide (both renderers), FBP, SIRT and the coarse
  cross-correlation pre-alignment.
- ``noise`` (Fig. 8): CC of each method for several SNRs.
- ``epochs`` (Fig. 9): CC against training epochs with the FBP-oracle line and the early-stopping epoch.
- ``volumes`` (Fig. 10): CC of each method across phantoms and simulation seeds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..errors import IcetideError
from .settings import ExperimentSettings, Phantom, machine_info

__all__ = ["EXPERIMENTS", "ExperimentSettings", "Phantom", "machine_info", "run_experiment"]

EXPERIMENTS = ("single", "timing", "noise", "epochs", "volumes")


def run_experiment(
    name: str,
    out_dir: Path,
    settings: ExperimentSettings,
    on_phase: Callable[[str], None] | None = None,
    on_epoch: Callable[[dict], None] | None = None,
) -> dict:
    """Run experiment ``name`` (one of :data:`EXPERIMENTS`) into ``out_dir`` (which must exist); returns what
    it also wrote to ``results.json``. ``on_epoch`` receives the fit's per-epoch info (not in ``timing``, whose
    fits run in their own processes)."""
    from . import epochs, noise, single, timing, volumes

    runners = {"single": single.run, "timing": timing.run, "noise": noise.run, "epochs": epochs.run,
               "volumes": volumes.run}
    if name not in runners:
        raise IcetideError(f"unknown experiment {name!r}; choose one of {', '.join(EXPERIMENTS)}")
    return runners[name](settings, Path(out_dir), on_phase or (lambda text: None), on_epoch)
