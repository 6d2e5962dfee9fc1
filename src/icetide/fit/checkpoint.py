"""The checkpoint file of a fit (``checkpoint.pt``): a versioned dict of plain tensors and state dicts, written
with ``torch.save``; every compatibility rule for older files lives here.

Keys (format 2): ``format_version``; ``model`` (the volumes' state dicts and the deformation tensors, as
:meth:`icetide.fit.Fitter.snapshot`); ``opt_volume``, ``opt_deform`` (optimiser state dicts); ``generator``,
``torch_rng`` (random states); ``validation_mask``, ``half_mask``; ``epoch``, ``step``, ``samples``,
``elapsed_s``, ``curves``, ``lr_factor``, ``rollbacks``; the plan (``binned_epochs``, ``level_epochs``); both
stages' early stopping (``best_val``, ``best_state``, ``bad_validations``; ``best_binned_val``,
``best_binned_state``, ``bad_binned_validations``); for reading: ``tilt_axis_offset_deg``, ``tilt_gains``; and
``config``, the settings it was made with. Format 1 (no ``format_version``) is read as well.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..config import ReconstructConfig
from ..errors import IcetideError
from ..io.util import atomic_path

__all__ = ["CHECKPOINT_VERSION", "RESUMABLE_SETTINGS", "check_settings", "read_checkpoint", "write_checkpoint"]

CHECKPOINT_VERSION = 2
# Settings a fit may be resumed with changed: they bound or place the work, not what is fitted.
RESUMABLE_SETTINGS = ("fit.epochs", "fit.max_minutes", "fit.device", "fit.checkpoint_minutes", "fit.max_rollbacks",
                      "fit.max_memory_gb")


def write_checkpoint(state: dict, path: Path) -> None:
    """Write ``state`` (without ``format_version``, which this adds) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        torch.save({"format_version": CHECKPOINT_VERSION, **state}, tmp)


def read_checkpoint(path: Path, config: ReconstructConfig, device: torch.device) -> dict:
    """The state in ``path``, upgraded to the current format, checked against ``config`` (only
    ``RESUMABLE_SETTINGS`` may differ); tensors on ``device``."""
    if not Path(path).is_file():
        raise IcetideError(f"{path}: no checkpoint to resume from")
    try:
        state = torch.load(path, map_location=device, weights_only=False)
    except Exception as exc:
        raise IcetideError(f"{path}: unreadable checkpoint ({exc})") from None
    version = state.get("format_version", 1)
    if version > CHECKPOINT_VERSION:
        raise IcetideError(f"{path}: checkpoint format {version} is newer than this icetide reads "
                           f"({CHECKPOINT_VERSION}); update icetide")
    check_settings(state["config"], config)
    return _upgraded(state, config) if version == 1 else state


def check_settings(saved: dict, config: ReconstructConfig) -> None:
    """Raise unless the settings ``saved`` with a checkpoint match ``config`` except for ``RESUMABLE_SETTINGS``."""
    current = config.model_dump(mode="json")
    if saved != current:
        changed = _first_difference(saved, current)
        if changed not in RESUMABLE_SETTINGS:
            raise IcetideError(f"checkpoint was made with different settings ({changed}); cannot resume")


def _upgraded(state: dict, config: ReconstructConfig) -> dict:
    """A format-1 checkpoint in format 2: format 1 was written before the binned stage (no plan, no binned
    early stopping), before rollbacks (no ``lr_factor``, ``rollbacks``), and early ones before intensity offsets
    (no ``offset`` in the model states)."""
    state = dict(state)
    state.setdefault("binned_epochs", 0)
    state.setdefault("level_epochs", config.fit.coarse_to_fine_epochs or 0)
    state.setdefault("best_binned_val", math.inf)
    state.setdefault("best_binned_state", None)
    state.setdefault("bad_binned_validations", 0)
    state.setdefault("lr_factor", 1.0)
    state.setdefault("rollbacks", [])
    for key in ("model", "best_state", "best_binned_state"):
        if state.get(key) is not None and "offset" not in state[key]:
            state[key] = {**state[key], "offset": torch.tensor(0.0)}
    state["format_version"] = CHECKPOINT_VERSION
    return state


def _first_difference(a, b, prefix: str = "") -> str:
    """The dotted name of the first setting in which the nested dicts ``a`` and ``b`` differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
    return prefix.rstrip(".")
