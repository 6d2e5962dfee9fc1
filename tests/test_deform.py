import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from icetide.deform import (
    smoothness_penalty,
    Deformations,
    deform_coords,
    deform_grid,
    deformation_penalty,
    gauge_shifts,
    local_displacement,
    local_displacement_grid,
    remove_gauge,
    unwarp_images,
    warp_images,
)
from icetide.classical import align_series
from icetide.geometry import detector_grid


def _smooth_images(m, ny, nx, seed=0):
    rng = np.random.default_rng(seed)
    return torch.tensor(gaussian_filter(rng.standard_normal((m, ny, nx)), (0, 4, 4)), dtype=torch.float32)


def test_pure_shift_translates_content_by_tau():
    ny, nx = 21, 31
    img = torch.zeros(1, ny, nx)
    img[0, 10, 15] = 1.0
    out = warp_images(img, torch.tensor([[3.0, 2.0]]), torch.zeros(1), None)
    assert np.unravel_index(out[0].argmax().item(), (ny, nx)) == (12, 18)


def test_rotation_turns_content_by_minus_alpha():
    # observed(x) = ideal(R(alpha) x): a feature at ideal (u, 0) appears at R(-alpha)(u, 0)
    ny = nx = 41
    img = torch.zeros(1, ny, nx)
    img[0, 20, 30] = 1.0  # u = 10, v = 0
    out = warp_images(img, torch.zeros(1, 2), torch.tensor([math.pi / 2]), None)
    r, c = np.unravel_index(out[0].argmax().item(), (ny, nx))
    # R(-90 deg) (10, 0) = (0, -10) -> column 20, row 10
    assert (r, c) == (10, 20)


def test_local_field_reproduces_control_values_at_control_points():
    ny, nx = 13, 25
    local = torch.randn(2, 2, 4, 5)
    v = torch.linspace(-(ny - 1) / 2, (ny - 1) / 2, 4)
    u = torch.linspace(-(nx - 1) / 2, (nx - 1) / 2, 5)
    vv, uu = torch.meshgrid(v, u, indexing="ij")
    for mode in ("bilinear", "bicubic"):
        phi = local_displacement(local, uu, vv, (ny, nx), mode)
        assert torch.allclose(phi.permute(0, 3, 1, 2), local, atol=1e-5)


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
@pytest.mark.parametrize("controls", [(5, 5), (4, 7), (2, 3)])
def test_separable_local_field_equals_grid_sample(mode, controls):
    """On a grid of points the field is two matrix products per tilt: the values and the gradients of
    ``grid_sample``, at pixel centres (a band of rows too), points off the pixels and points beyond the
    detector (border padding, bicubic taps clamped to the edge)."""
    ny, nx = 13, 20
    torch.manual_seed(0)
    local = torch.randn(3, 2, *controls, dtype=torch.float64, requires_grad=True)
    f64 = dict(dtype=torch.float64)
    u_sets = [torch.arange(nx, **f64) - (nx - 1) / 2, torch.linspace(-14.3, 12.7, 17, **f64)]
    v_sets = [(torch.arange(ny, **f64) - (ny - 1) / 2)[3:9], torch.linspace(-8.9, 7.1, 11, **f64)]
    for u, v in zip(u_sets, v_sets):
        vv, uu = torch.meshgrid(v, u, indexing="ij")
        expected = local_displacement(local, uu, vv, (ny, nx), mode)
        got = local_displacement_grid(local, u, v, (ny, nx), mode)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
        g = torch.randn_like(got)
        (grad_got,) = torch.autograd.grad(got, local, g)
        (grad_expected,) = torch.autograd.grad(expected, local, g)
        torch.testing.assert_close(grad_got, grad_expected, rtol=0, atol=1e-12)
    shifts, angles = torch.randn(3, 2, dtype=torch.float64), torch.randn(3, dtype=torch.float64) * 0.1
    vv, uu = torch.meshgrid(v_sets[0], u_sets[0], indexing="ij")
    torch.testing.assert_close(
        deform_grid(u_sets[0], v_sets[0], shifts, angles, local, (ny, nx), mode),
        deform_coords(uu, vv, shifts, angles, local, (ny, nx), mode), rtol=0, atol=1e-12,
    )
    with pytest.raises(ValueError, match="interpolation must be"):
        local_displacement_grid(local, u, v, (ny, nx), "nearest")


