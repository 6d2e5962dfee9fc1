"""The implicit volume: hash-encoding layout and indexing, fast path == reference, lattice path, sampling."""

import itertools
import math

import pytest
import torch
from torch.func import functional_call

from icetide.config import VolumeSettings
from icetide.geometry import box_to_unit, centered_coords
from icetide.volume import cpu_encoding
from icetide.volume import (
    HASH_PRIMES,
    MLP,
    HashEncoding,
    ImplicitVolume,
    ReferenceHashEncoding,
    level_layout,
)

# The CPU evaluations of points: the fused Numba kernels (a fit's choice) and the PyTorch path.
CPU_KERNELS = [
    pytest.param("numba", marks=pytest.mark.skipif(cpu_encoding.numba is None, reason="Numba is not installed")),
    "torch",
]
BOX = (5, 12, 9)  # (nz, ny, nx): anisotropic, mixes dense and hashed levels below
SMALL = dict(n_levels=5, log2_table_size=8, base_resolution=3.0, per_level_scale=1.7, box_shape_zyx=BOX)


def _encoding(cls=HashEncoding, seed=0, **overrides) -> HashEncoding:
    """A float64 encoding with O(1) table values (the +-1e-4 init would hide errors)."""
    torch.manual_seed(seed)
    enc = cls(**{**SMALL, **overrides}).double()
    with torch.no_grad():
        enc.table.normal_()
    return enc


def _vertex_points(level, vertices_xyz: torch.Tensor) -> torch.Tensor:
    """Unit coordinates of integer vertices ``(M, 3)`` (x, y, z) of a level."""
    return vertices_xyz.double() / torch.tensor(level.resolution_xyz, dtype=torch.float64)


def _row_ids(enc: HashEncoding, points: torch.Tensor) -> torch.Tensor:
    """Table rows that an encoding reads at vertices: with ``table[r] = r`` the value at a vertex is its row."""
    with torch.no_grad():
        enc.table.copy_(torch.arange(enc.table.shape[0], dtype=torch.float64)[:, None])
        return enc(points).round().long()


def test_tight_mapping_scales_each_axis_by_its_length():
    levels = level_layout(3, 20, 4.0, 2.0, (6, 20, 10))
    for n, level in enumerate(levels):
        r = 4.0 * 2.0**n
        assert level.resolution_xyz == pytest.approx((r * 10 / 20, r, r * 6 / 20))
        assert level.vertices_xyz == tuple(math.ceil(v) + 1 for v in level.resolution_xyz)


def test_levels_dense_while_they_fit_and_hashed_tables_first():
    levels = level_layout(5, 8, 3.0, 1.7, BOX)
    assert [lv.dense for lv in levels] == [True, True, False, False, False]
    for lv in levels:
        assert lv.rows == (math.prod(lv.vertices_xyz) if lv.dense else 2**8)
        assert lv.dense == (math.prod(lv.vertices_xyz) <= 2**8)
    hashed = [lv for lv in levels if not lv.dense]
    assert [lv.offset for lv in hashed] == [0, 2**8, 2 * 2**8]  # multiples of T
    spans = sorted((lv.offset, lv.offset + lv.rows) for lv in levels)
    assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))


def test_paper_configuration_layout_on_a_cpu_sized_box():
    cfg = VolumeSettings.paper()
    assert (cfg.n_levels, cfg.n_features, cfg.log2_table_size, cfg.hidden, cfg.n_hidden_layers) == (8, 4, 22, 64, 3)
    levels = level_layout(cfg.n_levels, cfg.log2_table_size, cfg.base_resolution, cfg.per_level_scale, (48, 128, 128))
    assert [lv.dense for lv in levels] == [True] * 5 + [False] * 3
    assert levels[-1].resolution_xyz == pytest.approx((1024, 1024, 384))


def test_default_configuration_finest_level_resolves_about_a_voxel():
    cfg = VolumeSettings()
    levels = level_layout(cfg.n_levels, cfg.log2_table_size, cfg.base_resolution, cfg.per_level_scale, (48, 128, 128))
    finest = levels[-1].resolution_xyz
    assert 1.0 <= finest[0] / 128 <= 1.2 and 1.0 <= finest[2] / 48 <= 1.2
    assert [lv.dense for lv in levels] == [True] * 7 + [False]


