"""What the command-line tests share: invoking ``icetide``, a tiny simulated tilt series on disk, a series of gold
beads about a tilted axis."""

from pathlib import Path

import functools

import numpy as np
from scipy import ndimage
from typer.testing import CliRunner

from icetide.cli.main import app
from icetide.deform import Deformations
from icetide.io import write_mrc, write_tlt
from icetide.simulate import crowded_phantom, simulate_tilt_series

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


@functools.lru_cache(maxsize=1)
def _gold_beads_volume() -> np.ndarray:
    """``(48, 128, 128)``: a crowded specimen between two layers of blurred gold beads (z = 4 and 43)."""
    volume = np.zeros((48, 128, 128), np.float32)
    rng = np.random.default_rng(4)
    for z in (4, 43):
        for y, x in rng.integers(8, 120, (40, 2)):
            volume[z, y, x] += 50.0
    volume = ndimage.gaussian_filter(volume, 1.0)
    volume[6:42] += 0.5 * crowded_phantom((36, 128, 128), seed=5)
    return volume


def gold_beads_about(psi_deg: float, angles: np.ndarray, drift_px: float = 4.0) -> tuple[np.ndarray, Deformations]:
    """A specimen 36 voxels thick between two layers of gold beads (48-voxel slab, 128 x 128), seen about an axis
    psi degrees from the image Y axis, shifted by up to ``drift_px``, 10 dB; the images and the true deformations.
    A wide field and beads far from the centre plane: a degree of axis error moves them by about a pixel at the
    highest tilts."""
    m = len(angles)
    shifts = np.random.default_rng(4).uniform(-drift_px, drift_px, (m, 2))
    true = Deformations(angles, shifts, np.full(m, -psi_deg), np.zeros((m, 2, 2, 2)), (128, 128))
    sim = simulate_tilt_series(_gold_beads_volume(), angles, deformations=true, snr_db=10, seed=3, samples_per_voxel=1.0)
    return sim.noisy, true
