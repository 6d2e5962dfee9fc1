"""Metrics: CC, FSC in physical frequency, sub-voxel registration, deformation errors after the gauge."""

import json
import math

import numpy as np
import pytest
import scipy.fft
import torch
from scipy import ndimage

from icetide.deform import Deformations, gauge_shifts, local_displacement
from icetide.errors import IcetideError
from icetide.metrics import (
    apply_translation,
    cc,
    deformation_errors,
    edge_taper,
    evaluate_reconstruction,
    fsc,
    register_translation,
    slab_mask,
)


def _blobs(shape, seed=0, margin=5):
    """Smooth random content that fades to zero ``margin`` voxels from the faces (not periodic)."""
    rng = np.random.default_rng(seed)
    volume = ndimage.gaussian_filter(rng.normal(size=shape), 1.5)
    window = np.zeros(shape)
    window[tuple(slice(margin, n - margin) for n in shape)] = 1
    return (volume * ndimage.gaussian_filter(window, 1.5)).astype(np.float32)


def test_cc_of_self_and_of_scaled_offset_copy_is_one():
    v = np.random.default_rng(0).normal(size=(6, 7, 8))
    assert cc(v, v) == pytest.approx(1.0, abs=1e-12)
    assert cc(v, 3.5 * v - 2.0) == pytest.approx(1.0, abs=1e-12)
    assert cc(v, -v) == pytest.approx(-1.0, abs=1e-12)


def test_cc_over_a_mask_ignores_the_rest():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(8, 6, 6))
    b = a.copy()
    b[:4] = rng.normal(size=(4, 6, 6))
    mask = np.zeros(a.shape, dtype=bool)
    mask[4:] = True
    assert cc(a, b, mask) == pytest.approx(1.0, abs=1e-12)
    assert cc(a, b) < 0.9
    with pytest.raises(IcetideError, match="shape"):
        cc(a, b, mask[:4])


@pytest.mark.parametrize("shape", [(16, 16, 16), (12, 20, 28)])
def test_fsc_of_identical_volumes_is_one_in_every_shell(shape):
    v = np.random.default_rng(2).normal(size=shape)
    result = fsc(v, v)
    n_shells = max(shape) // 2
    assert result["fsc"].shape == result["frequency"].shape == result["n_voxels"].shape == (n_shells,)
    np.testing.assert_allclose(result["fsc"], 1.0, atol=1e-5)
    np.testing.assert_allclose(result["frequency"], np.arange(1, n_shells + 1) / max(shape))
    assert result["frequency"][-1] == pytest.approx(0.5)
    assert np.all(result["n_voxels"] > 0)
    # every Fourier voxel except DC lies in a shell, up to the corners beyond Nyquist
    assert result["n_voxels"].sum() < math.prod(shape)
    for threshold in ("0.5", "0.143"):
        entry = result["resolution"][threshold]
        assert entry["nyquist_limited"] and entry["voxels"] is None and entry["angstrom"] is None


def test_fsc_of_independent_noise_is_near_zero():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(2, 32, 32, 32))
    result = fsc(a, b)
    # Hermitian symmetry: a shell of N Fourier voxels holds N/2 independent values, std ~ sqrt(2/N); 4 sigma
    assert np.all(np.abs(result["fsc"]) < 4 * np.sqrt(2 / result["n_voxels"]))
    assert abs(result["fsc"].mean()) < 0.05


