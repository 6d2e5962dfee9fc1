"""Gold-bead tracking and the shift-only bead alignment (icetide.beads)."""

import numpy as np
import pytest
import torch

from icetide.beads import (
    bead_separation_px, detect_beads, locate_beads, project_beads, rotated, solve_bead_shifts, track_beads,
    window_inside,
)
from icetide.classical import fbp, standardised
from icetide.deform import remove_gauge

ANGLES = np.arange(-60.0, 61.0, 3.0)


def _beads(rng, count=12, half=40.0, depth=12.0):
    xy = rng.uniform(-half, half, (count, 2))
    z = rng.choice([-depth, depth], count) + rng.normal(0, 1, count)
    return np.column_stack([xy, z])


def test_project_beads_follows_the_convention():
    # docs/CONVENTIONS.md: u = x cos(theta) + z sin(theta), v = y
    p = project_beads(np.array([[2.0, -3.0, 5.0]]), [0.0, 30.0, -90.0])
    expected = [[2.0, -3.0], [2 * np.cos(np.pi / 6) + 5 * 0.5, -3.0], [-5.0, -3.0]]
    np.testing.assert_allclose(p[:, 0], expected, atol=1e-12)


def test_solve_recovers_shifts_up_to_the_gauge_and_ignores_outliers():
    rng = np.random.default_rng(0)
    positions = _beads(rng)
    shifts = rng.normal(0, 2.0, (ANGLES.size, 2))
    seen = project_beads(positions, ANGLES) + shifts[:, None]
    seen[5, 3] += [9.0, -7.0]  # a neighbour caught instead of the bead
    seen[10:14, 7] = np.nan  # lost in a few views
    found = solve_bead_shifts(seen, ANGLES)
    np.testing.assert_allclose(found["shifts_px"], remove_gauge(shifts, ANGLES)[0], atol=1e-9)
    assert found["residual_px"] < 1e-9
    assert found["residual_start_px"] > 1.0  # the same beads with every view's shift held at 0
    assert found["measurements"] == seen.shape[0] * seen.shape[1] - 5


def _bead_series(positions, shifts, shape=(96, 96), sigma=1.2, spots=None):
    """Dark-field images of Gaussian beads at ``positions`` seen with per-view ``shifts`` (or at ``spots (M, J,
    2)``, detector ``(u, v)``), plus weak noise."""
    ny, nx = shape
    v, u = np.meshgrid(np.arange(ny) - (ny - 1) / 2, np.arange(nx) - (nx - 1) / 2, indexing="ij")
    images = np.zeros((ANGLES.size, ny, nx))
    if spots is None:
        spots = project_beads(positions, ANGLES) + shifts[:, None]
    for m, view in enumerate(spots):
        for su, sv in view:
            images[m] += np.exp(-((u - su) ** 2 + (v - sv) ** 2) / (2 * sigma**2))
    return images + np.random.default_rng(1).normal(0, 0.02, images.shape)


def test_locate_beads_to_a_fraction_of_a_pixel():
    positions = np.array([[10.3, -7.6, 4.0], [-20.0, 15.2, -6.0]])
    images = _bead_series(positions, np.zeros((ANGLES.size, 2)))
    seen = locate_beads(images, project_beads(positions, ANGLES) + 2.0)  # predictions 2 px off
    assert np.abs(seen - project_beads(positions, ANGLES)).max() < 0.2
    far = locate_beads(images, project_beads(positions, ANGLES) + 30.0)  # nothing but noise there
    assert np.isnan(far).mean() > 0.5


def test_detect_beads_in_a_volume():
    volume = np.zeros((20, 60, 60))
    volume[5, 20, 30] = volume[14, 40, 12] = 10.0
    volume += np.random.default_rng(2).normal(0, 0.1, volume.shape)
    found = detect_beads(volume)
    expected = [[30 - 29.5, 20 - 29.5, 5 - 9.5], [12 - 29.5, 40 - 29.5, 14 - 9.5]]
    assert sorted(map(tuple, found.tolist())) == sorted(map(tuple, expected))


