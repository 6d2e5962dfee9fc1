"""Renderers: both compute paper eq. 1; gradients match finite differences."""

import math

import pytest
import torch

from icetide.deform import deform_coords
from icetide.geometry import detector_grid
from icetide.render import LatticeRenderer, RaysRenderer


class BlobField(torch.nn.Module):
    """A sum of Gaussian blobs: a smooth analytic density with learnable amplitudes (float64)."""

    def __init__(self, shape_zyx, centres_xyz, sigma=2.5):
        super().__init__()
        self.box_shape_zyx = shape_zyx
        self.centres = torch.tensor(centres_xyz, dtype=torch.float64)
        self.amplitude = torch.nn.Parameter(torch.ones(len(centres_xyz), dtype=torch.float64))
        self.sigma = sigma

    def forward(self, xyz):
        d2 = ((xyz[:, None, :].double() - self.centres) ** 2).sum(-1)
        return (self.amplitude * torch.exp(-d2 / (2 * self.sigma**2))).sum(-1)

    def lattice(self, offset_vox, rows=None):
        nz, ny, nx = self.box_shape_zyx
        rows = rows or slice(0, ny)
        z = torch.arange(nz, dtype=torch.float64) - (nz - 1) / 2 + offset_vox[2]
        y = torch.arange(rows.start, rows.stop, dtype=torch.float64) - (ny - 1) / 2 + offset_vox[1]
        x = torch.arange(nx, dtype=torch.float64) - (nx - 1) / 2 + offset_vox[0]
        zz, yy, xx = torch.meshgrid(z, y, x, indexing="ij")
        pts = torch.stack([xx, yy, zz], -1).reshape(-1, 3)
        return self(pts).reshape(len(z), len(y), len(x))


SHAPE = (24, 24, 32)  # thick enough that the blobs lie inside the slab: the reference integrates them unbounded
CENTRES = [[-4.0, 2.0, 1.0], [5.0, -3.0, -2.0], [0.0, 5.0, 3.0]]


def _coords(theta_deg, shifts, angles, local):
    ny, nx = SHAPE[1:]
    u, v = detector_grid(ny, nx, dtype=torch.float64)
    c = deform_coords(u.reshape(1, -1), v.reshape(1, -1), shifts, angles, local, (ny, nx))
    return c[:, 0], torch.deg2rad(torch.tensor(theta_deg, dtype=torch.float64))


def _analytic_projection(field, coords, theta):
    """Exact line integrals of the Gaussian blobs (unbounded), divided by the thickness."""
    out = torch.zeros(coords.shape[:2], dtype=torch.float64)
    s = field.sigma
    for b in range(len(theta)):
        c, sn = math.cos(theta[b]), math.sin(theta[b])
        for a, (x, y, z) in zip(field.amplitude.detach(), field.centres.tolist()):
            u0 = x * c + z * sn
            d2 = (coords[b, :, 0] - u0) ** 2 + (coords[b, :, 1] - y) ** 2
            out[b] += a * math.sqrt(2 * math.pi) * s * torch.exp(-d2 / (2 * s**2))
    return out / SHAPE[0]


@pytest.mark.parametrize("renderer", ["lattice", "rays"])
def test_renderers_match_analytic_projection(renderer):
    field = BlobField(SHAPE, CENTRES)
    coords, theta = _coords([-40.0, 0.0, 25.0], torch.tensor([[1.0, -0.5], [0.0, 0.0], [-2.0, 1.0]], dtype=torch.float64),
                            torch.tensor([0.01, 0.0, -0.02], dtype=torch.float64), None)
    r = LatticeRenderer(SHAPE) if renderer == "lattice" else RaysRenderer(SHAPE, samples_per_voxel=4)
    with torch.no_grad():
        values, valid = r.render(field, coords, theta, jitter=False)
    expected = _analytic_projection(field, coords, theta)
    err = (values - expected)[valid].abs().max() / expected.abs().max()
    assert err < 0.03, err