@pytest.mark.parametrize("shape", [(32, 32, 32), (20, 32, 64)])
def test_fsc_against_noisy_gaussian_low_pass_crosses_where_predicted(shape):
    """b = lowpass(a) + noise: FSC(f) = H(f) / sqrt(H(f)^2 + s^2) with H(f) = exp(-2 pi^2 sigma^2 f^2).

    (A low-passed copy alone has FSC 1: a positive filter is a per-shell scale.) Non-cubic volumes must give
    the same crossing, which checks that shells are in physical frequency. Tolerances: 0.015 and 0.025
    cycles/voxel (the spread over seeds is about half that).
    """
    sigma, s = 1.5, 0.2
    expected_05 = math.sqrt(math.log(math.sqrt(3) / s) / (2 * math.pi**2 * sigma**2))
    h_0143 = 0.143 * s / math.sqrt(1 - 0.143**2)
    expected_0143 = math.sqrt(math.log(1 / h_0143) / (2 * math.pi**2 * sigma**2))
    rng = np.random.default_rng(4)
    a = rng.normal(size=shape)
    b = scipy.fft.ifftn(ndimage.fourier_gaussian(scipy.fft.fftn(a), sigma)).real + s * rng.normal(size=shape)
    result = fsc(a, b, voxel_size_A=8.0)
    r05, r0143 = result["resolution"]["0.5"], result["resolution"]["0.143"]
    assert r05["frequency"] == pytest.approx(expected_05, abs=0.015)
    assert r0143["frequency"] == pytest.approx(expected_0143, abs=0.025)
    assert r05["voxels"] == pytest.approx(1 / r05["frequency"])
    assert r05["angstrom"] == pytest.approx(8.0 * r05["voxels"])
    assert not r05["nyquist_limited"]


