"""CTF, defocus across tilted images, phase flipping, exposure weighting, and their use in simulation."""

import math

import numpy as np
import pytest
import torch

from icetide.ctf import (
    Microscope,
    critical_exposure,
    ctf_2d,
    defocus_offsets_A,
    dose_symmetric_order,
    electron_wavelength_A,
    exposure_attenuation,
    exposure_weight_series,
    filter_tilted,
    phase_flip_series,
    pre_exposure_from_order,
)
from icetide.errors import IcetideError
from icetide.simulate import Optics, project_deformed, simulate_tilt_series


def test_wavelength_matches_the_relativistic_values():
    assert electron_wavelength_A(300) == pytest.approx(0.019687, abs=2e-6)
    assert electron_wavelength_A(200) == pytest.approx(0.025079, abs=2e-6)


def test_ctf_is_the_amplitude_contrast_at_zero_and_vanishes_where_the_phase_is_pi():
    scope = Microscope(300, 0.0, 0.07)  # Cs = 0: the zeros have a closed form
    defocus, pixel, n = 20000.0, 2.0, 256
    ctf = ctf_2d((n, n), pixel, defocus, microscope=scope)
    assert float(ctf[0, 0]) == pytest.approx(0.07)
    k = torch.fft.rfftfreq(n, d=pixel, dtype=torch.float64)
    first_zero = math.sqrt((math.pi - math.asin(0.07)) / (math.pi * scope.wavelength_A * defocus))
    row = ctf[0].numpy()
    crossing = int(np.flatnonzero(np.diff(np.sign(row)))[0])
    assert float(k[crossing]) <= first_zero <= float(k[crossing + 1])
    expected = np.sin(math.pi * scope.wavelength_A * defocus * k.numpy() ** 2 + math.asin(0.07))
    np.testing.assert_allclose(row, expected, atol=1e-12)


def test_astigmatism_puts_defocus_u_along_its_angle():
    shape, pixel = (64, 64), 4.0
    astig = ctf_2d(shape, pixel, 30000.0, 20000.0, 90.0)  # U along the image Y axis
    along_y = ctf_2d(shape, pixel, 30000.0)
    along_x = ctf_2d(shape, pixel, 20000.0)
    np.testing.assert_allclose(astig[1:20, 0], along_y[1:20, 0], atol=1e-12)  # frequencies along ky
    np.testing.assert_allclose(astig[0, 1:20], along_x[0, 1:20], atol=1e-12)  # along kx
    batch = ctf_2d(shape, pixel, [30000.0, 20000.0])
    assert batch.shape == (2, 64, 33)
    np.testing.assert_allclose(batch[1], along_x, atol=1e-12)


def test_defocus_offsets_follow_the_convention():
    pixel = 2.0
    offsets = defocus_offsets_A((5, 21), pixel, 30.0)
    # column 20 is u = +10 px from the axis: hand +1 puts it 10 * 2 * tan(30) A closer to focus.
    assert float(offsets[2, 20]) == pytest.approx(-pixel * 10 * math.tan(math.radians(30)))
    assert float(offsets[0, 10]) == pytest.approx(0.0)
    assert float(defocus_offsets_A((5, 21), pixel, 30.0, defocus_hand=-1)[2, 20]) == pytest.approx(-float(offsets[2, 20]))
    # A tilt axis turned by 90 degrees: the distance from it is v, rows instead of columns.
    turned = defocus_offsets_A((21, 5), pixel, 30.0, tilt_axis_angle_deg=90.0)
    assert float(turned[20, 2]) == pytest.approx(float(offsets[2, 20]))
    # A point above the mid-plane is further from the lens: more underfocus by height / cos(theta).
    raised = defocus_offsets_A((5, 21), pixel, 30.0, height_vox=3.0)
    assert float(raised[2, 10]) == pytest.approx(pixel * 3.0 / math.cos(math.radians(30)))


def _uniform(image: torch.Tensor, pixel: float, defocus: float, scope: Microscope) -> torch.Tensor:
    transfer = ctf_2d(tuple(image.shape), pixel, defocus, microscope=scope)
    return torch.fft.irfft2(torch.fft.rfft2(image.double()) * transfer, s=tuple(image.shape))


