"""Explicit-grid projector/backprojector, FBP, SIRT and alignment of deformed series (icetide.classical)."""

import math

import numpy as np
import pytest
import torch

from icetide import classical
from icetide.deform import Deformations, warp_images
from icetide.errors import IcetideError
from icetide.geometry import project_points
from icetide.classical import (
    align_series,
    angular_weights,
    backproject,
    fbp,
    fbp_deformed,
    project,
    ramp_filter,
    sirt,
)

skt = pytest.importorskip("skimage.transform")

ANGLES_RAD = torch.tensor([-1.45, -1.0, -0.6, 0.0, 0.3, math.pi / 4, 1.2, 2.0])


def _gaussian_image(n: int) -> np.ndarray:
    """A smooth 2-D phantom ``(n, n)`` (skimage orientation: rows, columns) inside the inscribed circle."""
    r = np.arange(n) - n // 2
    rows, cols = np.meshgrid(r, r, indexing="ij")

    def blob(r0, c0, sigma, amp):
        return amp * np.exp(-((rows - r0) ** 2 + (cols - c0) ** 2) / (2 * sigma**2))

    image = blob(-8, 5, 5, 1.0) + blob(10, -6, 3.5, 0.7) + blob(2, 12, 2.5, -0.4)
    return image * _inside(n, margin=0)  # skimage's radon wants zero outside the circle (the tails are < 1e-5)


def _to_volume(image: np.ndarray) -> torch.Tensor:
    """skimage image -> icetide slice ``(nz, 1, nx)`` (the mapping pinned by test_skimage_geometry_mapping)."""
    return torch.tensor(image[::-1].copy(), dtype=torch.float32)[:, None, :]


def _to_image(volume: torch.Tensor) -> np.ndarray:
    return volume[:, 0, :].numpy()[::-1]


def _inside(n: int, margin: int = 2) -> np.ndarray:
    r = np.arange(n) - n // 2
    rows, cols = np.meshgrid(r, r, indexing="ij")
    return rows**2 + cols**2 <= (n // 2 - margin) ** 2


def _corr(a, b) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


# --- projector ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_u", [17, 11, 26])
def test_backproject_is_the_exact_adjoint_float64(n_u):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, 17, generator=gen, dtype=torch.float64)
    y = torch.randn(len(ANGLES_RAD), 3, n_u, generator=gen, dtype=torch.float64)
    lhs = (project(x, ANGLES_RAD, n_u) * y).sum()
    rhs = (x * backproject(y, ANGLES_RAD, 7, 17)).sum()
    assert float(lhs) == pytest.approx(float(rhs), rel=1e-12)


def test_backproject_is_the_adjoint_float32():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(12, 5, 30, generator=gen)
    y = torch.randn(len(ANGLES_RAD), 5, 30, generator=gen)
    lhs = (project(x, ANGLES_RAD).double() * y.double()).sum()
    rhs = (x.double() * backproject(y, ANGLES_RAD, 12, 30).double()).sum()
    assert float(lhs) == pytest.approx(float(rhs), rel=1e-5)