def test_deform_coords_composition_order():
    # x' = R(alpha)(x + phi) - tau with a constant field phi = (1, 0)
    ny, nx = 9, 9
    local = torch.zeros(1, 2, 3, 3)
    local[:, 0] = 1.0
    u, v = detector_grid(ny, nx)
    out = deform_coords(u, v, torch.tensor([[0.5, -0.25]]), torch.tensor([math.pi / 2]), local, (ny, nx))
    # pixel (u, v) = (0, 0): x + phi = (1, 0); R(90)(1, 0) = (0, 1); minus tau -> (-0.5, 1.25)
    assert torch.allclose(out[0, 4, 4], torch.tensor([-0.5, 1.25]), atol=1e-6)


def test_unwarp_inverts_warp():
    img = _smooth_images(3, 60, 70)
    shifts = torch.tensor([[2.0, -1.5], [0.5, 0.0], [-3.0, 1.0]])
    angles = torch.tensor([0.01, -0.02, 0.0])
    local = torch.randn(3, 2, 5, 5, generator=torch.Generator().manual_seed(1)) * 0.8
    back = unwarp_images(warp_images(img, shifts, angles, local), shifts, angles, local)
    err = (back - img)[:, 10:-10, 10:-10].abs().max()
    assert err < 0.02 * img.abs().max()


def test_unwarp_fills_outside_with_image_mean():
    img = _smooth_images(1, 20, 20) + 5.0
    out = unwarp_images(img, torch.tensor([[15.0, 0.0]]), torch.zeros(1), None)
    assert torch.allclose(out[0, :, -3:], img.mean().expand(20, 3), atol=1e-5)


def test_penalty_terms():
    shifts = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    angles = torch.tensor([0.2, -0.4])
    local = torch.zeros(2, 2, 4, 4)
    local[0, 1] = 2.0  # constant field of magnitude 2 on tilt 0 -> RMS 2, mean over tilts 1
    p = deformation_penalty(shifts, angles, local, (1.0, 0.0, 0.0), (16, 16))
    assert math.isclose(p.item(), 0.3, rel_tol=1e-6)
    p = deformation_penalty(shifts, angles, local, (0.0, 1.0, 0.0), (16, 16))
    assert math.isclose(p.item(), 2.5, rel_tol=1e-6)
    p = deformation_penalty(shifts, angles, local, (0.0, 0.0, 1.0), (16, 16))
    assert math.isclose(p.item(), 1.0, rel_tol=1e-5)


def test_gauge_split_recovers_translation():
    tilts = np.linspace(-60, 60, 31)
    rng = np.random.default_rng(0)
    residual_true = rng.normal(0, 1, (31, 2))
    residual_true, _ = remove_gauge(residual_true, tilts)
    shifts = residual_true + gauge_shifts([2.0, -1.0, 3.0], tilts)
    residual, translation = remove_gauge(shifts, tilts)
    assert np.allclose(translation, [2.0, -1.0, 3.0])
    assert np.allclose(residual, residual_true)


def test_gauge_shift_equals_moving_the_volume():
    # a point at p seen through gauge shifts of d is the point p + d seen without shifts
    from icetide.geometry import project_points

    tilts = np.array([-40.0, 10.0, 55.0])
    d = np.array([1.5, -2.0, 4.0])
    p = torch.tensor([3.0, 1.0, -2.0], dtype=torch.float64)
    g = gauge_shifts(d, tilts)
    for m, t in enumerate(np.deg2rad(tilts)):
        uv = project_points(p, torch.tensor(t, dtype=torch.float64)).numpy()
        uv_moved = project_points(p + torch.tensor(d), torch.tensor(t, dtype=torch.float64)).numpy()
        assert np.allclose(uv + g[m], uv_moved)