def test_dense_level_is_a_bijection_onto_its_rows():
    enc = _encoding(n_levels=3, n_features=1, log2_table_size=12, base_resolution=2.0, per_level_scale=2.0,
                    box_shape_zyx=(4, 8, 8))
    for index, level in enumerate(enc.levels):
        assert level.dense and all(float(r).is_integer() for r in level.resolution_xyz)
        gx, gy, gz = level.vertices_xyz
        ijk = torch.tensor(list(itertools.product(range(gx), range(gy), range(gz))))
        rows = _row_ids(enc, _vertex_points(level, ijk))[:, index]
        assert sorted(rows.tolist()) == list(range(level.offset, level.offset + level.rows))
        # Row-major (z, y, x) layout: the order forward_lattice relies on.
        assert torch.equal(rows - level.offset, ijk[:, 0] + gx * (ijk[:, 1] + gy * ijk[:, 2]))


def test_hashed_level_uses_the_xor_of_primes_hash():
    # Vertex coordinates in the hundreds: the products overflow 32 bits, which the hash must wrap.
    enc = _encoding(n_levels=1, n_features=1, log2_table_size=8, base_resolution=300.0, box_shape_zyx=(8, 8, 8))
    level = enc.levels[0]
    assert not level.dense
    torch.manual_seed(1)
    ijk = torch.randint(0, 300, (200, 3))
    rows = _row_ids(enc, _vertex_points(level, ijk))[:, 0]
    expected = [(i * HASH_PRIMES[0] ^ j * HASH_PRIMES[1] ^ k * HASH_PRIMES[2]) % 2**8 for i, j, k in ijk.tolist()]
    assert rows.tolist() == expected


@pytest.mark.parametrize("kernel", CPU_KERNELS)
@pytest.mark.parametrize("interpolation", ["linear", "smoothstep"])
@pytest.mark.parametrize("n_features", [1, 2, 4])
def test_fast_equals_reference_values_and_gradients(interpolation, n_features, kernel):
    fast = _encoding(n_features=n_features, interpolation=interpolation, chunk_points=37, kernel=kernel)
    assert fast.kernel_for(fast.table.device) == kernel
    ref = _encoding(ReferenceHashEncoding, n_features=n_features, interpolation=interpolation)
    ref.load_state_dict(fast.state_dict())
    torch.manual_seed(2)
    x = (torch.rand(300, 3, dtype=torch.float64) * 1.2 - 0.1).requires_grad_()  # some points outside the box
    out_fast, out_ref = fast(x), ref(x)
    torch.testing.assert_close(out_fast, out_ref, rtol=0, atol=1e-12)
    g = torch.randn_like(out_ref)
    gx_fast, gt_fast = torch.autograd.grad(out_fast, [x, fast.table], g)
    gx_ref, gt_ref = torch.autograd.grad(out_ref, [x, ref.table], g)
    torch.testing.assert_close(gt_fast, gt_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(gx_fast, gx_ref, rtol=0, atol=1e-10)
    outside = (x < 0) | (x > 1)
    assert outside.any() and (gx_fast[outside] == 0).all()


@pytest.mark.parametrize("kernel", CPU_KERNELS)
@pytest.mark.parametrize("interpolation", ["linear", "smoothstep"])
def test_gradcheck_positions_and_table(interpolation, kernel):
    enc = _encoding(n_levels=3, n_features=2, interpolation=interpolation, kernel=kernel)
    torch.manual_seed(3)
    x = torch.rand(12, 3, dtype=torch.float64).requires_grad_()
    table = enc.table.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda p, t: functional_call(enc, {"table": t}, (p,)), (x, table))