def test_shapes_and_dtypes():
    vol = torch.rand(6, 4, 10)
    assert project(vol, ANGLES_RAD[:3]).shape == (3, 4, 10)
    assert project(vol, ANGLES_RAD[:3], 14).shape == (3, 4, 14)
    assert backproject(torch.rand(3, 4, 14), ANGLES_RAD[:3], 6, 10).shape == (6, 4, 10)
    half = project(vol.to(torch.bfloat16), ANGLES_RAD[:3])
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), project(vol.to(torch.bfloat16).float(), ANGLES_RAD[:3]), rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError):
        backproject(torch.rand(2, 4, 10), ANGLES_RAD[:3], 6, 10)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(8)
    vol = torch.randn(6, 5, 12, generator=gen, requires_grad=True)
    proj = project(vol, ANGLES_RAD)
    proj.square().sum().backward()
    vol_cuda = vol.detach().cuda().requires_grad_(True)
    proj_cuda = project(vol_cuda, ANGLES_RAD.cuda())
    proj_cuda.square().sum().backward()
    torch.testing.assert_close(proj_cuda.cpu(), proj, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(vol_cuda.grad.cpu(), vol.grad, rtol=1e-4, atol=1e-3)
    angles = np.arange(-60.0, 61.0, 20.0)
    series = torch.rand(len(angles), 5, 12, generator=gen)
    torch.testing.assert_close(fbp(series.cuda(), angles, 6).cpu(), fbp(series, angles, 6), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sirt(series.cuda(), angles, 6, 3).cpu(), sirt(series, angles, 6, 3), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("deg", [0.0, 20.0, -33.0, 45.0])
def test_constant_slab_projects_to_thickness_over_cos_exactly_up_to_45_degrees(deg):
    t = 12
    p = project(torch.ones(t, 2, 80), torch.tensor([math.radians(deg)]))[0]
    centre = p[:, 30:50]  # away from the lateral edges of the box
    torch.testing.assert_close(centre, torch.full_like(centre, t / math.cos(math.radians(deg))), rtol=1e-5, atol=0)


@pytest.mark.parametrize("deg", [50.0, 60.0, -70.0])
def test_constant_slab_projects_to_thickness_over_cos_within_one_percent_beyond_45_degrees(deg):
    # Beyond 45 degrees columns are stepped in whole voxels: ripple of about cos / (t tan) relative.
    t = 12
    p = project(torch.ones(t, 1, 120), torch.tensor([math.radians(deg)]))[0, 0, 50:70]
    expected = t / math.cos(math.radians(deg))
    assert torch.allclose(p, torch.full_like(p, expected), rtol=0.01, atol=0)
    assert float(p.mean()) == pytest.approx(expected, rel=2e-3)


def test_single_voxel_has_unit_mass_at_the_geometry_position_at_every_angle():
    nz, nx, n_u = 9, 15, 41
    angles = torch.linspace(-89.0, 89.0, 25).deg2rad()
    for k, i in [(2, 11), (4, 7), (8, 0)]:
        vol = torch.zeros(nz, 1, nx, dtype=torch.float64)
        vol[k, 0, i] = 1.0
        p = project(vol, angles, n_u)[:, 0, :]
        torch.testing.assert_close(p.sum(-1), torch.ones(len(angles), dtype=torch.float64), rtol=1e-12, atol=0)
        xyz = torch.tensor([i - (nx - 1) / 2, 0.0, k - (nz - 1) / 2], dtype=torch.float64)
        u_expected = project_points(xyz.expand(len(angles), 3), angles.double())[:, 0]
        u = torch.arange(n_u, dtype=torch.float64) - (n_u - 1) / 2
        centroid = (p * u).sum(-1)
        assert (centroid - u_expected).abs().max() < 0.5


def test_project_gradient_is_backproject_and_passes_gradcheck():
    gen = torch.Generator().manual_seed(2)
    vol = torch.randn(4, 2, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    theta = torch.tensor([-0.9, 0.2, 1.1], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda v: project(v, theta, 7), (vol,))
    proj = torch.randn(3, 2, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p: backproject(p, theta, 4, 6), (proj,))
    weights = torch.randn(3, 2, 7, generator=gen, dtype=torch.float64)
    (project(vol, theta, 7) * weights).sum().backward()
    torch.testing.assert_close(vol.grad, backproject(weights, theta, 4, 6))


def test_chunking_over_tilts_gives_the_same_result(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    vol = torch.randn(5, 3, 8, generator=gen)
    proj = torch.randn(len(ANGLES_RAD), 3, 8, generator=gen)
    whole = project(vol, ANGLES_RAD), backproject(proj, ANGLES_RAD, 5, 8)
    monkeypatch.setattr(classical, "CHUNK_VOXEL_TILTS", 3 * 5 * 8)  # 3 tilts per chunk
    classical._MATRIX_CACHE.clear()  # else the matrices built above would be reused
    assert len(classical._tilt_chunks(len(ANGLES_RAD), 5 * 8)) == 3
    torch.testing.assert_close(project(vol, ANGLES_RAD), whole[0])
    torch.testing.assert_close(backproject(proj, ANGLES_RAD, 5, 8), whole[1])


def test_projector_is_cached_by_geometry_and_takes_tilts_in_any_order():
    gen = torch.Generator().manual_seed(4)
    vol = torch.randn(5, 3, 8, generator=gen, dtype=torch.float64)
    proj = torch.randn(len(ANGLES_RAD), 3, 8, generator=gen, dtype=torch.float64)
    classical._MATRIX_CACHE.clear()
    expected = project(vol, ANGLES_RAD), backproject(proj, ANGLES_RAD, 5, 8)
    assert len(classical._MATRIX_CACHE) == 1  # one geometry: project and backproject share it
    order = torch.randperm(len(ANGLES_RAD), generator=gen)
    shuffled = torch.as_tensor(ANGLES_RAD)[order]
    torch.testing.assert_close(project(vol, shuffled), expected[0][order])
    torch.testing.assert_close(backproject(proj[order], shuffled, 5, 8), expected[1])
    assert len(classical._MATRIX_CACHE) == 1  # the same tilts in another order: the same matrices
    for nx in range(9, 9 + classical.MATRIX_CACHE_SIZE + 2):
        project(torch.zeros(5, 1, nx, dtype=torch.float64), ANGLES_RAD)
    assert len(classical._MATRIX_CACHE) == classical.MATRIX_CACHE_SIZE


# --- skimage cross-checks (2-D slices, ny = 1) ---------------------------------------------------------------
#
# Mapping: skimage.transform.radon sums the image rotated by theta over its rows, so detector position
# u = X cos(theta) - Y sin(theta) with X = column - n//2, Y = row - n//2. icetide has u = x cos + z sin. Hence
# x = column and z = -(row - n//2): an icetide slice (nz, nx) is the skimage image flipped upside down
# (image[::-1]), with the same theta in degrees; the sinogram (n_u, M) is our (M, n_u). Centres agree for odd n.

N = 65
FULL_DEG = np.arange(0.0, 180.0, 1.0)


def test_skimage_geometry_mapping():
    point = np.zeros((N, N))
    point[20, 45] = 1.0  # off-centre in both axes, so a sign or axis error moves the peak
    for deg in (30.0, -55.0, 120.0):
        theirs = skt.radon(point, [deg], circle=True)[:, 0]
        ours = project(_to_volume(point).double(), torch.tensor([math.radians(deg)]))[0, 0].numpy()
        idx = np.arange(N)
        assert (ours * idx).sum() / ours.sum() == pytest.approx((theirs * idx).sum() / theirs.sum(), abs=0.1)


def test_projection_matches_skimage_radon():
    image = _gaussian_image(N)
    ours = project(_to_volume(image), torch.tensor(np.deg2rad(FULL_DEG)))[:, 0, :].numpy()
    theirs = skt.radon(image, FULL_DEG, circle=True).T
    assert _corr(ours, theirs) > 0.999
    assert np.abs(ours - theirs).max() < 0.01 * theirs.max()
    assert ours.sum() / theirs.sum() == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("name", ["ramp", "hann", "shepp-logan"])
def test_fbp_matches_skimage_iradon_over_full_range(name):
    image = _gaussian_image(N)
    inside = _inside(N)
    sinogram = project(_to_volume(image), torch.tensor(np.deg2rad(FULL_DEG)))
    ours = _to_image(fbp(sinogram, FULL_DEG, N, name))
    theirs = skt.iradon(skt.radon(image, FULL_DEG, circle=True), FULL_DEG, output_size=N, filter_name=name)
    assert _corr(ours[inside], theirs[inside]) > 0.999
    # Same amplitude: least-squares scale between the two within 1 %.
    scale = (ours[inside] * theirs[inside]).sum() / (theirs[inside] ** 2).sum()
    assert scale == pytest.approx(1.0, abs=0.01)


def test_fbp_over_full_range_recovers_the_phantom_values():
    image = _gaussian_image(N)
    inside = _inside(N)
    sinogram = project(_to_volume(image), torch.tensor(np.deg2rad(FULL_DEG)))
    ours = _to_image(fbp(sinogram, FULL_DEG, N))
    # Tolerance: 3 % of the phantom's peak (1.0) anywhere inside the circle; the mean error is far smaller.
    assert np.abs(ours - image)[inside].max() < 0.03
    assert np.abs(ours - image)[inside].mean() < 0.003


def test_fbp_over_limited_range_is_weighted_backprojection_with_the_coverage_scale():
    image = _gaussian_image(N)
    inside = _inside(N)
    limited = np.arange(-60.0, 61.0, 2.0)
    ours = _to_image(fbp(project(_to_volume(image), torch.tensor(np.deg2rad(limited))), limited, N))
    theirs = skt.iradon(skt.radon(image, limited, circle=True), limited, output_size=N)
    assert _corr(ours[inside], theirs[inside]) > 0.999
    # skimage weighs every angle pi / M regardless of coverage; we weigh 2 degrees each (122 degrees in all).
    scale = (ours[inside] * theirs[inside]).sum() / (theirs[inside] ** 2).sum()
    assert scale == pytest.approx(61 * 2.0 / 180.0, rel=0.01)


def test_sirt_converges_like_skimage_sart():
    n = 49
    image = _gaussian_image(n)
    inside = _inside(n)
    angles = np.arange(0.0, 180.0, 2.0)
    sinogram = project(_to_volume(image), torch.tensor(np.deg2rad(angles)))
    ours = _to_image(sirt(sinogram, angles, n, iterations=60))
    theirs_sino = skt.radon(image, angles, circle=True)
    theirs = skt.iradon_sart(theirs_sino, angles)
    theirs = skt.iradon_sart(theirs_sino, angles, image=theirs)
    assert _corr(ours[inside], theirs[inside]) > 0.999
    assert np.abs(ours - image)[inside].max() < 0.02
    assert np.abs(ours - theirs)[inside].max() < 0.03


# --- FBP and SIRT details -------------------------------------------------------------------------------------


def test_angular_weights():
    np.testing.assert_allclose(angular_weights(np.arange(-60, 61, 2.0)), np.full(61, np.deg2rad(2.0)))
    full = angular_weights(np.arange(-89.5, 90, 1.0))
    assert full.sum() == pytest.approx(np.pi)
    np.testing.assert_allclose(angular_weights([10.0, -20.0, 0.0, 40.0]), np.deg2rad([20.0, 20.0, 15.0, 30.0]))
    assert angular_weights([5.0])[0] == pytest.approx(np.pi)


def test_ramp_filter_impulse_response_is_the_kak_slaney_kernel():
    line = torch.zeros(2, 101)
    line[:, 50] = 1.0
    out = ramp_filter(line)
    expected = [-1 / (9 * np.pi**2), 0.0, -1 / np.pi**2, 0.25, -1 / np.pi**2, 0.0, -1 / (9 * np.pi**2)]
    np.testing.assert_allclose(out[0, 47:54].numpy(), expected, atol=1e-6)
    torch.testing.assert_close(ramp_filter(line.T.contiguous(), axis=0), out.T)


def test_apodised_filters_damp_high_frequencies():
    noise = torch.randn(4, 128, generator=torch.Generator().manual_seed(4))
    energy = {name: float(ramp_filter(noise, name).square().sum()) for name in ("ramp", "shepp-logan", "hann")}
    assert energy["ramp"] > energy["shepp-logan"] > energy["hann"] > 0
    with pytest.raises(IcetideError, match="unknown filter"):
        ramp_filter(noise, "cosine")


def test_fbp_and_sirt_validate_inputs():
    series = torch.rand(3, 4, 8)
    with pytest.raises(IcetideError, match="tilt angles"):
        fbp(series, [0.0, 10.0], 4)
    with pytest.raises(IcetideError, match="thickness"):
        sirt(series, [0.0, 10.0, 20.0], 0)
    with pytest.raises(IcetideError, match="iterations"):
        sirt(series, [0.0, 10.0, 20.0], 4, iterations=0)
    with pytest.raises(IcetideError, match="n_tilts"):
        fbp(torch.rand(4, 8), [0.0], 4)


def test_sirt_reduces_the_residual_and_honours_positivity_and_progress():
    gen = torch.Generator().manual_seed(5)
    angles = np.arange(-60.0, 61.0, 10.0)
    truth = torch.rand(6, 3, 16, generator=gen) - 0.3
    data = project(truth, torch.tensor(np.deg2rad(angles))) + 0.5 * torch.randn(len(angles), 3, 16, generator=gen)
    theta = torch.tensor(np.deg2rad(angles))
    residuals = [float((project(sirt(data, angles, 6, iterations=k), theta) - data).norm()) for k in (1, 5, 20)]
    assert residuals[0] > residuals[1] > residuals[2]
    calls = []
    out = sirt(data, angles, 6, iterations=4, positivity=True, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert float(out.min()) >= 0.0
    assert float(sirt(data, angles, 6, iterations=4).min()) < 0.0  # the clamp mattered


# --- deformed series ----------------------------------------------------------------------------------------


def _phantom_series(angles_deg):
    """A smooth 8 x 24 x 32 volume (two Gaussian blobs) and its projections ``(M, 24, 32)``."""
    z, y, x = torch.meshgrid(torch.arange(8.0) - 3.5, torch.arange(24.0) - 11.5, torch.arange(32.0) - 15.5, indexing="ij")
    vol = torch.exp(-((x - 4) ** 2 + (y + 3) ** 2 + z**2) / 18) + 0.6 * torch.exp(-((x + 5) ** 2 + (y - 4) ** 2 + (z - 1) ** 2) / 12)
    return vol, project(vol, torch.tensor(np.deg2rad(angles_deg)))


def test_align_series_undoes_shifts_and_rotations_and_fbp_deformed_uses_it():
    angles = np.arange(-45.0, 46.0, 15.0)
    _, ideal = _phantom_series(angles)
    m = len(angles)
    gen = np.random.default_rng(7)
    d = Deformations(angles, gen.uniform(-2, 2, (m, 2)), gen.uniform(-1, 1, m), np.zeros((m, 2, 3, 3)), (24, 32))
    observed = warp_images(ideal, **d.tensors(), interpolation=d.local_interpolation)
    aligned = align_series(observed, d)
    inner = (slice(None), slice(5, -5), slice(5, -5))
    # Warping then unwarping interpolates bilinearly twice (a slight blur) and the blobs are cut by the thin
    # slab (kinks in the tilted projections): a few percent at the peaks.
    assert (aligned - ideal)[inner].abs().max() < 0.08 * ideal.abs().max()
    assert _corr(aligned[inner], ideal[inner]) > 0.99
    torch.testing.assert_close(fbp_deformed(observed, angles, 8, d), fbp(aligned, angles, 8))
    reference = fbp(ideal, angles, 8)
    assert _corr(fbp_deformed(observed, angles, 8, d), reference) > _corr(fbp(observed, angles, 8), reference)


def test_align_series_with_identity_is_the_identity_and_checks_shapes():
    angles = [-20.0, 0.0, 20.0]
    _, series = _phantom_series(angles)
    identity = Deformations.identity(angles, (24, 32))
    torch.testing.assert_close(align_series(series, identity), series, rtol=0, atol=1e-5)
    torch.testing.assert_close(fbp_deformed(series, angles, 8, None), fbp(series, angles, 8))
    with pytest.raises(IcetideError, match="tilts"):
        align_series(series[:2], identity)
    with pytest.raises(IcetideError, match="detector"):
        align_series(series[:, :20], identity)
