"""What the command-line tests share: invoking ``icetide``, and a tiny simulated tilt series on disk."""

from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from icetide.cli.main import app
from icetide.io import write_mrc, write_tlt
from icetide.simulate import simulate_tilt_series

SHAPE = (12, 24, 32)
ANGLES = np.arange(-45.0, 46.0, 15.0)
# A small volume model: fits of a few epochs take seconds.
TINY_VOLUME_YAML = "volume: {log2_table_size: 10, n_levels: 3, hidden: 8}\n"

_runner = CliRunner()


def run_cli(*args):
    """``icetide ARGS...`` in this process (arguments converted to strings); the click ``Result``."""
    return _runner.invoke(app, [str(a) for a in args])


def write_series(stack: Path, truth: np.ndarray, seed: int, voxel_size_A: float) -> None:
    """A 20-dB simulated series of ``truth`` at :data:`ANGLES`: ``stack`` and its ``.tlt`` beside it."""
    sim = simulate_tilt_series(truth, ANGLES, snr_db=20, seed=seed, samples_per_voxel=1.0)
    write_mrc(stack, sim.noisy, voxel_size_A=voxel_size_A, stack=True)
    write_tlt(stack.with_suffix(".tlt"), ANGLES)
