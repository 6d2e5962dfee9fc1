"""The joint fit: it recovers shifts on a small problem, resumes exactly from a checkpoint, stops on time."""

import math

import numpy as np
import pytest
import torch

from icetide import TiltSeries
from icetide.config import ReconstructConfig
from icetide.deform import Deformations
from icetide.errors import IcetideError
from icetide.fit import Fitter, bin_by_two, run_fit
from icetide.fit.numerics import finite_or_zeroed
from icetide.fit.result import fit_result
from icetide.geometry import centered_coords
from icetide.metrics import deformation_errors
from icetide.simulate import crowded_phantom, simulate_tilt_series

SHAPE = (16, 40, 40)
ANGLES = np.arange(-60.0, 61.0, 10.0)


@pytest.fixture(scope="module")
def shifted_series():
    """A noise-free series with only shifts (+-3 px): 13 tilts of a 40 x 40 x 16 phantom."""
    rng = np.random.default_rng(1)
    m = len(ANGLES)
    truth = Deformations(ANGLES, rng.uniform(-3, 3, (m, 2)), np.zeros(m), np.zeros((m, 2, 5, 5)), SHAPE[1:])
    volume = crowded_phantom(SHAPE, seed=3)
    sim = simulate_tilt_series(volume, ANGLES, snr_db=40.0, deformations=truth, seed=0, samples_per_voxel=1.0)
    return TiltSeries(sim.noisy, ANGLES), truth


def _config(**fit) -> ReconstructConfig:
    """A small fit; unbinned unless ``binned_epochs`` is given (None: the default plan)."""
    return ReconstructConfig.model_validate({
        "thickness": SHAPE[0],
        "volume": {"log2_table_size": 12, "n_levels": 4, "hidden": 16},
        "deform": {"local": False, "rotations": False},
        "fit": {"tilts_per_step": 4, "warmup_epochs": 2, "validation_fraction": 0.05, "device": "cpu",
                "binned_epochs": 0, **fit},
    })


@pytest.mark.parametrize("binned_epochs", [0, None])
def test_fit_recovers_shifts(shifted_series, binned_epochs):
    series, truth = shifted_series
    start = Deformations.identity(ANGLES, SHAPE[1:])
    before = deformation_errors(truth, start)["shift_rms_px"]
    config = _config(epochs=40, patience=40, lr_decay_every=15, binned_epochs=binned_epochs)
    result = run_fit(Fitter(series, config))
    after = deformation_errors(truth, result.deformations)["shift_rms_px"]
    assert before > 2.0
    assert after < 0.3, (before, after)  # 0.08 px measured at 40 epochs (0.0x with 20 of them binned)
    assert result.report["epochs"] == 40 and result.report["stop_reason"] == "epochs"
    assert result.report["binned_epochs"] == (20 if binned_epochs is None else 0)


def _parameters(fitter: Fitter) -> list[torch.Tensor]:
    return [p.detach().clone() for p in fitter.volume.parameters()] + [fitter.deformations.shifts.detach().clone()]


