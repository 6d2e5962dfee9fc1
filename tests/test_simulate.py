"""Simulation: phantoms, random deformations, ray-integrated projection, noise.

The protocol: docs/CONVENTIONS.md "Simulation protocol".
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter, map_coordinates

from icetide.deform import Deformations, deform_coords, local_displacement, warp_images
from icetide.errors import IcetideError
from icetide.geometry import deg2rad, detector_grid, ray_points, slab_ray_interval
from icetide.simulate import (
    add_noise,
    bin_volume,
    crowded_phantom,
    measure_snr_db,
    project_deformed,
    random_deformations,
    simulate_tilt_series,
)


def _smooth_volume(shape, sigma=1.5, seed=0):
    rng = np.random.default_rng(seed)
    vol = gaussian_filter(rng.standard_normal(shape), sigma)
    return (vol - vol.min()).astype(np.float32)


def _asymmetric_phantom(shape=(16, 40, 48)):
    """Three Gaussian blobs of different sizes and weights at asymmetric positions."""
    nz, ny, nx = shape
    z, y, x = np.meshgrid(*(np.arange(n) - (n - 1) / 2 for n in shape), indexing="ij")
    vol = np.zeros(shape)
    for (cx, cy, cz), s, a in [((-9, 5, 3), 2.0, 1.0), ((8, -7, -2), 3.0, 0.6), ((2, 10, 4), 1.5, 0.8)]:
        vol += a * np.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * s**2))
    return vol.astype(np.float32)


def _corr(a, b):
    a, b = np.ravel(a) - np.mean(a), np.ravel(b) - np.mean(b)
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


# --- projection geometry -------------------------------------------------------------------------


@pytest.mark.parametrize("theta_deg", [-50.0, 0.0, 35.0])
def test_single_voxel_projects_to_x_cos_plus_z_sin(theta_deg):
    vol = np.zeros((20, 32, 40), np.float32)
    k, j, i = 14, 10, 30
    vol[k, j, i] = 1.0
    x, y, z = i - 19.5, j - 15.5, k - 9.5
    img = project_deformed(vol, [theta_deg]).numpy()[0]
    rows, cols = np.indices(img.shape)
    u = (img * cols).sum() / img.sum() - 19.5
    v = (img * rows).sum() / img.sum() - 15.5
    t = math.radians(theta_deg)
    assert u == pytest.approx(x * math.cos(t) + z * math.sin(t), abs=0.1)
    assert v == pytest.approx(y, abs=1e-3)
    r, c = np.unravel_index(img.argmax(), img.shape)
    assert (r, c - 19.5) == (j, pytest.approx(x * math.cos(t) + z * math.sin(t), abs=0.5))


@pytest.mark.parametrize("theta_deg", [0.0, 30.0, -60.0])
@pytest.mark.parametrize("padding", [0, 5])
def test_constant_slab_projects_to_thickness_over_cos(theta_deg, padding):
    t = 10
    vol = np.zeros((t + 2 * padding, 40, 64), np.float32)
    vol[padding : padding + t] = 1.0
    img = project_deformed(vol, [theta_deg]).numpy()[0]
    interior = img[5:-5, 24:-24]  # rays that stay inside the box laterally
    expected = t / math.cos(math.radians(theta_deg))
    tol = 1e-4 if theta_deg == 0 else 5e-3
    np.testing.assert_allclose(interior, expected, rtol=tol)


def test_plane_projector_equals_trilinear_grid_sample_3d_along_the_rays():
    """Reference: sample every ray point with grid_sample 3-D (align_corners, zero padding) and sum."""
    rng = np.random.default_rng(1)
    vol = _smooth_volume((12, 20, 24), sigma=1.0)
    angles = np.array([-55.0, -10.0, 0.0, 33.0])
    deform = random_deformations(angles, (20, 24), "hard", rng)
    fast = project_deformed(vol, angles, deform).numpy()

    nz, ny, nx = vol.shape
    u, v = detector_grid(ny, nx)
    p = deform.tensors()
    coords = deform_coords(u, v, p["shifts_px"], p["angles_rad"], p["local_px"], (ny, nx))
    scale = torch.tensor([(nx - 1) / 2, (ny - 1) / 2, (nz - 1) / 2])
    reference = []
    for m, theta in enumerate(deg2rad(angles)):
        k = math.ceil(2 * (nz + 1) / math.cos(float(theta)))
        t0, t1 = slab_ray_interval(coords[m, ..., 0], theta, nz + 1.0)
        t = t0[..., None] + (torch.arange(k) + 0.5) / k * (t1 - t0)[..., None]
        points = ray_points(coords[m, ..., 0, None], coords[m, ..., 1, None], theta, t)
        samples = F.grid_sample(torch.tensor(vol)[None, None], (points / scale)[None], align_corners=True)
        reference.append((samples[0, 0].sum(-1) * (t1 - t0) / k).numpy())
    np.testing.assert_allclose(fast, np.array(reference), atol=1e-4)


def test_undeformed_series_matches_an_independent_rotate_and_sum_projector():
    vol = _asymmetric_phantom()
    nz, ny, nx = vol.shape
    angles = [-48.0, -12.0, 0.0, 25.0, 56.0]
    ours = project_deformed(vol, angles).numpy()
    # Rotate the volume into the beam frame with scipy (trilinear) and sum along the beam.
    uu, vv, ww = np.meshgrid(
        np.arange(nx) - (nx - 1) / 2, np.arange(ny) - (ny - 1) / 2, np.arange(-60, 60.5, 0.5), indexing="xy"
    )
    for m, a in enumerate(angles):
        c, s = math.cos(math.radians(a)), math.sin(math.radians(a))
        x, z = uu * c - ww * s, uu * s + ww * c  # Ry(theta)^T (u, v, w)
        idx = np.stack([z + (nz - 1) / 2, vv + (ny - 1) / 2, x + (nx - 1) / 2])
        theirs = map_coordinates(vol, idx, order=1, mode="grid-constant").sum(-1) * 0.5
        assert _corr(ours[m], theirs) > 0.99
        np.testing.assert_allclose(ours[m], theirs, atol=0.02 * theirs.max())


def test_deformed_series_equals_warped_ideal_series_up_to_interpolation():
    vol = _smooth_volume((16, 48, 56), sigma=2.0, seed=3)
    angles = np.array([-40.0, 0.0, 20.0, 50.0])
    deform = random_deformations(angles, (48, 56), "paper", np.random.default_rng(4))
    deformed = project_deformed(vol, angles, deform)
    ideal = project_deformed(vol, angles)
    p = deform.tensors()
    warped = warp_images(ideal, p["shifts_px"], p["angles_rad"], p["local_px"], deform.local_interpolation)
    m = 10  # shifts of up to 6 px plus 2 px local fields bring zeros in at the border
    a, b = deformed[:, m:-m, m:-m].numpy(), warped[:, m:-m, m:-m].numpy()
    for i in range(len(angles)):
        assert _corr(a[i], b[i]) > 0.99
    # and the deformation is not a no-op
    assert _corr(deformed[:, m:-m, m:-m].numpy(), ideal[:, m:-m, m:-m].numpy()) < 0.99


def test_project_deformed_rejects_bad_input():
    vol = np.zeros((4, 8, 8), np.float32)
    with pytest.raises(IcetideError):
        project_deformed(vol, [95.0])
    with pytest.raises(IcetideError):
        project_deformed(vol, [])
    with pytest.raises(IcetideError):
        project_deformed(vol[0], [0.0])
    with pytest.raises(IcetideError):
        project_deformed(vol, [0.0, 10.0], Deformations.identity([0.0], (8, 8)))
    with pytest.raises(IcetideError):
        project_deformed(vol, [0.0], Deformations.identity([0.0], (9, 8)), detector_shape=(8, 8))


def test_detector_larger_than_volume():
    vol = np.ones((6, 10, 12), np.float32)
    img = project_deformed(vol, [0.0], detector_shape=(14, 20)).numpy()[0]
    assert img.shape == (14, 20)
    assert img[7, 10] == pytest.approx(6.0, rel=1e-4)
    assert img[0, 0] == 0.0


# --- deformations ----------------------------------------------------------------------------------


def _peak_local_px(d: Deformations) -> np.ndarray:
    ny, nx = d.detector_shape
    vv, uu = torch.meshgrid(
        torch.linspace(-(ny - 1) / 2, (ny - 1) / 2, 97), torch.linspace(-(nx - 1) / 2, (nx - 1) / 2, 97), indexing="ij"
    )
    phi = local_displacement(torch.tensor(d.local_px, dtype=torch.float32), uu, vv, d.detector_shape, "bicubic")
    return phi.norm(dim=-1).amax(dim=(1, 2)).numpy()


@pytest.mark.parametrize("profile, shift, rot, local", [("paper", 6, 0.01, 2), ("hard", 20, 0.5, 4)])
def test_random_deformations_respect_the_profile(profile, shift, rot, local):
    angles = np.arange(-60, 61, 2.0)
    d = random_deformations(angles, (64, 80), profile, np.random.default_rng(0))
    assert d.n_tilts == 61 and d.local_px.shape == (61, 2, 5, 5) and d.local_interpolation == "bicubic"
    assert np.abs(d.shifts_px).max() <= shift and np.abs(d.shifts_px).max() > 0.8 * shift
    offset = d.extra.get("tilt_axis_offset_deg", 0.0)
    assert np.abs(d.angles_deg - offset).max() <= rot and np.abs(d.angles_deg - offset).max() > 0.8 * rot
    border = np.ones((5, 5), bool)
    border[1:-1, 1:-1] = False
    assert np.all(d.local_px[:, :, border] == 0)
    peak = _peak_local_px(d)
    assert peak.max() <= local * 1.002 and peak.max() > 0.8 * local  # bound enforced on a 129-point mesh
    if profile == "hard":
        assert 0 < abs(offset) <= 1.0
    else:
        assert "tilt_axis_offset_deg" not in d.extra


def test_random_deformations_rejects_unknown_profile():
    with pytest.raises(IcetideError):
        random_deformations([0.0], (8, 8), "easy", np.random.default_rng(0))


# --- noise and the whole acquisition ---------------------------------------------------------------


def test_add_noise_hits_the_requested_snr_and_works_on_tensors():
    clean = _smooth_volume((21, 64, 64), sigma=2.0) + 0.5  # a positive series with a mean level
    noisy, sigma = add_noise(clean, 3.0, np.random.default_rng(0))
    assert sigma == pytest.approx(math.sqrt(np.mean(clean.astype(np.float64) ** 2) / 10**0.3))
    assert measure_snr_db(clean, noisy) == pytest.approx(3.0, abs=0.1)
    assert measure_snr_db(clean, noisy, zero_mean=True) < measure_snr_db(clean, noisy) - 1
    noisy_t, sigma_t = add_noise(torch.tensor(clean), 3.0, np.random.default_rng(0))
    assert isinstance(noisy_t, torch.Tensor) and sigma_t == pytest.approx(sigma)
    np.testing.assert_allclose(noisy_t.numpy(), noisy, rtol=1e-6)
    with pytest.raises(IcetideError):
        add_noise(np.zeros((2, 4, 4)), 10.0, np.random.default_rng(0))


def test_simulate_tilt_series_truth_noise_and_determinism():
    vol = crowded_phantom((16, 48, 48), seed=2)
    angles = np.arange(-60, 61, 6.0)
    sim = simulate_tilt_series(vol, angles, "paper", snr_db=0.0, seed=5)
    shape = (21, 48, 48)
    for a in (sim.noisy, sim.clean, sim.clean_undeformed, sim.noisy_undeformed):
        assert a.shape == shape and a.dtype == np.float32
    assert sim.snr_db_measured == pytest.approx(0.0, abs=0.1)
    assert sim.snr_db_measured == pytest.approx(measure_snr_db(sim.clean, sim.noisy))
    assert sim.snr_zero_mean_db == pytest.approx(measure_snr_db(sim.clean, sim.noisy, zero_mean=True))
    noise_a, noise_b = sim.noisy - sim.clean, sim.noisy_undeformed - sim.clean_undeformed
    assert np.std(noise_b) == pytest.approx(sim.sigma, rel=0.02)
    assert abs(_corr(noise_a, noise_b)) < 0.02  # an independent draw
    np.testing.assert_allclose(sim.clean_undeformed, project_deformed(vol, angles).numpy(), atol=1e-5)
    np.testing.assert_allclose(sim.clean, project_deformed(vol, angles, sim.deformations).numpy(), atol=1e-5)
    again = simulate_tilt_series(vol, angles, "paper", snr_db=0.0, seed=5)
    assert np.array_equal(again.noisy, sim.noisy) and np.array_equal(again.noisy_undeformed, sim.noisy_undeformed)
    assert np.array_equal(again.deformations.local_px, sim.deformations.local_px)
    other = simulate_tilt_series(vol, angles, "paper", snr_db=0.0, seed=6)
    assert not np.allclose(other.deformations.shifts_px, sim.deformations.shifts_px)


def test_simulate_tilt_series_with_given_deformations_and_progress():
    vol = _smooth_volume((8, 16, 16))
    angles = [-30.0, 0.0, 30.0]
    given = random_deformations(angles, (16, 16), "hard", np.random.default_rng(1))
    seen = []
    sim = simulate_tilt_series(vol, angles, snr_db=20.0, deformations=given, on_tilt=lambda s, i: seen.append((s, i)))
    assert sim.deformations is given and sim.profile == "hard"
    assert seen == [("deformed", i) for i in range(3)] + [("undeformed", i) for i in range(3)]


@pytest.mark.cuda
def test_projection_on_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    vol = _smooth_volume((12, 24, 28))
    angles = [-50.0, 0.0, 40.0]
    d = random_deformations(angles, (24, 28), "hard", np.random.default_rng(0))
    cpu = project_deformed(vol, angles, d)
    gpu = project_deformed(torch.tensor(vol, device="cuda"), angles, d)
    assert gpu.device.type == "cuda"
    np.testing.assert_allclose(gpu.cpu().numpy(), cpu.numpy(), atol=1e-3)


# --- phantoms --------------------------------------------------------------------------------------


def test_crowded_phantom_is_a_deterministic_crowded_slab():
    vol = crowded_phantom((32, 64, 64), seed=1)
    assert vol.shape == (32, 64, 64) and vol.dtype == np.float32
    assert vol.min() >= 0 and 0.5 < vol.max() <= 1.0
    margin = max(1, 32 // 16)
    assert not vol[:margin].any() and not vol[-margin:].any()
    assert 0.1 < (vol > 0.05).mean() < 0.6  # crowded but not solid
    assert np.array_equal(vol, crowded_phantom((32, 64, 64), seed=1))
    assert not np.array_equal(vol, crowded_phantom((32, 64, 64), seed=2))


def test_crowded_phantom_from_protein_maps(shared_data):
    maps = shared_data / "proteins" / "maps_10A"
    vol = crowded_phantom((32, 64, 64), seed=0, proteins_dir=maps)
    assert vol.shape == (32, 64, 64) and vol.min() >= 0 and vol.max() <= 1.0
    assert (vol > 0.05).mean() > 0.1
    assert not np.array_equal(vol, crowded_phantom((32, 64, 64), seed=0))


def test_crowded_phantom_rejects_bad_input(tmp_path):
    with pytest.raises(IcetideError):
        crowded_phantom((4, 64, 64))
    with pytest.raises(IcetideError):
        crowded_phantom((16, 32, 32), proteins_dir=tmp_path)  # no maps there


def test_bin_volume_averages_and_crops():
    vol = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    out = bin_volume(vol, 2)
    assert out.shape == (2, 3, 3) and out.dtype == np.float32
    assert out[1, 2, 0] == pytest.approx(vol[2:4, 4:6, 0:2].mean())
    assert np.array_equal(bin_volume(vol, 1), vol)
    for bad in (0, 6):
        with pytest.raises(IcetideError):
            bin_volume(vol, bad)


def test_drift_profile_is_a_random_walk_along_the_tilt_angles():
    angles = np.array([30.0, -60.0, 0.0, 60.0, -30.0, 15.0, -15.0, 45.0, -45.0])  # not in angle order
    d = random_deformations(angles, (64, 64), "drift", np.random.default_rng(3))
    assert np.abs(d.shifts_px).max() == pytest.approx(20.0)
    np.testing.assert_allclose(d.shifts_px.mean(axis=0), 0.0, atol=1e-9)
    in_order = d.shifts_px[np.argsort(angles)]
    steps = np.linalg.norm(np.diff(in_order, axis=0), axis=1)
    jumps = np.linalg.norm(np.diff(d.shifts_px, axis=0), axis=1)  # neighbours in file order are not neighbours
    assert steps.mean() < jumps.mean()


def test_counting_noise_is_poisson_in_counts():
    volume = np.zeros((8, 64, 64), dtype=np.float32)
    volume[2:6, 16:48, 16:48] = 1.0
    sim = simulate_tilt_series(volume, [-30.0, 0.0, 30.0], dose_per_px=4.0, seed=1, samples_per_voxel=1.0)
    assert sim.clean.mean() == pytest.approx(4.0, rel=1e-5)  # scaled to the dose
    for noisy in (sim.noisy, sim.noisy_undeformed):
        assert np.array_equal(noisy, np.round(noisy)) and noisy.min() >= 0
    residual = sim.noisy - sim.clean
    assert abs(residual.mean()) < 0.15 and residual.var() == pytest.approx(4.0, rel=0.1)  # variance = mean
    with pytest.raises(IcetideError, match="positive number of counts"):
        simulate_tilt_series(volume, [0.0], dose_per_px=0.0)
