import numpy as np
import pytest

from icetide.consistency import even_odd_fsc
from icetide.deform import Deformations
from icetide.simulate import crowded_phantom, simulate_tilt_series


def test_the_even_odd_score_prefers_the_true_alignment():
    truth = crowded_phantom((16, 48, 48), seed=3)
    angles = np.arange(-60.0, 61.0, 4.0)
    sim = simulate_tilt_series(truth, angles, snr_db=10, seed=0, samples_per_voxel=1.0)
    aligned = Deformations.identity(angles, truth.shape[1:])
    wrong = Deformations.identity(angles, truth.shape[1:])
    wrong.shifts_px = np.random.default_rng(1).normal(0, 3, (len(angles), 2))
    good, bad = even_odd_fsc(sim.noisy, aligned, 16), even_odd_fsc(sim.noisy, wrong, 16)
    assert good["score"] > bad["score"] + 0.05
    assert len(good["frequency"]) == len(good["fsc"])
    # invariant to each image's level and scale
    scaled = sim.noisy * np.linspace(1, 3, len(angles))[:, None, None] + 7.0
    assert abs(even_odd_fsc(scaled, aligned, 16)["score"] - good["score"]) < 1e-4


def test_a_fit_that_ends_worse_than_its_start_keeps_the_start():
    from icetide.data import TiltSeries
    from icetide.start import check_against_start

    truth = crowded_phantom((16, 48, 48), seed=4)
    angles = np.arange(-60.0, 61.0, 4.0)
    series = TiltSeries(simulate_tilt_series(truth, angles, snr_db=10, seed=1, samples_per_voxel=1.0).noisy, angles)
    start = Deformations.identity(angles, truth.shape[1:])
    worse = Deformations.identity(angles, truth.shape[1:])
    worse.shifts_px = np.random.default_rng(2).normal(0, 3, (len(angles), 2))
    kept, entry = check_against_start(series, start, worse, 16)
    assert entry["kept"] == "start" and entry["start_score"] > entry["fit_score"] and "note" in entry
    np.testing.assert_array_equal(kept.shifts_px, start.shifts_px)
    kept, entry = check_against_start(series, worse, start, 16)
    assert entry["kept"] == "fit" and kept is start


def test_the_specimen_centre_is_found_and_the_outputs_centred_on_it():
    from icetide.data import TiltSeries
    from icetide.start import specimen_centre_z

    volume = np.zeros((48, 128, 128), np.float32)
    volume[26:38] = crowded_phantom((12, 128, 128), seed=6)  # slices 27..36 hold it: z = 31.5 - 23.5 = +8
    angles = np.arange(-60.0, 61.0, 4.0)
    sim = simulate_tilt_series(volume, angles, snr_db=20, seed=0, samples_per_voxel=1.0)
    series = TiltSeries(sim.noisy, angles)
    d = Deformations.identity(angles, volume.shape[1:])
    raised = specimen_centre_z(series, d, 24)
    middle = TiltSeries(simulate_tilt_series(np.roll(volume, -8, axis=0), angles, snr_db=20, seed=0,
                                             samples_per_voxel=1.0).noisy, angles)
    centred = specimen_centre_z(middle, d, 24)
    # Measured 5.0 and -2.9: the estimate follows the specimen's height (8 voxels apart), within a few voxels.
    assert raised - centred == pytest.approx(8.0, abs=1.5)
    assert abs(centred) < 4.0 and abs(raised - 8.0) < 4.0