@pytest.mark.parametrize("axis", [0, 2])
def test_fsc_puts_a_plane_wave_in_the_shell_of_its_physical_frequency(axis):
    shape = (16, 24, 32)
    n = shape[axis]
    coords = np.arange(n).reshape([-1 if a == axis else 1 for a in range(3)])
    wave = np.broadcast_to(np.cos(2 * np.pi * (n // 4) * coords / n), shape)  # 0.25 cycles/voxel
    rng = np.random.default_rng(5)
    result = fsc(10 * wave + rng.normal(size=shape), 10 * wave + rng.normal(size=shape))
    assert result["frequency"][np.argmax(result["fsc"])] == pytest.approx(0.25)


def test_fsc_shell_count_and_mask():
    rng = np.random.default_rng(6)
    a, b = rng.normal(size=(2, 8, 12, 16))
    assert fsc(a, b, n_shells=4)["frequency"].tolist() == [0.125, 0.25, 0.375, 0.5]
    mask = np.zeros(a.shape, dtype=bool)
    mask[2:6] = True
    masked = fsc(a, b, mask=mask)["fsc"]
    np.testing.assert_allclose(masked, fsc(a * mask, b * mask)["fsc"])
    with pytest.raises(IcetideError, match="shape"):
        fsc(a, b[:4])


@pytest.mark.parametrize("shape", [(24, 32, 28), (16, 40, 48)])
def test_registration_recovers_a_known_subvoxel_shift(shape):
    truth = _blobs(shape, seed=7)
    shift = np.array([1.3, -2.6, 0.4])
    moved = ndimage.shift(truth, shift, order=3, mode="constant")  # spline shift: independent of ours
    estimate = register_translation(moved, truth)
    np.testing.assert_allclose(estimate, -shift, atol=0.1)
    off_grid = np.array([-0.77, 1.33, 2.05])
    np.testing.assert_allclose(
        register_translation(ndimage.shift(truth, off_grid, order=3), truth), -off_grid, atol=0.1
    )


def test_apply_translation_moves_content_by_the_shift():
    v = np.zeros((8, 10, 12), dtype=np.float32)
    v[2, 3, 4] = 1.0
    moved = apply_translation(v, (1, 2, -3))
    assert moved.dtype == np.float32 and moved.shape == v.shape
    assert np.unravel_index(np.argmax(moved), v.shape) == (3, 5, 1)
    assert moved[3, 5, 1] == pytest.approx(1.0, abs=1e-5)
    smooth = _blobs((16, 20, 24), seed=8)
    back = apply_translation(apply_translation(smooth, (0.3, -1.7, 2.2)), (-0.3, 1.7, -2.2))
    # only the Nyquist planes of the even axes are lost (a real shift of them is not defined)
    np.testing.assert_allclose(back, smooth, atol=1e-3 * np.abs(smooth).max())


def test_evaluate_reconstruction_registers_then_scores():
    truth = _blobs((20, 28, 32), seed=9)
    rng = np.random.default_rng(9)
    recon = ndimage.shift(truth, (0.6, -1.2, 1.8), order=3) + 0.05 * truth.std() * rng.normal(size=truth.shape)
    result = evaluate_reconstruction(recon, truth, voxel_size_A=5.0)
    json.dumps(result)  # JSON-friendly as is
    np.testing.assert_allclose(result["shift_zyx_vox"], [-0.6, 1.2, -1.8], atol=0.1)
    assert result["cc"] > 0.99 and result["registered"] and not result["masked"]
    assert set(result["fsc"]) >= {"frequency", "fsc", "n_voxels", "resolution"}
    r05 = result["fsc"]["resolution"]["0.5"]
    assert 2 < r05["voxels"] < 10 and r05["angstrom"] == pytest.approx(5.0 * r05["voxels"])
    raw = evaluate_reconstruction(recon, truth, register=False)
    assert raw["shift_zyx_vox"] == [0.0, 0.0, 0.0] and raw["cc"] < result["cc"] - 0.1
    masked = evaluate_reconstruction(recon, truth, mask=slab_mask(truth.shape, 10), taper_vox=3)
    assert masked["masked"] and masked["taper_vox"] == 3.0 and masked["cc"] > 0.98
    with pytest.raises(IcetideError, match="shape"):
        evaluate_reconstruction(recon[:-1], truth)


def test_edge_taper_and_slab_mask():
    taper = edge_taper((10, 12, 16), 4)
    assert taper.shape == (10, 12, 16) and taper.min() > 0 and taper.max() == pytest.approx(1.0)
    profile = taper[5, 6, :]
    assert np.all(np.diff(profile[:8]) >= 0) and profile[0] < 0.05 and np.all(profile[4:12] == 1)
    np.testing.assert_array_equal(edge_taper((4, 5, 6), 0), 1.0)
    mask = slab_mask((10, 3, 4), 4)
    assert mask.dtype == bool and mask[:, 0, 0].tolist() == [False] * 3 + [True] * 4 + [False] * 3
    with pytest.raises(IcetideError):
        slab_mask((10, 3, 4), 0)


# ---- deformation errors -------------------------------------------------------------------------------------

ANGLES = np.arange(-50.0, 51.0, 10.0)  # 11 tilts
DETECTOR = (40, 48)


def _truth(seed=0) -> Deformations:
    rng = np.random.default_rng(seed)
    m = len(ANGLES)
    local = np.zeros((m, 2, 5, 5))
    local[:, :, 1:-1, 1:-1] = rng.uniform(-2, 2, (m, 2, 3, 3))  # border ring zero, as simulated
    return Deformations(ANGLES, rng.uniform(-6, 6, (m, 2)), rng.uniform(-0.01, 0.01, m), local, DETECTOR)


def _with(d: Deformations, shifts=None, angles=None, local=None, interpolation=None) -> Deformations:
    return Deformations(
        d.tilt_angles_deg,
        d.shifts_px if shifts is None else shifts,
        d.angles_deg if angles is None else angles,
        d.local_px if local is None else local,
        d.detector_shape,
        interpolation or d.local_interpolation,
    )


def test_identical_deformations_have_zero_error():
    d = _truth()
    e = deformation_errors(d, _with(d))
    assert e["shift_rms_px"] == pytest.approx(0, abs=1e-12)
    assert e["rotation_mae_deg"] == 0 and e["local_mean_error_px"] == 0
    assert e["local_true_mean_px"] > 0.1
    assert e["shift_error_per_tilt_px"].shape == e["rotation_error_per_tilt_deg"].shape == (len(ANGLES),)


def test_a_gauge_shaped_shift_difference_is_no_error():
    d = _truth()
    translation = np.array([1.5, -2.0, 3.0])
    e = deformation_errors(d, _with(d, shifts=d.shifts_px + gauge_shifts(translation, ANGLES)))
    assert e["shift_rms_px"] < 1e-9
    np.testing.assert_allclose(e["gauge_translation_xyz_vox"], translation, atol=1e-9)


def test_a_known_perturbation_gives_its_rms_and_mae():
    d = _truth()
    m = len(ANGLES)
    # u part: a random vector orthogonal to the gauge directions cos(theta), sin(theta); v part: zero mean
    basis = np.stack([np.cos(np.deg2rad(ANGLES)), np.sin(np.deg2rad(ANGLES))], -1)
    q, _ = np.linalg.qr(basis)
    rng = np.random.default_rng(10)
    du = rng.normal(size=m)
    du -= q @ (q.T @ du)
    dv = rng.normal(size=m)
    dv -= dv.mean()
    perturbation = np.stack([du, dv], -1)
    rotation = rng.normal(0, 0.05, m)
    e = deformation_errors(d, _with(d, shifts=d.shifts_px + perturbation, angles=d.angles_deg + rotation))
    assert e["shift_rms_px"] == pytest.approx(np.sqrt(np.mean(du**2 + dv**2)), rel=1e-9)
    np.testing.assert_allclose(e["shift_error_per_tilt_px"], np.hypot(du, dv), atol=1e-9)
    assert e["rotation_mae_deg"] == pytest.approx(np.mean(np.abs(rotation)))
    np.testing.assert_allclose(e["rotation_error_per_tilt_deg"], rotation, atol=1e-12)
    np.testing.assert_allclose(e["gauge_translation_xyz_vox"], 0, atol=1e-9)


def test_local_error_between_grids_of_different_sizes():
    d = _truth()
    ny, nx = DETECTOR
    v, u = torch.meshgrid(
        torch.linspace(-(ny - 1) / 2, (ny - 1) / 2, 10, dtype=torch.float64),
        torch.linspace(-(nx - 1) / 2, (nx - 1) / 2, 10, dtype=torch.float64),
        indexing="ij",
    )
    resampled = local_displacement(torch.as_tensor(d.local_px), u, v, DETECTOR, "bicubic")
    fine = _with(d, local=resampled.permute(0, 3, 1, 2).numpy())
    e = deformation_errors(d, fine)
    assert e["local_mean_error_px"] < 0.1 * e["local_true_mean_px"]
    zero = deformation_errors(d, _with(d, local=np.zeros((len(ANGLES), 2, 10, 10))))
    assert zero["local_mean_error_px"] == pytest.approx(zero["local_true_mean_px"])
    offset = d.local_px + np.array([0.3, -0.4])[None, :, None, None]  # interpolation keeps constants
    assert deformation_errors(d, _with(d, local=offset))["local_mean_error_px"] == pytest.approx(0.5)


def test_deformations_of_different_tilts_are_refused():
    d = _truth()
    with pytest.raises(IcetideError, match="tilts"):
        deformation_errors(d, d.subset(np.arange(5)))
    other = Deformations(ANGLES + 1, d.shifts_px, d.angles_deg, d.local_px, DETECTOR)
    with pytest.raises(IcetideError, match="tilt angles"):
        deformation_errors(d, other)


def test_fsc_resolution_passes_over_shells_of_a_few_fourier_voxels():
    # A volume much longer along x: the first shell holds only the coefficient (0, 0, 1) and its twin. Flipped in
    # one volume, it anticorrelates that shell, which says nothing about the resolution.
    rng = np.random.default_rng(0)
    a = rng.standard_normal((16, 24, 40)).astype(np.float32)
    spectrum = np.fft.rfftn(a)
    spectrum[0, 0, 1] *= -1
    b = np.fft.irfftn(spectrum, a.shape, axes=(0, 1, 2)).astype(np.float32)
    result = fsc(a, b)
    assert result["n_voxels"][0] == 2 and result["fsc"][0] < 0 and np.all(result["fsc"][1:] > 0.99)
    assert result["resolution"]["0.143"]["nyquist_limited"]