def test_deformations_validation_and_subset():
    d = Deformations.identity([-10.0, 0.0, 10.0], (8, 9), grid=(3, 4))
    assert d.local_px.shape == (3, 2, 3, 4)
    s = d.subset(np.array([True, False, True]))
    assert s.n_tilts == 2 and s.detector_shape == (8, 9)
    with pytest.raises(ValueError):
        Deformations([0.0], [[0, 0]], [0.0], np.zeros((1, 2, 1, 3)), (4, 4))


def test_warp_is_differentiable_in_every_parameter():
    img = _smooth_images(2, 16, 16)
    shifts = torch.zeros(2, 2, requires_grad=True)
    angles = torch.zeros(2, requires_grad=True)
    local = torch.zeros(2, 2, 3, 3, requires_grad=True)
    warp_images(img, shifts, angles, local).square().sum().backward()
    for p in (shifts, angles, local):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_smoothness_penalty_is_the_mean_squared_step_and_ignores_a_common_shift():
    shifts = torch.tensor([[0.0, 0.0], [3.0, 4.0], [3.0, 4.0]], dtype=torch.float64)
    assert float(smoothness_penalty(shifts)) == pytest.approx((25.0 + 0.0) / 2)
    assert float(smoothness_penalty(shifts + torch.tensor([7.0, -2.0], dtype=torch.float64))) == pytest.approx(12.5)
    assert float(smoothness_penalty(shifts[:1])) == 0.0
    assert torch.autograd.gradcheck(smoothness_penalty, (shifts.requires_grad_(),))


def test_scaled_deformations_keep_rotations_and_scale_pixels():
    d = Deformations.identity([0.0, 30.0], (10, 12), (3, 3))
    d.shifts_px = np.array([[1.0, -2.0], [0.5, 0.25]])
    d.angles_deg = np.array([4.3, 4.0])
    d.local_px[:] = 0.5
    up = d.scaled(2, (20, 24))
    np.testing.assert_array_equal(up.shifts_px, 2 * d.shifts_px)
    np.testing.assert_array_equal(up.angles_deg, d.angles_deg)
    np.testing.assert_array_equal(up.local_px, 2 * d.local_px)
    assert up.detector_shape == (20, 24)


@pytest.mark.parametrize("k", [1, -1, 2])
def test_quarter_turned_deformations_align_the_turned_images_as_the_originals(k):
    rng = np.random.default_rng(0)
    images = gaussian_filter(rng.normal(size=(3, 40, 40)), (0, 2, 2)).astype(np.float32)
    d = Deformations(np.array([-30.0, 0.0, 30.0]), rng.normal(size=(3, 2)) * 2, -85 + rng.normal(size=3),
                     rng.normal(size=(3, 2, 3, 4)) * 1.5, (40, 40))
    turned = d.quarter_turned(k)
    assert turned.local_px.shape == ((3, 2, 4, 3) if k % 2 else (3, 2, 3, 4))
    np.testing.assert_allclose(turned.angles_deg, d.angles_deg + 90 * k)
    turned_images = torch.tensor(np.ascontiguousarray(np.rot90(images, k, axes=(1, 2))))
    np.testing.assert_allclose(align_series(turned_images, turned).numpy(),
                               align_series(torch.tensor(images), d).numpy(), atol=1e-5)
    back = turned.quarter_turned(-k)
    np.testing.assert_allclose((back.angles_deg - d.angles_deg + 180) % 360 - 180, 0, atol=1e-9)
    np.testing.assert_array_equal(back.local_px, d.local_px)


def test_quarter_turned_deformations_swap_a_non_square_detector():
    d = Deformations.identity([0.0, 10.0], (20, 30), grid=(2, 5))
    turned = d.quarter_turned(1)
    assert turned.detector_shape == (30, 20) and turned.local_px.shape == (2, 2, 5, 2)
    assert d.quarter_turned(2).detector_shape == (20, 30)
