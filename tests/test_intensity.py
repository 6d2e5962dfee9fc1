import numpy as np
import pytest
import torch

from icetide.errors import IcetideError
from icetide.intensity import fit_contrast, has_levels, highpass, output_polarity


def _counts(seed=0, levels=(40.0, 16.0, 25.0)):
    rng = np.random.default_rng(seed)
    contrast = rng.normal(0, 0.05, (len(levels), 32, 40))
    return (np.asarray(levels)[:, None, None] * (1 + contrast)).astype(np.float32), contrast


def test_counts_on_a_level_are_detected_inverted_or_not():
    counts, contrast = _counts()
    assert has_levels(counts) and has_levels(-counts)
    assert not has_levels(contrast)  # zero-mean data
    mixed = counts.copy()
    mixed[1] *= -1
    assert not has_levels(mixed)  # levels of both signs are no level


def test_relative_contrast_undoes_each_tilts_level_and_keeps_the_sign():
    counts, contrast = _counts()
    out, info = fit_contrast(counts, "auto", 0.0)
    assert info["levels"] == "per_tilt"
    expected = contrast - contrast.mean(axis=(1, 2), keepdims=True)
    scale = 1 + contrast.mean(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(out, expected / scale, atol=1e-5)
    inverted, _ = fit_contrast(-counts, "auto", 0.0)
    np.testing.assert_allclose(inverted, -out, atol=1e-5)


def test_levels_none_and_zero_levels():
    counts, _ = _counts()
    out, info = fit_contrast(counts, "none", 0.0)
    assert info["levels"] == "none"
    np.testing.assert_array_equal(out, counts)
    with pytest.raises(IcetideError, match="non-zero level"):
        fit_contrast(counts - counts.mean(axis=(1, 2), keepdims=True), "per_tilt", 0.0)


def test_highpass_removes_broad_features_and_keeps_fine_ones():
    y, x = np.mgrid[0:64, 0:64].astype(np.float32)
    ramp = 0.05 * x + 0.02 * y + 3.0  # a broad gradient and a level
    fine = np.where((x + y) % 2 == 0, 1.0, -1.0).astype(np.float32)  # the finest checkerboard
    out = highpass(torch.tensor(np.stack([ramp, fine])), sigma_px=6.0).numpy()
    inner = (slice(20, 44), slice(20, 44))  # away from the mirrored edges
    assert np.abs(out[0][inner]).max() < 1e-3
    np.testing.assert_allclose(out[1][inner], fine[inner], atol=1e-3)
    same = torch.tensor(np.stack([ramp]))
    assert highpass(same, 0.0) is same


def test_output_polarity_flips_only_inverted_input_asked_as_the_input():
    sign, label = output_polarity("bright", False)
    assert (sign, label) == output_polarity("input", False)
    assert sign == 1.0 and label.startswith("icetide: density bright") and label.endswith("as in the input images")
    sign, label = output_polarity("bright", True)
    assert sign == 1.0 and label.startswith("icetide: density bright (positive = dense)") and "inverted" in label
    sign, label = output_polarity("input", True)
    assert sign == -1.0 and label.startswith("icetide: density dark (negative = dense)")
    assert all(len(output_polarity(p, i)[1]) <= 80 for p in ("bright", "input") for i in (False, True))
    with pytest.raises(IcetideError, match="bright or input"):
        output_polarity("dark", False)