def test_resume_continues_exactly(shifted_series, tmp_path):
    series, _ = shifted_series
    # Binned epochs planned alike (auto would plan by each run's epochs) and resumed from inside them.
    straight = Fitter(series, _config(epochs=5, binned_epochs=4))
    run_fit(straight)
    first = Fitter(series, _config(epochs=3, binned_epochs=4))
    run_fit(first, checkpoint_path=tmp_path / "checkpoint.pt")
    resumed = Fitter(series, _config(epochs=5, binned_epochs=4))
    resumed.load_checkpoint(tmp_path / "checkpoint.pt")
    assert resumed.epoch == 3
    run_fit(resumed)
    for a, b in zip(_parameters(straight), _parameters(resumed)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert straight.curves["train_loss"] == resumed.curves["train_loss"]
    # On the CPU both optimisers take the fused Adam step, also after loading their state.
    assert resumed.optimisers.volume.defaults["fused"] and all(g["fused"] for g in resumed.optimisers.deform.param_groups)


def test_resume_refuses_other_settings(shifted_series, tmp_path):
    series, _ = shifted_series
    run_fit(Fitter(series, _config(epochs=1)), checkpoint_path=tmp_path / "checkpoint.pt")
    other = Fitter(series, _config(epochs=1, lr_volume=0.5))
    with pytest.raises(Exception, match="fit.lr_volume"):
        other.load_checkpoint(tmp_path / "checkpoint.pt")


def test_a_checkpoint_of_the_first_format_resumes_and_a_newer_one_is_refused(shifted_series, tmp_path):
    """Format 1 had no format_version and, in its earliest files, no binned stage, rollbacks or intensity offset:
    it is read with their defaults. A format newer than this icetide's is refused in one line."""
    series, _ = shifted_series
    first = Fitter(series, _config(epochs=2))
    run_fit(first, checkpoint_path=tmp_path / "checkpoint.pt")
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert state["format_version"] == 2
    old = {k: v for k, v in state.items() if k not in (
        "format_version", "binned_epochs", "level_epochs", "best_binned_val", "best_binned_state",
        "bad_binned_validations", "lr_factor", "rollbacks")}
    old["model"] = {k: v for k, v in state["model"].items() if k != "offset"}
    torch.save(old, tmp_path / "old.pt")
    resumed = Fitter(series, _config(epochs=3))
    resumed.load_checkpoint(tmp_path / "old.pt")
    assert (resumed.epoch, resumed.binned_epochs, resumed.lr_factor, resumed.rollbacks) == (2, 0, 1.0, [])
    torch.testing.assert_close(resumed.deformations.shifts, first.deformations.shifts, rtol=0, atol=0)
    run_fit(resumed)
    assert resumed.epoch == 3
    torch.save({**state, "format_version": 3}, tmp_path / "new.pt")
    with pytest.raises(IcetideError, match="format 3 is newer"):
        Fitter(series, _config(epochs=3)).load_checkpoint(tmp_path / "new.pt")


def test_time_budget_stops_the_fit(shifted_series):
    series, _ = shifted_series
    result = run_fit(Fitter(series, _config(epochs=10_000, max_minutes=1e-3)))
    assert result.report["epochs"] < 10_000 and "time budget" in result.report["stop_reason"]


def test_gauge_is_removed(shifted_series):
    series, _ = shifted_series
    result = run_fit(Fitter(series, _config(epochs=3)))
    from icetide.deform import remove_gauge

    residual, translation = remove_gauge(result.deformations.shifts_px, ANGLES)
    np.testing.assert_allclose(residual, result.deformations.shifts_px, atol=1e-6)
    np.testing.assert_allclose(translation, 0, atol=1e-6)


def test_local_border_ring_stays_fixed(shifted_series):
    series, _ = shifted_series
    config = _config(epochs=4, warmup_epochs=0, local_delay_epochs=0, lr_local_px=0.5)
    config.deform.local = True
    result = run_fit(Fitter(series, config))
    local = result.deformations.local_px
    border = np.concatenate([local[..., 0, :], local[..., -1, :], local[..., 1:-1, 0], local[..., 1:-1, -1]], -1)
    assert np.abs(border).max() == 0
    assert np.abs(local[..., 1:-1, 1:-1]).max() > 0.1


def test_local_fields_wait_for_their_release(shifted_series):
    series, _ = shifted_series
    config = _config(epochs=4, warmup_epochs=1, local_delay_epochs=10)
    config.deform.local = True
    fitter = Fitter(series, config)
    run_fit(fitter)
    assert fitter.deformations.local.abs().max() == 0 and fitter.deformations.shifts.abs().max() > 0


def test_axis_offset_is_one_rotation_added_to_every_tilt(shifted_series):
    """The common tilt-axis offset enters every tilt's rotation, is reported, and survives snapshot/restore."""
    series, _ = shifted_series
    config = _config(epochs=1)
    config.deform.axis_offset = True
    fitter = Fitter(series, config)
    with torch.no_grad():
        fitter.deformations.axis_offset.fill_(np.deg2rad(1.5))
    snap = fitter.snapshot()
    with torch.no_grad():
        fitter.deformations.axis_offset.zero_()
    fitter.restore(snap)
    result = fit_result(fitter, "test")
    assert result.report["tilt_axis_offset_deg"] == pytest.approx(1.5)
    np.testing.assert_allclose(result.deformations.angles_deg, 1.5, atol=1e-5)
    coords = fitter.forward.coords(fitter.scale, torch.tensor([0]))
    config.deform.axis_offset = False
    plain = Fitter(series, config)
    with torch.no_grad():
        plain.deformations.angles.fill_(np.deg2rad(1.5))
    torch.testing.assert_close(coords, plain.forward.coords(plain.scale, torch.tensor([0])))


def test_per_tilt_gains_are_recovered():
    """Exposure varying by +-20 % across the series: the gains come back, normalised to geometric mean 1."""
    m = len(ANGLES)
    truth = Deformations(ANGLES, np.zeros((m, 2)), np.zeros(m), np.zeros((m, 2, 5, 5)), SHAPE[1:])
    sim = simulate_tilt_series(crowded_phantom(SHAPE, seed=3), ANGLES, snr_db=30.0, deformations=truth, seed=0,
                               samples_per_voxel=1.0)
    gains = np.random.default_rng(4).uniform(0.8, 1.2, m)
    # Decaying learning rates let the gains settle (at a constant rate they wander by 0.03-0.1 from epoch to epoch).
    config = _config(epochs=40, patience=40, warmup_epochs=2, lr_gain=0.02, lr_decay_every=15)
    config.deform.shifts = False
    config.deform.rotations = False
    config.deform.gain = True
    result = run_fit(Fitter(TiltSeries(sim.noisy * gains[:, None, None].astype(np.float32), ANGLES), config))
    expected = gains / np.exp(np.log(gains).mean())
    found = np.asarray(result.report["tilt_gains"])
    assert np.abs(found - expected).max() < 0.04  # 0.018 measured (0.014 with a separate validation pass)
    assert np.corrcoef(found, expected)[0, 1] > 0.97


def test_lattice_bands_bound_memory_and_validation_covers_every_band(shifted_series):
    from icetide.fit import auto_lattice_rows

    assert auto_lattice_rows((48, 128, 128)) == 128  # the whole volume fits the budget
    assert auto_lattice_rows((180, 512, 512)) == 86  # 8 M voxels per step
    assert auto_lattice_rows((180, 512, 512), budget_voxels=1) == 4
    series, _ = shifted_series
    whole = Fitter(series, _config(epochs=2))
    run_fit(whole)
    banded = Fitter(series, _config(epochs=2, lattice_rows=8))
    banded.volume.load_state_dict(whole.volume.state_dict())
    with torch.no_grad():
        banded.deformations.shifts.copy_(whole.deformations.shifts)
    assert banded.validation_loss() == pytest.approx(whole.validation_loss(), rel=0.05)


def test_memory_budget_sizes_the_lattice_bands(shifted_series):
    from icetide.fit import BYTES_PER_FIELD_POINT, auto_lattice_rows

    assert auto_lattice_rows((180, 512, 512), memory_bytes=180 * 512 * 11 * BYTES_PER_FIELD_POINT) == 11
    assert auto_lattice_rows((48, 128, 128), memory_bytes=10**12) == 128  # the voxel cap still applies
    series, _ = shifted_series
    small = Fitter(series, _config(epochs=1, max_memory_gb=0.001))
    assert small.memory.budget_bytes <= 2**30 // 1000 and small.memory.lattice_rows == 4
    rays = Fitter(series, _config(epochs=1, renderer="rays", rays_per_tilt=200, max_memory_gb=0.001))
    assert rays.step_chunks == 4  # every tilt of a step in its own group
    report = run_fit(rays).report
    assert report["step_chunks"] == 4 and report["memory_budget_mb"] <= 1.1


def test_the_memory_model_stays_above_the_measured_footprints():
    from icetide.config import VolumeSettings
    from icetide.fit import field_bytes_per_point

    default = VolumeSettings()
    paper = VolumeSettings(n_features=4, log2_table_size=22, per_level_scale=2.0, hidden=64, n_hidden_layers=3)
    # measured: 571 B (default, CPU, with the fixed part), 1355 / 685 B (paper, fp32 / mixed, H200)
    assert 571 < field_bytes_per_point(default) < 1.3 * 571
    assert 1355 < field_bytes_per_point(paper) < 1.3 * 1355
    assert 685 < field_bytes_per_point(paper, mixed_precision=True) < 1.3 * 685
    assert field_bytes_per_point(paper, recompute=True) == 64


def test_the_band_is_planned_for_what_the_memory_holds_besides_the_tables(shifted_series):
    from icetide.fit import field_bytes_per_point

    series, _ = shifted_series
    free = Fitter(series, _config(epochs=1))
    nz, _, nx = free.model_shape_zyx
    plane = nz * nx * field_bytes_per_point(free.config.volume)
    fixed = 8 * 4 * free.volume.encoding.table.numel() + 3 * 4 * free.problem.images.numel()
    fitter = Fitter(series, _config(epochs=1, max_memory_gb=(fixed + 10.5 * plane) / 2**30))
    assert fitter.memory.lattice_rows == 10


def _deterministic_render(fitter: Fitter) -> None:
    render = fitter.scales[0].renderer.render
    fitter.scales[0].renderer.render = lambda *a, **k: render(*a, **{**k, "jitter": False})


def test_gradients_in_groups_of_tilts_equal_one_group(shifted_series):
    series, _ = shifted_series
    grads = []
    for chunks in (1, 3):
        fitter = Fitter(series, _config(epochs=1))
        _deterministic_render(fitter)
        fitter.step_chunks = chunks
        loss, used = fitter.step_gradients(fitter.scale, torch.arange(4))
        grads.append((float(loss), used, torch.cat([p.grad.flatten() for p in fitter.parameters()])))
    (loss1, used1, g1), (loss3, used3, g3) = grads
    assert used1 == used3 and loss1 == pytest.approx(loss3, rel=1e-6)
    assert torch.allclose(g1, g3, rtol=1e-4, atol=1e-7 * float(g1.abs().max()))


def _failing_when(fitter: Fitter, too_big) -> list:
    """Make the renderer raise CUDA's out-of-memory error whenever ``too_big(fitter, coords, rows)``."""
    render = fitter.scales[0].renderer.render
    calls = []

    def guarded(field, coords, *args, **kwargs):
        calls.append(coords.shape[0])
        if too_big(fitter, coords, kwargs.get("rows")):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return render(field, coords, *args, **kwargs)

    fitter.scales[0].renderer.render = guarded
    return calls


def test_out_of_memory_halves_the_lattice_band_and_retries(shifted_series):
    series, _ = shifted_series
    fitter = Fitter(series, _config(epochs=2))
    assert fitter.memory.lattice_rows == 40
    _failing_when(fitter, lambda f, coords, rows: rows.stop - rows.start > 10)
    report = run_fit(fitter).report
    assert report["epochs"] == 2 and report["lattice_rows"] == 10
    assert [e["lattice_rows"] for e in report["memory_events"]] == [20, 10]


def test_an_epoch_covers_every_row_once_in_bands(shifted_series):
    series, _ = shifted_series
    fitter = Fitter(series, _config(epochs=2, lattice_rows=12))
    ny = series.shape[0]
    starts = set()
    for _ in range(5):
        steps = fitter.epoch_bands(fitter.scale)
        assert len(steps) == -(-ny // 12)
        rows = [r for step in steps for band in step for r in range(band.start, band.stop)]
        assert sorted(rows) == list(range(ny))  # every row once
        assert all(sum(b.stop - b.start for b in step) <= 12 for step in steps)
        starts.add(min(b.start for step in steps for b in step if b.start > 0))
    assert len(starts) > 1  # the band edges move from epoch to epoch
    run_fit(fitter)
    groups = -(-len(series.tilt_angles_deg) // fitter.config.fit.tilts_per_step)
    assert fitter.step == 2 * len(steps) * groups
    # All rows fit in a band: one band, but fit.binned_bands (default 2) in a binned epoch.
    fitter = Fitter(series, _config(epochs=4, binned_epochs=2))
    steps = fitter.epoch_bands(fitter.scale)
    assert fitter.scale.factor == 2 and len(steps) == 2
    assert sorted(r for s in steps for b in s for r in range(b.start, b.stop)) == list(range(ny // 2))
    fitter.epoch = 2
    assert fitter.scale.factor == 1 and fitter.epoch_bands(fitter.scale) == [None]
    one_band = Fitter(series, _config(epochs=4, binned_epochs=2, binned_bands=1))
    assert one_band.epoch_bands(one_band.scale) == [None]


def test_a_band_step_warps_only_the_rows_that_can_see_the_band(shifted_series):
    """Leaving out the pixel rows that cannot reach the band changes neither the loss nor any gradient."""
    series, _ = shifted_series
    fitter = Fitter(series, _config(epochs=1, lattice_rows=8))
    with torch.no_grad():
        fitter.deformations.shifts += torch.randn_like(fitter.deformations.shifts) * 2
        fitter.deformations.angles += 0.02
        fitter.deformations.local += torch.randn_like(fitter.deformations.local) * 0.5
    tilts, band = torch.arange(len(series.tilt_angles_deg)), [slice(16, 24)]
    reach = fitter.reach_px()
    rows = fitter.scale.pixel_rows(band[0], reach)
    assert 0 < rows.start and rows.stop < series.shape[0]  # fewer rows than the detector's

    state = fitter.sampler.get_state()

    def gradients(reach_px):
        fitter.sampler.set_state(state)  # the same renderer jitter both times
        loss, count = fitter.step_gradients(fitter.scale, tilts, band, reach_px)
        return float(loss), int(count), [p.grad.clone() for p in fitter.parameters() if p.grad is not None]

    restricted = gradients(reach)
    everything = gradients(math.inf)  # every row of the detector
    assert restricted[1] == everything[1] and restricted[0] == pytest.approx(everything[0], rel=1e-5)
    for a, b in zip(restricted[2], everything[2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("split, renderer", [("tilts", "lattice"), ("pixels", "rays")])
def test_half_maps_each_volume_learns_from_its_own_half_only(shifted_series, split, renderer):
    series, _ = shifted_series
    fitter = Fitter(series, _config(epochs=1, half_maps=split, renderer=renderer, rays_per_tilt=200))
    assert fitter.half_volume is not None and 0.4 < float(fitter.problem.half_mask.float().mean()) < 0.6
    # the halves' encodings sit on different grids, so that they do not share interpolation artefacts
    assert fitter.half_volume.encoding.levels[0].resolution_xyz != fitter.volume.encoding.levels[0].resolution_xyz
    if split == "tilts":  # alternate tilts in angle order
        assert fitter.problem.half_mask[:, 0, 0].tolist() == [i % 2 == 1 for i in range(len(ANGLES))]
    tilts, state = torch.arange(len(ANGLES)), fitter.sampler.get_state()

    def gradients():
        fitter.sampler.set_state(state)
        fitter.step_gradients(fitter.scale, tilts)
        return [[p.grad.clone() for p in v.parameters()] for v in fitter.volumes]

    before = gradients()
    with torch.no_grad():  # change only the data of the second half
        fitter.problem.images += torch.where(fitter.problem.half_mask, 1.0, 0.0)
    after = gradients()
    for a, b in zip(before[0], after[0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)  # the first volume does not see it
    assert any(not torch.allclose(a, b) for a, b in zip(before[1], after[1]))  # the second does


def test_coarse_to_fine_releases_the_levels_one_after_another(shifted_series):
    series, _ = shifted_series
    fitter = Fitter(series, _config(epochs=1, coarse_to_fine_epochs=6))
    n_levels = fitter.volume.encoding.n_levels  # 4: a level enters every 2 epochs
    fitter.set_level_weights(0)
    assert fitter.volume.level_weights.tolist() == [1.0, 0.0, 0.0, 0.0]
    fitter.set_level_weights(3)  # a = 2.5: level 1 in, level 2 half way
    torch.testing.assert_close(fitter.volume.level_weights, torch.tensor([1.0, 1.0, 0.5, 0.0]))
    fitter.set_level_weights(6)
    assert fitter.volume.level_weights is None and n_levels == 4
    points = torch.rand(20, 3) * 8
    fitter.volume.level_weights = torch.tensor([1.0, 0.0, 0.0, 0.0])
    coarse = fitter.volume(points)
    fitter.volume.encoding.table.data[fitter.volume.encoding.levels[1].offset:] += 1.0  # finer levels only
    torch.testing.assert_close(fitter.volume(points), coarse)  # the finer levels do not reach the output yet


def test_pixel_losses():
    from icetide.fit import POISSON_SHARPNESS, pixel_loss

    values = torch.tensor([0.5, 1.0, 2.0, 0.0, 3.0], dtype=torch.float64)
    obs = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(pixel_loss(values, obs, "l1"), (values - obs).abs())
    torch.testing.assert_close(pixel_loss(values, obs, "l2"), (values - obs) ** 2)
    poisson = pixel_loss(values, obs, "poisson")  # mu - y - y log(mu / y), 0 log 0 = 0
    mu = torch.nn.functional.softplus(values, beta=POISSON_SHARPNESS)  # = values beyond a few 1 / k
    assert (mu[1:3] - values[1:3]).abs().max() < 1e-5 and mu[3] == pytest.approx(math.log(2) / POISSON_SHARPNESS)
    expected = mu - obs - torch.xlogy(obs, mu) + torch.xlogy(obs, obs)
    torch.testing.assert_close(poisson, expected)
    assert poisson[1] == pytest.approx(0, abs=1e-9) and (poisson >= 0).all()
    # its minimiser is the Poisson maximum likelihood: d/dmu = 1 - y / mu
    m = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    pixel_loss(m, torch.tensor([1.0, 1.0], dtype=torch.float64), "poisson").sum().backward()
    torch.testing.assert_close(m.grad, torch.tensor([0.0, 1 - 1 / 2.0], dtype=torch.float64), atol=1e-4, rtol=1e-4)
    # a prediction below zero still learns: the gradient pushes it up towards a positive count
    low = torch.tensor([-0.5], dtype=torch.float64, requires_grad=True)
    pixel_loss(low, torch.tensor([1.0], dtype=torch.float64), "poisson").sum().backward()
    assert low.grad.item() < 0


def test_poisson_fit_on_counting_data():
    volume = crowded_phantom(SHAPE, seed=3)
    sim = simulate_tilt_series(volume, ANGLES, dose_per_px=3.0, seed=0, samples_per_voxel=1.0)
    assert np.array_equal(sim.noisy, np.round(sim.noisy)) and abs(sim.noisy.mean() - 3.0) < 0.1
    result = run_fit(Fitter(TiltSeries(sim.noisy, ANGLES), _config(epochs=4, loss="poisson")))
    assert np.isfinite(result.report["best_validation_loss"]) and result.report["best_validation_loss"] > 0


def test_pixel_rows_cover_what_a_large_rotation_can_bring_into_the_band(shifted_series):
    series, _ = shifted_series
    fitter = Fitter(series, _config(epochs=1, lattice_rows=8))
    band = slice(16, 24)
    narrow = fitter.scale.pixel_rows(band, fitter.reach_px())
    assert narrow != slice(0, series.shape[0])  # small deformations: a narrow window
    # An epoch's window allows for the steps to come: about twice a learning rate per step and parameter.
    fitter.epoch = fitter.config.fit.warmup_epochs
    fitter.optimisers.set_learning_rates(fitter.epoch, fitter.config.fit, fitter.lr_factor)
    per_step = math.sqrt(2) * fitter.config.fit.lr_shift_px  # only shifts are fitted here
    assert fitter.reach_px(steps=3) - fitter.reach_px() == pytest.approx(2 * 3 * per_step)
    with torch.no_grad():
        fitter.deformations.angles += math.pi / 2  # a tilt axis along x: any row can see the band
    assert fitter.scale.pixel_rows(band, fitter.reach_px()) == slice(0, series.shape[0])


def test_out_of_memory_splits_the_rays_batch_and_gives_up_clearly(shifted_series):
    series, _ = shifted_series
    fitter = Fitter(series, _config(epochs=1, renderer="rays", rays_per_tilt=100))
    calls = _failing_when(fitter, lambda f, coords, rows: coords.shape[0] > 1)
    report = run_fit(fitter).report
    assert report["step_chunks"] == 4 and max(calls[-5:]) == 1
    hopeless = Fitter(series, _config(epochs=1, renderer="rays", rays_per_tilt=100))
    _failing_when(hopeless, lambda f, coords, rows: True)
    with pytest.raises(IcetideError, match="out of memory on cpu even with the smallest batch"):
        run_fit(hopeless)


def test_robust_spread_ignores_outliers_and_equals_std_without_them():
    from icetide.fit import robust_spread

    images = torch.randn(5, 64, 64, generator=torch.Generator().manual_seed(0)) * 3.0 + 7.0
    assert robust_spread(images) == pytest.approx(float(images.double().std()), rel=1e-6)
    hot = images.clone()
    hot.view(-1)[::997] = 1e6  # 0.1 % hot pixels
    assert float(hot.std()) > 1000 and robust_spread(hot) == pytest.approx(3.0, rel=0.1)
    assert robust_spread(torch.ones(2, 8, 8)) == 1.0
    # An object in a mostly empty field: the MAD describes the background, the object must still set the scale.
    sparse = torch.randn(4, 64, 64, generator=torch.Generator().manual_seed(1)) * 0.01
    sparse[:, 20:44, 28:36] += 100.0  # 12 % of the pixels
    assert robust_spread(sparse) == pytest.approx(float(sparse.double().std()), rel=0.02)


def test_intensity_offset_is_recovered(shifted_series):
    """A series stored with a constant offset of 4 standard deviations: the offset comes back."""
    series, _ = shifted_series
    spread = float(np.std(series.images))
    shifted = TiltSeries(series.images + np.float32(4 * spread), ANGLES)
    config = _config(epochs=30, patience=30, lr_offset=0.2)
    config.deform.offset = True
    config.deform.shifts = False
    report = run_fit(Fitter(shifted, config)).report
    assert report["intensity_offset"] == pytest.approx(4 * spread, rel=0.1)


def test_per_tilt_intensity_levels_are_recovered(shifted_series):
    """Each tilt stored on its own level (0 to 3 standard deviations): the levels come back, one per tilt."""
    series, _ = shifted_series
    spread = float(np.std(series.images))
    levels = np.linspace(0, 3, len(ANGLES)) * spread
    shifted = TiltSeries(series.images + levels[:, None, None].astype(np.float32), ANGLES)
    config = _config(epochs=40, patience=40, lr_offset=0.2)
    config.deform.offset = "per_tilt"
    config.deform.shifts = False
    report = run_fit(Fitter(shifted, config)).report
    found = np.asarray(report["intensity_offset"])
    assert found.shape == (len(ANGLES),)
    # A constant density c projects to c t / cos(theta): it trades with levels a + b / cos(theta), which the
    # data cannot tell apart; the rest of the levels must come back.
    basis = np.stack([np.ones(len(ANGLES)), 1 / np.cos(np.deg2rad(ANGLES))], axis=1)
    error = found - levels
    residual = error - basis @ np.linalg.lstsq(basis, error, rcond=None)[0]
    assert np.abs(residual).max() < 0.25 * spread  # of levels spanning 3 spreads
    assert np.corrcoef(found, levels)[0, 1] > 0.95


def test_cos_tilt_weighting_weights_each_tilt_by_its_cosine(shifted_series):
    series, _ = shifted_series
    fitter = Fitter(series, _config(epochs=1, tilt_weighting="cos"))
    cos = np.cos(np.deg2rad(ANGLES))
    np.testing.assert_allclose(fitter.problem.tilt_weights.numpy(), cos / cos.mean(), rtol=1e-6)
    plain = Fitter(series, _config(epochs=1))
    for f in (fitter, plain):
        _deterministic_render(f)
    high = torch.tensor([0])  # -60 degrees
    ratio = float(fitter.step_gradients(fitter.scale, high)[0]) / float(plain.step_gradients(plain.scale, high)[0])
    assert ratio == pytest.approx(0.5 / cos.mean(), rel=1e-5)


def test_ctf_forward_model_filters_each_whole_predicted_image_and_learns_through_it(shifted_series):
    from icetide.ctf import Microscope, SeriesCtf

    series, _ = shifted_series
    defocus = np.linspace(9000.0, 11000.0, len(ANGLES))
    with_ctf = TiltSeries(series.images, ANGLES, 3.0, defocus_A=defocus)
    config = _config(epochs=2)
    config.ctf.correction = "model"
    fitter = Fitter(with_ctf, config)
    assert fitter.forward.ctf is not None
    tilts = torch.tensor([1, 7])
    rows = slice(0, SHAPE[1])
    torch.manual_seed(0)
    values, _, pick = fitter.forward.predict(fitter.scale, tilts, jitter=False, rows=rows)
    fitter.forward.ctf = None
    plain, _, _ = fitter.forward.predict(fitter.scale, tilts, jitter=False, rows=rows)
    assert pick == rows
    scale = with_ctf.images.std()  # the fit's normalisation only scales; the filter is linear
    ctf = SeriesCtf(ANGLES, 3.0, defocus, Microscope())
    for b, m in enumerate(tilts.tolist()):
        expected = ctf(plain[b].view(SHAPE[1:]).double(), m).reshape(-1)
        torch.testing.assert_close(values[b].double(), expected.to(values.dtype).double(), atol=1e-5 * scale, rtol=1e-4)
    # Gradients reach the volume through the filter.
    fitter.forward.ctf = ctf
    fitter.optimisers.zero_grad()
    values, _, _ = fitter.forward.predict(fitter.scale, tilts, jitter=False, rows=rows)
    values.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in fitter.volume.parameters())
    config.fit.renderer = "rays"
    with pytest.raises(IcetideError, match="CTF forward model filters whole images"):
        Fitter(with_ctf, config)


@pytest.mark.parametrize("renderer", ["lattice", "rays"])
def test_two_half_series_each_volume_learns_from_its_own_series_only(shifted_series, renderer):
    series, _ = shifted_series
    rng = np.random.default_rng(4)
    halves = TiltSeries(series.images + rng.normal(0, 0.1, series.images.shape), ANGLES,
                        half_images=series.images - rng.normal(0, 0.1, series.images.shape))
    fitter = Fitter(halves, _config(epochs=1, half_maps="series", renderer=renderer, rays_per_tilt=200))
    assert fitter.problem.half_mask is None and fitter.half_volume is not None
    tilts, state = torch.arange(len(ANGLES)), fitter.sampler.get_state()

    def gradients():
        fitter.sampler.set_state(state)
        loss, count = fitter.step_gradients(fitter.scale, tilts)
        return loss, [[p.grad.clone() for p in v.parameters()] for v in fitter.volumes], fitter.deformations.shifts.grad.clone()

    loss, before, shift_grad = gradients()
    assert float(loss) > 0 and shift_grad.abs().sum() > 0  # the shared deformations learn from both series
    with torch.no_grad():  # change only the second series
        fitter.problem.half_images += 1.0
    _, after, _ = gradients()
    for a, b in zip(before[0], after[0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)  # the first volume does not see it
    assert any(not torch.allclose(a, b) for a, b in zip(before[1], after[1]))  # the second does
    assert np.isfinite(fitter.validation_loss())
    with pytest.raises(IcetideError, match="needs the second half series"):
        Fitter(series, _config(epochs=1, half_maps="series"))
    with pytest.raises(IcetideError, match="a second half series needs"):
        Fitter(halves, _config(epochs=1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("renderer, precision", [("lattice", "fp32"), ("lattice", "mixed"), ("rays", "fp32")])
def test_a_training_step_never_waits_for_the_gpu(shifted_series, renderer, precision):
    """Under CUDA's sync debug mode "error", any host synchronisation in a training step raises."""
    series, _ = shifted_series
    fitter = Fitter(series, _config(epochs=2, device="cuda", renderer=renderer, precision=precision,
                                    lattice_rows=16, warmup_epochs=0, tilts_per_step=16,
                                    recompute_field=precision == "mixed"))
    bands = fitter.epoch_bands(fitter.scale)[0] if renderer == "lattice" else None
    tilts = torch.randperm(len(ANGLES))
    reach = fitter.reach_px(steps=1)

    def step():
        loss, _ = fitter.step_gradients(fitter.scale, tilts, bands, reach)
        finite_or_zeroed(loss, fitter.parameters())
        fitter.optimisers.volume.step()
        fitter.optimisers.deform.step()

    step()  # first use: kernels compile, the projector's matrices are built (both wait, once)
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("renderer, mode, passes", [("lattice", "steps", 0), ("lattice", "pass", 6),
                                                    ("rays", "steps", 6)])
def test_validation_scores_the_held_out_pixels_in_the_steps_or_by_a_pass(shifted_series, renderer, mode, passes,
                                                                         monkeypatch):
    """fit.validation: steps scores the held-out pixels from the training steps' own predictions (lattice),
    with no extra pass; pass (and the rays renderer, whose steps render few of them) runs one per epoch."""
    series, _ = shifted_series
    config = _config(epochs=6, patience=10, renderer=renderer, validation=mode, rays_per_tilt=400)
    fitter = Fitter(series, config)
    calls = []
    separate = fitter.validation_loss
    monkeypatch.setattr(fitter, "validation_loss", lambda scale=None: calls.append(1) or separate(scale))
    result = run_fit(fitter)
    assert len(calls) == passes
    vals = result.report["curves"]["val_loss"]
    assert len(vals) == 6 and all(math.isfinite(v) for v in vals)
    assert vals[-1] < vals[0]


def test_the_held_out_loss_of_the_steps_tracks_a_separate_pass(shifted_series):
    """The two estimates differ by the steps' sub-voxel jitter and by coming before each step's update."""
    series, _ = shifted_series
    fitter = Fitter(series, _config(epochs=12))
    for _ in range(12):
        fitter.train_epoch()
    in_steps = fitter.epoch_validation_loss(fitter.scale, rolled_back=False)
    by_pass = fitter.validation_loss()
    assert in_steps == pytest.approx(by_pass, rel=0.15)
    assert fitter.epoch_validation_loss(fitter.scale, rolled_back=True) == by_pass


# ----------------------------------------------------------------- binned epochs (fit.binned_epochs)
@pytest.mark.parametrize("n", [6, 7])
def test_binning_by_two_averages_two_pixel_windows_centred_on_the_binned_grid(n):
    """A ramp binned by 2 is the ramp at the binned pixel centres, 2 (k - (m - 1) / 2) unbinned pixels from the
    centre, on even and odd axes; a mask pixel marks every binned pixel whose window it lies in."""
    v, u = torch.meshgrid(centered_coords(n, dtype=torch.float64), centered_coords(n + 1, dtype=torch.float64),
                          indexing="ij")
    binned = bin_by_two((0.3 * u - 1.7 * v + 2.0)[None])
    bv, bu = torch.meshgrid(*(2 * centered_coords(k // 2, dtype=torch.float64) for k in (n, n + 1)), indexing="ij")
    assert binned.shape == (1, n // 2, (n + 1) // 2)
    torch.testing.assert_close(binned[0], 0.3 * bu - 1.7 * bv + 2.0, rtol=0, atol=1e-12)
    mask = torch.zeros(n, n + 1, dtype=torch.bool)
    mask[2, 3] = True
    marked = bin_by_two(mask, "any").nonzero().tolist()
    # row 2 lies in the pair (2, 3) of an even axis, in the windows centred on rows 1 and 3 of an odd one
    assert marked == ([[1, 1]] if n % 2 == 0 else [[0, 1], [1, 1]])
    with pytest.raises(ValueError, match="bin"):
        bin_by_two(torch.zeros(1, 1, 4))


class _Blob:
    """A field with a known lattice: a Gaussian blob (sigma 4 voxels) off the centre of the box."""

    def __init__(self, shape_zyx):
        self.box_shape_zyx = shape_zyx

    def lattice(self, offset_vox, rows=None, recompute_voxels=None, step=1):
        z, y, x = (step * (centered_coords(n // step, dtype=torch.float64) + offset_vox[2 - a])
                   for a, n in enumerate(self.box_shape_zyx))
        y = y[rows]
        r2 = (x[None, None] - 5.0) ** 2 + (y[None, :, None] + 3.0) ** 2 + (z[:, None, None] - 1.0) ** 2
        return torch.exp(-r2 / 32).float()


def test_a_binned_epoch_predicts_the_binned_series(shifted_series):
    """With shifts and rotations, the binned prediction (every other voxel, coordinates halved) is the binning of
    the unbinned prediction, up to interpolation."""
    series, _ = shifted_series
    fitter = Fitter(series, _config(epochs=4, binned_epochs=1))
    fitter.volume = _Blob(fitter.model_shape_zyx)
    with torch.no_grad():
        fitter.deformations.shifts.copy_(torch.tensor([[3.0, -1.5]]).expand_as(fitter.deformations.shifts))
        fitter.deformations.angles.add_(math.radians(7.0))
    tilts = torch.tensor([0, 6, 11])
    ny, nx = fitter.problem.detector_shape
    predictions = []
    for epoch in (0, 1):  # binned, then not
        fitter.epoch = epoch
        scale = fitter.scale
        assert scale.factor == 2 - epoch and scale.shape == (ny // scale.factor, nx // scale.factor)
        with torch.no_grad():
            values, valid, _ = fitter.forward.predict(fitter.scale, tilts, jitter=False, rows=slice(0, scale.shape[0]))
        predictions.append((values.view(3, *scale.shape), valid.view(3, *scale.shape)))
    (binned, binned_valid), (full, full_valid) = predictions
    expected = bin_by_two(full)
    both = binned_valid & bin_by_two(~full_valid, "any").logical_not()
    assert both.float().mean() > 0.6
    error = (binned - expected)[both].abs().max() / expected.abs().max()
    assert error < 0.03, error  # 0.022 measured (the lattice samples every other voxel); 0.81 unhalved


def test_binned_epochs_come_first_and_are_validated_on_their_own(shifted_series, tmp_path):
    series, _ = shifted_series
    fitter = Fitter(series, _config(epochs=5, binned_epochs=2))
    assert [s.factor for s in fitter.scales] == [1, 2] and fitter.scale.factor == 2
    binned = fitter.scales[1]
    assert torch.equal(binned.held_out, bin_by_two(fitter.problem.validation_mask, "any"))
    result = run_fit(fitter, checkpoint_path=tmp_path / "checkpoint.pt")
    val, binned_val = result.report["curves"]["val_loss"], result.report["curves"]["binned_val_loss"]
    assert all(math.isnan(v) for v in val[:2]) and all(math.isfinite(v) for v in val[2:])
    assert all(math.isfinite(v) for v in binned_val[:2]) and all(math.isnan(v) for v in binned_val[2:])
    assert result.report["best_epoch"] > 2 and fitter.scale.factor == 1
    # A resumed fit rebuilds the binned series from the checkpoint's held-out pixels.
    resumed = Fitter(series, _config(epochs=5, binned_epochs=2))
    resumed.load_checkpoint(tmp_path / "checkpoint.pt")
    assert torch.equal(resumed.scales[1].held_out, binned.held_out)
    # Half maps of alternate tilts: the binned mask of each tilt is its half's.
    halves = Fitter(series, _config(epochs=3, binned_epochs=2, half_maps="tilts"))
    assert torch.equal(halves.scales[1].half_mask[:, 0, 0], halves.problem.half_mask[:, 0, 0])
    assert math.isfinite(run_fit(halves).report["curves"]["val_loss"][-1])
    for bad in ({"renderer": "rays"}, {"half_maps": "pixels"}):
        with pytest.raises(IcetideError, match="binned_epochs"):
            Fitter(series, _config(epochs=5, binned_epochs=2, **bad))
        assert Fitter(series, _config(epochs=500, binned_epochs=None, **bad)).binned_epochs == 0  # where it applies
    planned = Fitter(series, _config(epochs=500, binned_epochs=None))
    assert planned.binned_epochs == 80 and planned.level_epochs == 80  # the levels enter over the binned stage
    assert Fitter(series, _config(epochs=500, binned_epochs=None, renderer="rays")).level_epochs == 0
    assert Fitter(series, _config(epochs=500, binned_epochs=None, coarse_to_fine_epochs=6)).level_epochs == 6
    assert Fitter(series, _config(epochs=9, binned_epochs=None)).binned_epochs == 4  # at most half of the epochs


def test_the_binned_stage_ends_early_at_its_best_state(shifted_series):
    """Binned held-out losses 1, 2 with patience 1 and no warm-up: the stage ends after epoch 2, 8 epochs before
    its plan, and the fit goes on from the state of epoch 1 (epoch 2 is undone)."""
    series, _ = shifted_series
    fitter = Fitter(series, _config(epochs=2, binned_epochs=10, patience=1, warmup_epochs=0))
    losses, kept = iter([1.0, 2.0]), []
    fitter.epoch_validation_loss = lambda scale, rolled_back: next(losses)
    result = run_fit(fitter, on_epoch=lambda info: kept.append(fitter.snapshot()))
    assert result.report["binned_epochs"] == 2 and result.report["curves"]["binned_val_loss"] == [1.0, 2.0]
    assert fitter.binned_stopping.best == 1.0
    assert not torch.equal(kept[0]["shifts_px"], fitter.deformations.start["shifts_px"])  # epoch 1 moved them
    assert torch.equal(fitter.deformations.shifts.detach(), kept[0]["shifts_px"])
    for name, value in fitter.volume.state_dict().items():
        assert torch.equal(value, kept[0]["volume"][name]), name


@pytest.mark.parametrize("local, stopped_after", [(False, 3), (True, 6)])
def test_early_stopping_counts_from_the_release_of_the_last_deformation(shifted_series, local, stopped_after):
    """Held-out losses 1, then 2 forever, patience 2, warm-up 1 epoch: without local fields the fit stops after
    epoch 3 (epochs 2 and 3 did not improve); with local fields released 3 epochs later (epoch 5), after epoch 6.
    Either way the best state is epoch 1's."""
    series, _ = shifted_series
    config = _config(epochs=20, patience=2, warmup_epochs=1, local_delay_epochs=3)
    config.deform = config.deform.model_copy(update={"local": local})
    fitter = Fitter(series, config)
    losses = iter([1.0] + [2.0] * 19)
    fitter.epoch_validation_loss = lambda scale, rolled_back: next(losses)
    result = run_fit(fitter)
    assert result.report["epochs"] == stopped_after and result.report["best_epoch"] == 1
    assert result.report["stop_reason"] == "early stopping (validation loss stopped improving)"