@pytest.mark.parametrize("renderer", ["lattice", "rays"])
def test_renderer_gradients_match_finite_differences(renderer):
    torch.manual_seed(0)
    field = BlobField(SHAPE, CENTRES)
    shifts = torch.tensor([[0.7, -0.4], [-1.1, 0.3]], dtype=torch.float64, requires_grad=True)
    angles = torch.tensor([0.02, -0.01], dtype=torch.float64, requires_grad=True)
    local = (0.3 * torch.randn(2, 2, 3, 3, dtype=torch.float64)).requires_grad_()
    r = LatticeRenderer(SHAPE) if renderer == "lattice" else RaysRenderer(SHAPE, samples_per_voxel=2)
    weights = torch.randn(2, SHAPE[1] * SHAPE[2], dtype=torch.float64)
    # Score central pixels only: their rays stay inside the box laterally, where the field is smooth (the
    # box faces cut the blobs' tails, a discontinuity finite differences cannot follow).
    u, v = detector_grid(*SHAPE[1:], dtype=torch.float64)
    weights = weights * ((u.abs() <= 6) & (v.abs() <= 6)).reshape(1, -1)

    def objective():
        coords, theta = _coords([-30.0, 20.0], shifts, angles, local)
        values, valid = r.render(field, coords, theta, jitter=False)
        return (values * weights * valid).sum()

    objective().backward()
    eps = 1e-5
    for param in (shifts, angles, local, field.amplitude):
        flat = param.data.view(-1)
        for i in range(0, flat.numel(), max(1, flat.numel() // 4)):
            old = flat[i].item()
            flat[i] = old + eps
            with torch.no_grad():
                up = objective()
            flat[i] = old - eps
            with torch.no_grad():
                down = objective()
            flat[i] = old
            numeric = (up - down) / (2 * eps)
            assert math.isclose(param.grad.view(-1)[i].item(), numeric.item(), rel_tol=1e-4, abs_tol=1e-7), (param.shape, i, param.grad.view(-1)[i].item(), numeric.item())


class ConstantField(torch.nn.Module):
    """Density 1 everywhere: a laterally unbounded slab once the renderer limits it to the slab."""

    def __init__(self, shape_zyx):
        super().__init__()
        self.box_shape_zyx = shape_zyx

    def forward(self, xyz):
        return torch.ones(xyz.shape[0], dtype=torch.float64)

    def lattice(self, offset_vox, rows=None):
        nz, ny, nx = self.box_shape_zyx
        rows = rows or slice(0, ny)
        return torch.ones(nz, rows.stop - rows.start, nx, dtype=torch.float64)


def test_slab_padding_covers_the_rays_of_the_highest_tilt():
    from icetide.geometry import slab_padding_px

    assert slab_padding_px(128, 64, 0.0) == 0
    # |x| <= 64 / cos 60 + 32 tan 60 = 183.4 -> 120 columns on each side of the 128
    assert slab_padding_px(128, 64, 60.0) == 120 == slab_padding_px(128, 64, -60.0)


@pytest.mark.parametrize("renderer", ["lattice", "rays"])
def test_an_unbounded_slab_projects_to_thickness_over_cos_at_every_pixel(renderer):
    """A constant slab of thickness t: every pixel sees t / cos(theta) with the padded box (docs/CONVENTIONS.md
    "Lateral extent of the specimen"), while the detector-sized box loses the rays that leave it through its sides at
    high tilt."""
    from icetide.geometry import slab_padding_px

    nz, ny, nx = 16, 8, 32
    theta_deg = 60.0
    pad = slab_padding_px(nx, nz, theta_deg)
    wide = (nz, ny, nx + 2 * pad)
    u, v = detector_grid(ny, nx, dtype=torch.float64)
    coords = torch.stack([u.reshape(-1), v.reshape(-1)], -1)[None]
    theta = torch.tensor([math.radians(theta_deg)], dtype=torch.float64)

    def render(shape):
        r = LatticeRenderer(shape, detector_nx=nx) if renderer == "lattice" else RaysRenderer(shape, 4)
        with torch.no_grad():
            values, valid = r.render(ConstantField(shape), coords, theta, jitter=False)
        return values.reshape(ny, nx), valid.reshape(ny, nx)

    slab, valid = render(wide)
    expected = 1 / math.cos(theta[0])  # renderers divide by the thickness
    assert valid[1:-1, 1:-1].all()
    torch.testing.assert_close(slab[valid], torch.full_like(slab[valid], expected), rtol=0.02, atol=0)
    box, _ = render((nz, ny, nx))
    assert float(box[1, 1]) < 0.8 * expected and float(box[1, nx // 2]) == pytest.approx(expected, rel=0.02)