def test_untilted_filter_is_the_plain_ctf_and_flipping_twice_is_the_identity():
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(48, 64, generator=gen, dtype=torch.float64)
    scope = Microscope()
    out = filter_tilted(image, 3.0, (25000.0, 25000.0, 0.0), 0.0, scope, "ctf")
    torch.testing.assert_close(out, _uniform(image, 3.0, 25000.0, scope))
    flipped = filter_tilted(image, 3.0, (25000.0, 25000.0, 0.0), 0.0, scope, "flip")
    torch.testing.assert_close(filter_tilted(flipped, 3.0, (25000.0, 25000.0, 0.0), 0.0, scope, "flip"), image)


def test_a_tilted_image_is_filtered_at_each_pixels_own_defocus():
    """A point 110 px right of the tilt axis at 60 degrees sees the CTF of its own defocus, not the nominal one."""
    scope, pixel, n = Microscope(), 2.0, 256
    image = torch.zeros(n, n, dtype=torch.float64)
    col = n // 2 + 110
    image[n // 2, col] = 1.0
    out = filter_tilted(image, pixel, (20000.0, 20000.0, 0.0), 60.0, scope, "ctf", phase_tolerance_rad=math.pi / 32)
    local = 20000.0 + float(defocus_offsets_A((n, n), pixel, 60.0)[0, col])
    assert local < 20000.0 - 350  # 1.5 rad of CTF phase at Nyquist: the nominal CTF would be wrong here
    window = (slice(n // 2 - 6, n // 2 + 7), slice(col - 6, col + 7))
    expected = _uniform(image, pixel, local, scope)[window]
    nominal = _uniform(image, pixel, 20000.0, scope)[window]
    error = float((out[window] - expected).norm() / expected.norm())
    assert error < 0.05
    assert error < 0.2 * float((nominal - expected).norm() / expected.norm())


def test_phase_flipping_restores_the_correlation_with_the_object():
    gen = torch.Generator().manual_seed(1)
    obj = torch.nn.functional.avg_pool2d(torch.rand(1, 1, 96, 96, generator=gen, dtype=torch.float64), 3, 1, 1)[0, 0]
    scope, pixel = Microscope(), 3.0
    angles = np.array([-40.0, 0.0, 40.0])
    defocus = np.array([30000.0, 32000.0, 28000.0])
    imaged = torch.stack([filter_tilted(obj, pixel, (d, d, 0.0), a, scope, "ctf") for d, a in zip(defocus, angles)])
    flipped = phase_flip_series(imaged, angles, pixel, defocus, scope)

    def cc(a, b):
        a, b = a - a.mean(), b - b.mean()
        return float((a * b).sum() / (a.norm() * b.norm()))

    for m in range(3):
        assert cc(flipped[m], obj) > cc(imaged[m], obj) + 0.2
    with pytest.raises(IcetideError, match="defocus for 2 views, the series has 3"):
        phase_flip_series(imaged, angles, pixel, defocus[:2], scope)


def test_critical_exposure_and_attenuation():
    k = torch.tensor([0.1], dtype=torch.float64)
    ne = 0.245 * 0.1**-1.665 + 2.81
    assert float(critical_exposure(k)[0]) == pytest.approx(ne)
    assert float(critical_exposure(k, 200.0)[0]) == pytest.approx(0.8 * ne)
    weights = exposure_attenuation((20, 20), 5.0, [0.0, 2 * ne])
    assert weights.shape == (2, 20, 11)
    assert float(weights[1, 0, 0]) == 1.0  # nothing fades at zero frequency
    torch.testing.assert_close(weights[0], torch.ones(20, 11, dtype=torch.float64))
    assert float(weights[1, 0, 10]) == pytest.approx(math.exp(-1.0))  # kx = 0.5 / 5 A = 0.1 / A at column 10
    images = torch.randn(2, 20, 20, dtype=torch.float64)
    weighted = exposure_weight_series(images, 5.0, [0.0, 50.0])
    torch.testing.assert_close(weighted[0], images[0])
    assert float(weighted[1].norm()) < float(images[1].norm())


def test_dose_symmetric_order_and_pre_exposure():
    angles = np.array([-6.0, -4.0, -2.0, 0.0, 2.0, 4.0, 6.0])
    order = dose_symmetric_order(angles)
    np.testing.assert_array_equal(order, [6, 4, 2, 0, 1, 3, 5])
    np.testing.assert_allclose(pre_exposure_from_order(order, 2.5), [15, 10, 5, 0, 2.5, 7.5, 12.5])


def _box():
    vol = np.zeros((12, 32, 32), np.float32)
    vol[4:8, 10:20, 12:22] = 1.0
    vol[6:9, 22:26, 6:10] = 0.5
    return vol


def test_layers_sum_to_the_line_integral():
    vol = _box()
    angles = np.array([-45.0, 0.0, 30.0])
    whole = project_deformed(vol, angles)
    layered = project_deformed(vol, angles, n_slabs=5, image_formation=lambda m, layers: layers.sum(0))
    torch.testing.assert_close(layered, whole, atol=1e-5, rtol=1e-5)


def test_simulated_ctf_keeps_the_deformations_and_scales_the_mean_by_the_amplitude_contrast():
    vol, angles = _box(), np.arange(-45.0, 46.0, 15.0)
    plain = simulate_tilt_series(vol, angles, seed=3)
    optics = Optics(pixel_size_A=4.0, defocus_um=2.0, defocus_spread_um=0.1, total_exposure_e_per_A2=60.0)
    ctf = simulate_tilt_series(vol, angles, seed=3, optics=optics)
    np.testing.assert_array_equal(ctf.deformations.shifts_px, plain.deformations.shifts_px)
    assert ctf.defocus_A.shape == (7,) and np.all(np.abs(ctf.defocus_A - 2e4) <= 1e3)
    np.testing.assert_allclose(ctf.pre_exposure_e_per_A2, [60 / 7 * i for i in (6, 4, 2, 0, 1, 3, 5)])
    # Zero frequency: CTF(0) = A and no damage, so every image's mean is A times the line integrals' mean (up to
    # the interpolation between defocus values across a tilted image, which is not a convolution).
    np.testing.assert_allclose(ctf.clean.mean(axis=(1, 2)), 0.07 * plain.clean.mean(axis=(1, 2)), rtol=2e-3)
    with pytest.raises(IcetideError, match="counting noise"):
        simulate_tilt_series(vol, angles, seed=3, optics=optics, dose_per_px=5.0)
    with pytest.raises(IcetideError, match="defocus hand"):
        Optics(pixel_size_A=4.0, defocus_hand=0)


def test_correct_optics_applies_only_what_is_known_and_asked_for():
    from icetide import TiltSeries
    from icetide.config import ReconstructConfig
    from icetide.correction import correct_optics

    images = np.random.default_rng(0).standard_normal((3, 16, 16)).astype(np.float32)
    angles = np.array([-30.0, 0.0, 30.0])
    config = ReconstructConfig()
    plain = TiltSeries(images, angles, 4.0)
    assert correct_optics(plain, config) == (plain, {"correction": "none", "exposure_weighting": False})
    with_defocus = TiltSeries(images, angles, 4.0, defocus_A=np.full(3, 20000.0), pre_exposure_e_per_A2=[0, 3, 6])
    flipped, info = correct_optics(with_defocus, config)
    assert info["correction"] == "phaseflip" and not info["exposure_weighting"]
    np.testing.assert_allclose(
        flipped.images, phase_flip_series(torch.from_numpy(images), angles, 4.0, np.full(3, 20000.0)).numpy()
    )
    config.ctf.correction = "model"
    assert correct_optics(with_defocus, config)[0] is with_defocus  # the fit applies the CTF itself
    np.testing.assert_allclose(correct_optics(with_defocus, config, for_fit=False)[0].images, flipped.images)
    config.ctf.correction = "none"
    config.ctf.exposure_weighting = True
    weighted, info = correct_optics(with_defocus, config)
    assert info["correction"] == "none" and info["exposure_weighting"]
    np.testing.assert_allclose(weighted.images, exposure_weight_series(torch.from_numpy(images), 4.0, [0, 3, 6]).numpy())
    with pytest.raises(IcetideError, match="needs the pixel size"):
        correct_optics(TiltSeries(images, angles, defocus_A=np.full(3, 2e4), pre_exposure_e_per_A2=[0, 3, 6]), config)
    with pytest.raises(IcetideError, match="defocus values must be finite underfocus"):
        TiltSeries(images, angles, 4.0, defocus_A=[2e4, -1.0, 2e4])