def test_detect_beads_leaves_out_maxima_much_weaker_than_the_beads():
    # Four beads of one strength, a brighter outlier, and dense specimen features at 0.4 of the beads: the
    # features stand well above the noise but are not beads (the threshold follows the third strongest).
    volume = np.random.default_rng(4).normal(0, 0.1, (20, 60, 60))
    beads = [(4, 10, 10), (4, 10, 50), (15, 50, 10), (15, 50, 50)]
    for k, j, i in beads:
        volume[k, j, i] = 10.0
    volume[10, 30, 30] = 25.0
    features = [(10, 20, 30), (10, 40, 30)]
    for k, j, i in features:
        volume[k, j, i] = 4.0
    found = detect_beads(volume)
    assert len(found) == 5
    assert found[0].tolist() == [0.5, 0.5, 0.5]
    weak = detect_beads(np.where(volume > 5, 0.0, volume))  # only the features left: they are the strongest
    assert len(weak) == 2


def test_a_bead_many_pixels_wide_is_one_candidate_when_its_diameter_is_known():
    assert bead_separation_px(None) == bead_separation_px(5.0) == 3 and bead_separation_px(12.0) == 10
    positions = np.array([[-25.0, -20.0, 10.0], [22.0, -18.0, -10.0], [-20.0, 24.0, -10.0], [24.0, 22.0, 10.0]])
    v, u = np.meshgrid(np.arange(96) - 47.5, np.arange(96) - 47.5, indexing="ij")
    images = np.random.default_rng(1).normal(0, 0.05, (ANGLES.size, 96, 96))
    for m, view in enumerate(project_beads(positions, ANGLES)):
        for su, sv in view:  # solid spheres 12 px wide: their FBP peaks on the rim
            images[m] += 2 * np.sqrt(np.clip(36 - (u - su) ** 2 - (v - sv) ** 2, 0, None))
    volume = fbp(standardised(torch.tensor(images, dtype=torch.float32)), ANGLES, 40).numpy()
    assert len(detect_beads(volume)) > 4
    found = detect_beads(volume, separation_px=bead_separation_px(12.0))
    assert len(found) == 4
    assert np.linalg.norm(found[:, None] - positions[None], axis=-1).min(axis=1).max() < 6


def test_track_beads_finds_the_shifts_of_a_misaligned_series():
    rng = np.random.default_rng(3)
    positions = _beads(rng, count=10, half=30.0, depth=10.0)
    shifts = rng.normal(0, 1.5, (ANGLES.size, 2))
    images = _bead_series(positions, shifts)
    found = track_beads(torch.tensor(images, dtype=torch.float32), ANGLES, thickness=40)
    assert found["beads"] >= 6
    error = found["shifts_px"] - remove_gauge(shifts, ANGLES)[0]
    assert np.sqrt((error**2).sum(1).mean()) < 0.15
    assert found["residual_px"] < 0.15 < 1.0 < found["residual_start_px"]


def test_a_bead_that_leaves_the_field_at_high_tilt_is_followed_where_it_is_inside():
    rng = np.random.default_rng(5)
    edge = np.array([[30.0, 10.0, 30.0]])  # high above the centre near a side: inside in 28 of 41 views
    positions = np.concatenate([_beads(rng, count=6, half=25.0, depth=10.0), edge])
    assert 0.5 < window_inside(project_beads(edge, ANGLES), (96, 96)).mean() < 0.7  # under the found fraction
    shifts = rng.normal(0, 1.0, (ANGLES.size, 2))
    found = track_beads(torch.tensor(_bead_series(positions, shifts), dtype=torch.float32), ANGLES, thickness=80)
    assert found["beads"] == 7
    assert found["residual_px"] < 0.15