def test_smoothstep_weights():
    enc = _encoding(n_levels=1, n_features=1, log2_table_size=12, base_resolution=4.0, interpolation="smoothstep",
                    box_shape_zyx=(4, 4, 4))
    table = enc.table.detach()
    gx, gy, _ = enc.levels[0].vertices_xyz
    s = 0.25**2 * (3 - 2 * 0.25)
    point = torch.tensor([[(1 + 0.25) / 4, 2 / 4, 3 / 4]], dtype=torch.float64)  # x a quarter into a cell
    row = 1 + gx * (2 + gy * 3)
    expected = (1 - s) * table[row] + s * table[row + 1]
    torch.testing.assert_close(enc(point)[0], expected, rtol=0, atol=1e-12)
    # C1 at vertices: the position gradient vanishes there.
    vertex = torch.tensor([[2 / 4, 1 / 4, 2 / 4]], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(enc(vertex).sum(), vertex)
    assert grad.abs().max() < 1e-9


@pytest.mark.parametrize("kernel", CPU_KERNELS)
def test_forward_lattice_equals_forward_on_the_lattice_points(kernel):
    enc = _encoding(interpolation="smoothstep", kernel=kernel)
    assert 0 < enc.n_dense < enc.n_levels
    nz, ny, nx = BOX
    offset = torch.tensor([0.3, -0.45, 0.2], dtype=torch.float64)
    rows = slice(3, 9)
    lattice = enc.forward_lattice(BOX, offset, rows)
    assert lattice.shape == (enc.output_dim, nz, 6, nx) and lattice.is_contiguous()
    z, y, x = torch.meshgrid(
        centered_coords(nz, dtype=torch.float64),
        centered_coords(ny, dtype=torch.float64)[rows],
        centered_coords(nx, dtype=torch.float64),
        indexing="ij",
    )
    points = box_to_unit(torch.stack([x, y, z], -1).reshape(-1, 3) + offset, BOX)
    points_out = enc(points)
    torch.testing.assert_close(lattice.reshape(enc.output_dim, -1).t(), points_out, rtol=0, atol=1e-12)
    g = torch.randn_like(points_out)
    (grad_lattice,) = torch.autograd.grad(lattice.reshape(enc.output_dim, -1).t(), enc.table, g)
    (grad_points,) = torch.autograd.grad(points_out, enc.table, g)
    torch.testing.assert_close(grad_lattice, grad_points, rtol=0, atol=1e-10)


def test_forward_lattice_rows_and_empty_inputs():
    enc = _encoding()
    offset = torch.zeros(3, dtype=torch.float64)
    torch.testing.assert_close(enc.forward_lattice(BOX, offset, slice(4, 20)),
                               enc.forward_lattice(BOX, offset)[:, :, 4:])
    for bad in (slice(5, 5), slice(0, 12, 2)):
        with pytest.raises(ValueError):
            enc.forward_lattice(BOX, offset, bad)
    assert enc(torch.empty(0, 3, dtype=torch.float64)).shape == (0, enc.output_dim)


def test_outside_the_box_continues_the_faces():
    vol = ImplicitVolume(BOX, VolumeSettings(n_levels=3, log2_table_size=8, base_resolution=3.0)).double()
    face = torch.tensor([[4.5, 0.3, -1.0]], dtype=torch.float64)  # on the +x face (nx = 9)
    beyond = face + torch.tensor([[3.0, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(vol(beyond), vol(face))


def test_mlp_layers():
    mlp = MLP(16, hidden=8, n_hidden_layers=3)
    assert [type(m).__name__ for m in mlp] == ["Linear", "ReLU"] * 3 + ["Linear"]
    assert mlp(torch.zeros(5, 16)).shape == (5, 1)


@pytest.mark.parametrize("n", [7, 40000])  # one piece; several CPU chunks (_CHUNK_ROWS)
def test_mlp_channels_first_and_input_scale_match_the_row_layout(n):
    torch.manual_seed(0)
    mlp = MLP(6, hidden=8, n_hidden_layers=2).double()
    x = torch.randn(n, 6, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.25, 0.0], dtype=torch.float64)
    expected = mlp(x * scale)  # the scale applied to the features themselves
    g = torch.randn_like(expected)
    grads = torch.autograd.grad(expected, [x, *mlp.parameters()], g)
    x_cf = x.detach().t().reshape(6, n, 1).requires_grad_()  # channels first, one trailing axis
    for name, out, inputs in (
        ("rows", mlp(x, scale), x),
        ("channels first", mlp.forward_channels_first(x_cf, scale).reshape(1, n).t(), x_cf),
    ):
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-12, msg=name)
        got = torch.autograd.grad(out, [inputs, *mlp.parameters()], g)
        torch.testing.assert_close(got[0].reshape(-1, n).t() if inputs is x_cf else got[0], grads[0], rtol=0,
                                   atol=1e-12, msg=name)
        for a, b in zip(got[1:], grads[1:]):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=name)
    assert grads[0][:, 1].abs().max() == 0  # a feature of weight 0 gets no gradient


def test_implicit_volume_forward_and_lattice_agree():
    cfg = VolumeSettings(n_levels=4, n_features=2, log2_table_size=8, base_resolution=3.0, per_level_scale=1.8,
                       hidden=8, n_hidden_layers=2)
    vol = ImplicitVolume.from_config(cfg, BOX).double()
    nz, ny, nx = BOX
    z, y, x = torch.meshgrid(*(centered_coords(n, dtype=torch.float64) for n in BOX), indexing="ij")
    density = vol(torch.stack([x, y, z], -1).reshape(-1, 3))
    assert density.shape == (nz * ny * nx,)
    lattice = vol.lattice(torch.zeros(3, dtype=torch.float64))
    assert lattice.shape == BOX
    torch.testing.assert_close(lattice.reshape(-1), density, rtol=0, atol=1e-12)
    band = vol.lattice(torch.zeros(3, dtype=torch.float64), rows=slice(2, 5))
    torch.testing.assert_close(band, lattice[:, 2:5], rtol=0, atol=1e-12)


def _random_volume(seed: int) -> ImplicitVolume:
    """A small float64 volume of the box with a random (normal) table."""
    cfg = VolumeSettings(n_levels=4, n_features=2, log2_table_size=8, base_resolution=3.0, per_level_scale=1.8,
                       hidden=8, n_hidden_layers=2)
    torch.manual_seed(seed)
    vol = ImplicitVolume.from_config(cfg, BOX).double()
    with torch.no_grad():
        vol.encoding.table.normal_()
    return vol


@pytest.mark.parametrize("recompute_voxels", [None, 2 * 4])
def test_lattice_with_a_step_is_every_other_voxel_centred_on_the_box(recompute_voxels):
    """step 2 on the (5, 12, 9) box: 2 x 6 x 4 points, 2 voxels apart, symmetric about the box centre (the
    odd axes lose half a voxel at each end); offset and rows in units of that lattice."""
    vol = _random_volume(seed=1)
    offset = torch.tensor([0.25, -0.4, 0.1], dtype=torch.float64)
    band = vol.lattice(offset, rows=slice(1, 5), recompute_voxels=recompute_voxels, step=2)
    assert band.shape == (2, 4, 4)
    z, y, x = torch.meshgrid(*(2 * centered_coords(n // 2, dtype=torch.float64) for n in BOX), indexing="ij")
    assert float(x[0, 0, 0]) == -3.0 and float(z[0, 0, 0]) == -1.0  # every other voxel centre of the box
    points = torch.stack([x, y, z], -1)[:, 1:5].reshape(-1, 3) + 2 * offset
    torch.testing.assert_close(band.reshape(-1), vol(points), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="step"):
        vol.lattice(offset, step=0)


def test_recomputed_lattice_has_the_same_values_and_gradients():
    """Activation checkpointing of the lattice band (pieces of 2 rows, and one piece) changes nothing."""
    vol = _random_volume(seed=0)
    offset = torch.tensor([0.2, -0.3, 0.1], dtype=torch.float64)
    weights = torch.randn(BOX[0], 5, BOX[2], dtype=torch.float64)

    def values_and_gradients(recompute_voxels):
        vol.zero_grad()
        band = vol.lattice(offset, rows=slice(1, 6), recompute_voxels=recompute_voxels)
        (band * weights).sum().backward()
        return [band.detach()] + [p.grad.clone() for p in vol.parameters()]

    plain = values_and_gradients(None)
    for voxels in (2 * BOX[0] * BOX[2], 10**9):
        for a, b in zip(plain, values_and_gradients(voxels)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_sample_grid_chunks_and_shapes():
    vol = ImplicitVolume(BOX, VolumeSettings(n_levels=4, log2_table_size=8, base_resolution=3.0, hidden=8))
    with torch.no_grad():
        vol.encoding.table.normal_()
    whole = vol.sample_grid()
    assert whole.shape == BOX and whole.dtype == torch.float32 and whole.device.type == "cpu"
    torch.testing.assert_close(vol.sample_grid(chunk_voxels=1), whole, rtol=0, atol=1e-6)
    torch.testing.assert_close(vol.sample_grid(chunk_voxels=3 * BOX[0] * BOX[2]), whole, rtol=0, atol=1e-6)
    torch.testing.assert_close(whole, vol.lattice(torch.zeros(3)).detach(), rtol=0, atol=1e-6)
    # A finer grid over the same box: voxel centres of the 2x grid at unit coordinates (i + 0.5) / (2 n).
    fine_shape = tuple(2 * n for n in BOX)
    fine = vol.sample_grid(fine_shape, chunk_voxels=100)
    assert fine.shape == fine_shape
    k, j, i = 3, 7, 11
    unit = torch.tensor([[(i + 0.5) / fine_shape[2], (j + 0.5) / fine_shape[1], (k + 0.5) / fine_shape[0]]])
    with torch.no_grad():
        expected = vol.mlp(vol.encoding(unit))[0, 0]
    torch.testing.assert_close(fine[k, j, i], expected, rtol=0, atol=1e-6)