def test_track_beads_without_beads():
    noise = np.random.default_rng(4).normal(0, 1, (ANGLES.size, 64, 64))
    assert track_beads(torch.tensor(noise, dtype=torch.float32), ANGLES, thickness=32)["beads"] < 3


def test_refine_by_beads_corrects_an_alignment_and_leaves_a_bead_free_one():
    from icetide.config import ReconstructConfig
    from icetide.data import TiltSeries
    from icetide.deform import Deformations
    from icetide.start import refine_by_beads

    rng = np.random.default_rng(5)
    positions = _beads(rng, count=10, half=30.0, depth=10.0)
    shifts = rng.normal(0, 1.5, (ANGLES.size, 2))
    # Seen through alpha = 0.8 deg and tau = shifts: the ideal point p at R(-alpha)(p + tau) (docs/CONVENTIONS.md).
    spots = rotated(project_beads(positions, ANGLES) + shifts[:, None], -0.8)
    series = TiltSeries(_bead_series(None, None, spots=spots).astype(np.float32), ANGLES)
    config = ReconstructConfig(thickness=40)
    start = Deformations.identity(ANGLES, series.shape)
    moved, entry = refine_by_beads(series, config, start)
    assert entry["used"] and entry["beads"] >= 6 and entry["solved_residual_px"] < 0.2 < 1.0 < entry["residual_px"]
    assert abs(entry["rotation_deg"] - 0.8) < 0.1 and entry["estimate_deg"] == pytest.approx(-entry["rotation_deg"])
    np.testing.assert_allclose(moved.angles_deg, entry["rotation_deg"])
    error = remove_gauge(moved.shifts_px - shifts, ANGLES)[0]
    assert np.sqrt((error**2).sum(1).mean()) < 0.15
    # The corrected alignment, applied by icetide's own warp, leaves the beads consistent as they are.
    from icetide.classical import align_series

    again = track_beads(align_series(torch.tensor(series.images), moved), ANGLES, thickness=40)
    assert again["residual_start_px"] < 0.2

    noise = TiltSeries(rng.normal(0, 1, (ANGLES.size, 64, 64)).astype(np.float32), ANGLES)
    moved, entry = refine_by_beads(noise, config, Deformations.identity(ANGLES, noise.shape))
    assert moved is None and not entry["used"] and entry["note"]


def test_solve_bead_rotation_finds_a_turn_of_every_view():
    from icetide.beads import solve_bead_rotation

    rng = np.random.default_rng(6)
    positions = _beads(rng, count=15, half=60.0, depth=20.0)
    shifts = rng.normal(0, 2.0, (ANGLES.size, 2))
    seen = rotated(project_beads(positions, ANGLES) + shifts[:, None], -0.6)  # the views turned by -0.6 deg
    found = solve_bead_rotation(seen, ANGLES)
    assert found["inside"] and abs(found["rotation_deg"] - 0.6) < 0.05
    np.testing.assert_allclose(rotated(rotated(seen, 0.6), -0.6), seen, atol=1e-12)


def test_the_halves_of_the_beads_tell_whether_a_turn_can_be_trusted():
    from icetide.beads import solve_bead_rotation
    from icetide.start import turn_trusted

    rng = np.random.default_rng(7)
    positions = _beads(rng, count=6, half=60.0, depth=20.0)
    seen = rotated(project_beads(positions, ANGLES), -0.6)
    found = solve_bead_rotation(seen, ANGLES)
    assert found["subsets"] == "halves" and len(found["subsets_deg"]) == 2
    np.testing.assert_allclose(found["subsets_deg"], 0.6, atol=0.05)
    assert all(found["subsets_inside"]) and found["subsets_spread_deg"] < 0.1 and turn_trusted(found)
    # Five beads have no two disjoint sets of three: their turn, however right, is not trusted.
    few = solve_bead_rotation(seen[:, :5], ANGLES)
    assert abs(few["rotation_deg"] - 0.6) < 0.05
    assert few["subsets"] == "none" and few["subsets_spread_deg"] is None and not turn_trusted(few)
    positions = _beads(rng, count=12, half=60.0, depth=20.0)
    seen = rotated(project_beads(positions, ANGLES), -0.6)
    seen[:, 1::2] = rotated(seen[:, 1::2], -0.6)  # every other bead turned twice as far
    found = solve_bead_rotation(seen, ANGLES)
    halves = found["subsets_deg"]
    assert abs(halves[0] - 0.6) < 0.05 and abs(halves[1] - 1.2) < 0.05 and not turn_trusted(found)


def test_turn_standard_error_matches_the_scatter_and_grows_as_the_lever_shrinks():
    from icetide.beads import solve_bead_rotation, turn_standard_error

    rng = np.random.default_rng(8)
    positions = _beads(rng, count=15, half=60.0, depth=20.0)
    exact = rotated(project_beads(positions, ANGLES) + rng.normal(0, 2.0, (ANGLES.size, 2))[:, None], -0.3)
    assert turn_standard_error(exact, ANGLES) < 1e-6  # exact projections: the turn is pinned
    estimates, errors = [], []
    for _ in range(40):
        seen = exact + rng.normal(0, 0.3, exact.shape)
        found = solve_bead_rotation(seen, ANGLES)
        estimates.append(found["rotation_deg"])
        errors.append(found["standard_error_deg"])
    assert abs(np.mean(estimates) - 0.3) < 0.05
    assert 0.6 < np.std(estimates) / np.mean(errors) < 1.5
    # Four beads near the centre, all at one depth: the same scatter pins the turn far less well.
    near = np.column_stack([rng.uniform(-8, 8, (4, 2)), np.full(4, 5.0)])
    loose = project_beads(near, ANGLES) + rng.normal(0, 0.3, (ANGLES.size, 4, 2))
    assert turn_standard_error(loose, ANGLES) > 5 * np.mean(errors)
    assert turn_standard_error(np.full((ANGLES.size, 1, 2), np.nan), ANGLES) == float("inf")  # never seen


def test_a_turn_is_trusted_only_when_significant_inside_and_agreed():
    from icetide.start import BEAD_TURN_MIN_SIGMA, turn_trusted

    found = {"rotation_deg": 0.5, "inside": True, "standard_error_deg": 0.05, "subsets_spread_deg": 0.1}
    assert turn_trusted(found)
    assert not turn_trusted({**found, "standard_error_deg": 0.5 / BEAD_TURN_MIN_SIGMA + 0.01})  # too loose
    assert not turn_trusted({**found, "inside": False})
    assert not turn_trusted({**found, "subsets_spread_deg": None})  # most subsets do not determine it
    assert not turn_trusted({**found, "subsets_spread_deg": 0.3})  # the subsets disagree
    assert not turn_trusted({**found, "rotation_deg": 0.02, "standard_error_deg": 0.001})  # negligible


@pytest.mark.parametrize("pixel_size_A, used", [(20.0, True), (None, True), (10.0, False)])
def test_a_bead_correction_counts_as_negligible_by_its_size_in_angstrom(pixel_size_A, used):
    from icetide.config import ReconstructConfig
    from icetide.data import TiltSeries
    from icetide.deform import Deformations
    from icetide.start import refine_by_beads

    rng = np.random.default_rng(6)
    positions = _beads(rng, count=10, half=30.0, depth=10.0)
    shifts = rng.normal(0, 0.5, (ANGLES.size, 2))
    # 96-px images keep the search at full sampling: 0.75 px RMS is 15 A at 20 A per pixel, 7.5 A at 10 A.
    series = TiltSeries(_bead_series(positions, shifts).astype(np.float32), ANGLES, pixel_size_A)
    moved, entry = refine_by_beads(series, ReconstructConfig(thickness=40), Deformations.identity(ANGLES, series.shape))
    assert entry["bin"] == 1 and 0.6 < entry["shift_rms_px"] < 0.9
    assert entry["used"] == used and (moved is not None) == used
