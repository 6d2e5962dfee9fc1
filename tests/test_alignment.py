"""Alignment conversions checked against independent re-implementations of each tool's definition."""

import math

import numpy as np
import pytest
import starfile
import torch
from scipy.ndimage import affine_transform, gaussian_filter

from icetide.alignment import (
    deformations_for_stack,
    aln_to_deformations,
    deformations_to_relion,
    deformations_to_xf,
    relion_to_deformations,
    xf_to_deformations,
)
from icetide.deform import Deformations, unwarp_images
from icetide.errors import IcetideError
from icetide.geometry import project_points
from icetide.io.aretomo import AlnFile
from icetide.io.relion import read_relion_tilt_series_star, write_relion_tilt_series_star


def _deformations(m=5, shape=(40, 52), seed=0, max_angle_deg=20.0):
    rng = np.random.default_rng(seed)
    return Deformations(
        np.linspace(-50, 50, m),
        rng.uniform(-6, 6, size=(m, 2)),
        rng.uniform(-max_angle_deg, max_angle_deg, size=m),
        rng.normal(size=(m, 2, 3, 3)),  # a local field the global formats must ignore
        shape,
    )


def _newstack_apply(image: np.ndarray, xf_row: np.ndarray) -> np.ndarray:
    """Apply one .xf line the way IMOD's newstack does (libcfshr/cubinterp.c, linear interpolation).

    IMOD coordinates run from 0 at the left edge of the first pixel, so pixel i's centre is at i + 0.5;
    newstack passes the centre nx/2, ny/2 and maps X' - c = A (X - c) + D from raw to aligned, sampling the
    raw image at X = A^-1 (X' - c - D) + c for every output pixel. Y is the line index in the file.
    """
    ny, nx = image.shape
    a_inv = np.linalg.inv(xf_row[:, :2])
    centre = np.array([nx / 2, ny / 2])
    offset_xy = a_inv @ (0.5 - centre - xf_row[:, 2]) + centre - 0.5  # input index = a_inv @ out + offset
    return affine_transform(
        image, a_inv[::-1, ::-1], offset=offset_xy[::-1], order=1, mode="constant", cval=np.nan
    )


@pytest.mark.parametrize("shape", [(40, 52), (41, 37)])
def test_xf_applied_like_newstack_equals_unwarp_images(shape):
    d = _deformations(shape=shape)
    rng = np.random.default_rng(1)
    observed = gaussian_filter(rng.standard_normal((d.n_tilts, *shape)), (0, 2, 2))
    t = d.tensors()
    ours = unwarp_images(torch.tensor(observed, dtype=torch.float32), t["shifts_px"], t["angles_rad"], None).numpy()
    xf = deformations_to_xf(d)
    for m in range(d.n_tilts):
        ref = _newstack_apply(observed[m], xf[m])
        # interior: pixels whose bilinear source lies inside the image (NaN marks the rest)
        inside = np.isfinite(ref)
        assert inside.mean() > 0.4
        np.testing.assert_allclose(ours[m][inside], ref[inside], atol=2e-5)


def test_xf_moves_a_point_where_icetide_says():
    # a feature at observed pixel x lands at x' = R(alpha) x - tau in the aligned image
    ny, nx = 33, 47
    d = Deformations([0.0], [[3.0, -2.0]], [90.0], np.zeros((1, 2, 2, 2)), (ny, nx))
    image = np.zeros((ny, nx))
    image[16 + 5, 23 + 8] = 1.0  # u = 8, v = 5
    aligned = np.nan_to_num(_newstack_apply(image, deformations_to_xf(d)[0]))
    r, c = np.unravel_index(aligned.argmax(), aligned.shape)
    u, v = -5 - 3.0, 8 + 2.0  # R(90 deg)(8, 5) - (3, -2)
    assert (r, c) == (16 + v, 23 + u)


def test_xf_round_trip_is_exact():
    d = _deformations(m=7, max_angle_deg=179.0)
    e = xf_to_deformations(deformations_to_xf(d), d.tilt_angles_deg, d.detector_shape, grid=(4, 5))
    np.testing.assert_allclose(e.angles_deg, d.angles_deg, rtol=0, atol=1e-12)
    np.testing.assert_allclose(e.shifts_px, d.shifts_px, rtol=0, atol=1e-12)
    assert np.array_equal(e.tilt_angles_deg, d.tilt_angles_deg)
    assert e.local_px.shape == (7, 2, 4, 5) and not e.local_px.any() and e.detector_shape == d.detector_shape


def test_xf_with_magnification_is_refused_or_projected_to_a_rotation():
    d = _deformations(m=3)
    xf = deformations_to_xf(d)
    xf[1, :, :2] *= 1.02
    with pytest.raises(IcetideError, match=r"transform\(s\) 1 are not rotations"):
        xf_to_deformations(xf, d.tilt_angles_deg, d.detector_shape)
    with pytest.warns(UserWarning, match="nearest rotation"):
        e = xf_to_deformations(xf, d.tilt_angles_deg, d.detector_shape, non_rotation="nearest")
    np.testing.assert_allclose(e.angles_deg, d.angles_deg, atol=1e-10)
    mirrored = deformations_to_xf(d)
    mirrored[2, 0, :2] *= -1
    with pytest.raises(IcetideError, match="mirror"):
        xf_to_deformations(mirrored, d.tilt_angles_deg, d.detector_shape, non_rotation="nearest")
    with pytest.raises(IcetideError, match="3 transforms for 2 tilt angles"):
        xf_to_deformations(xf, [0.0, 1.0], d.detector_shape)


def _aln(rot_deg, tx, ty, tilt, raw_size=(104, 80, 9), dark=(), alpha_offset_deg=0.0):
    n = len(tilt)
    ones = np.ones(n)
    return AlnFile(
        np.arange(n), np.asarray(rot_deg, float), ones, np.asarray(tx, float), np.asarray(ty, float),
        ones, ones, ones, np.zeros(n), np.asarray(tilt, float), raw_size=raw_size,
        alpha_offset_deg=alpha_offset_deg, dark_frames=list(dark),
    )


def _aretomo_xf(rot_deg, tx, ty):
    """The .xf AreTomo2 writes for IMOD (ImodUtil/CSaveXF.cpp): A = R(-ROT), D = A (-TX, -TY)."""
    t = -np.deg2rad(rot_deg)
    a = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    return np.concatenate([a, (a @ -np.array([tx, ty]))[:, None]], 1)


def test_aln_matches_rows_by_tilt_angle_and_agrees_with_aretomo_imod_export():
    tilt = [-40.0, -20.01, 0.02, 20.0, 39.98]
    rot = [84.1, 84.2, 84.3, 84.4, 84.5]
    tx, ty = [5.0, -3.0, 0.0, 7.5, -1.25], [2.0, 4.0, 0.0, -6.0, 9.0]
    aln = _aln(rot, tx, ty, tilt)
    stack_order = np.array([0.0, 20.0, -20.0, 40.0, -40.0])  # not the .aln row order
    d = aln_to_deformations(aln, stack_order, (40, 52))  # images binned by 2 from RawSize 104 x 80
    rows = [2, 3, 1, 4, 0]
    np.testing.assert_allclose(d.angles_deg, -np.asarray(rot)[rows], atol=1e-12)
    for m, r in enumerate(rows):
        expected = _aretomo_xf(rot[r], tx[r], ty[r])
        expected[:, 2] *= 0.5  # binning 2
        np.testing.assert_allclose(deformations_to_xf(d)[m], expected, atol=1e-12)
    assert np.array_equal(d.tilt_angles_deg, stack_order)


def test_aln_rows_carrying_aretomo3_alpha_offset_match_nominal_angles():
    # AreTomo3 -TiltCor writes TILT = nominal + AlphaOffset; dark frames keep nominal angles
    aln = _aln([85.0, 86.0, 87.0], [1.0, 2.0, 3.0], [0, 0, 0], [-27.7, -25.7, -23.7], alpha_offset_deg=12.3)
    d = aln_to_deformations(aln, [-38.0, -36.0, -40.0], (80, 104))
    np.testing.assert_allclose(d.angles_deg, [-86.0, -87.0, -85.0])
    assert d.extra["aretomo_alpha_offset_deg"] == 12.3


def test_aln_unmatched_angles_and_magnification_are_errors():
    aln = _aln([85.0] * 3, [0, 0, 0], [0, 0, 0], [-3.0, 0.0, 3.0], dark=[(0, 0, -6.0)])
    with pytest.raises(IcetideError, match=r"tilt angle\(s\) -6, 9 .*dark frames at -6"):
        aln_to_deformations(aln, [-6.0, 0.0, 9.0], (40, 52))
    aln.gmag[1] = 1.01
    with pytest.raises(IcetideError, match="GMAG"):
        aln_to_deformations(aln, [-3.0, 0.0, 3.0], (40, 52))
    with pytest.raises(IcetideError, match="not a uniform binning"):
        aln_to_deformations(_aln([85.0], [0], [0], [0.0]), [0.0], (40, 40))


def _relion_matrix(xtilt, ytilt, zrot, xshift_A, yshift_A, pixel_size_A, image_xy, volume_xyz):
    """RELION-5's projection matrix (TomoBackprojectProgram::getProjectMatrices) from one STAR row.

    P = S(int(image/2)) S(shift / pixel) Rz(zrot) Ry(ytilt) Rx(xtilt) S(-int(volume/2)); rotations are
    gravis' ``rotation(axis, degrees)``: n n^T + cos (I - n n^T) + sin [n]_x (right-handed).
    """

    def rotation(axis, deg):
        n = np.asarray(axis, float)
        cross = np.array([[0, -n[2], n[1]], [n[2], 0, -n[0]], [-n[1], n[0], 0]])
        out = np.eye(4)
        a = math.radians(deg)
        out[:3, :3] = np.outer(n, n) + math.cos(a) * (np.eye(3) - np.outer(n, n)) + math.sin(a) * cross
        return out

    def translation(t):
        out = np.eye(4)
        out[:3, 3] = t
        return out

    s0 = translation([-(n // 2) for n in volume_xyz])
    s1 = translation([xshift_A / pixel_size_A, yshift_A / pixel_size_A, 0.0])
    s2 = translation([image_xy[0] // 2, image_xy[1] // 2, 0.0])
    r0, r1, r2 = rotation([1, 0, 0], xtilt), rotation([0, 1, 0], ytilt), rotation([0, 0, 1], zrot)
    return s2 @ s1 @ r2 @ r1 @ r0 @ s0


@pytest.mark.parametrize("detector_shape, volume_xyz", [((40, 52), (52, 40, 16)), ((41, 37), (37, 41, 15))])
def test_relion_star_reproduces_icetide_projection_geometry(tmp_path, detector_shape, volume_xyz):
    pixel_size_A = 3.7
    d = _deformations(shape=detector_shape, max_angle_deg=100.0)
    write_relion_tilt_series_star(tmp_path / "TS_1.star", d, pixel_size_A, "TS_1")
    table = starfile.read(tmp_path / "TS_1.star")
    rng = np.random.default_rng(3)
    xyz = rng.uniform(-8, 8, size=(6, 3))  # specimen points, icetide's centred frame
    ny, nx = detector_shape
    for m in range(d.n_tilts):
        row = table.iloc[m]
        p = _relion_matrix(
            row.rlnTomoXTilt, row.rlnTomoYTilt, row.rlnTomoZRot, row.rlnTomoXShiftAngst, row.rlnTomoYShiftAngst,
            pixel_size_A, (nx, ny), volume_xyz,
        )
        voxel = xyz + np.array([n // 2 for n in volume_xyz])  # RELION's specimen centre is voxel int(N/2)
        relion_px = (p @ np.concatenate([voxel, np.ones((6, 1))], 1).T).T[:, :2]
        # icetide: ideal u' = P_theta(xyz); observed x = R(-alpha)(u' + tau); pixel index = x + (n-1)/2
        ideal = project_points(torch.tensor(xyz), torch.tensor(math.radians(d.tilt_angles_deg[m]))).numpy()
        a = -math.radians(d.angles_deg[m])
        rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
        icetide_px = (ideal + d.shifts_px[m]) @ rot.T + np.array([(nx - 1) / 2, (ny - 1) / 2])
        np.testing.assert_allclose(relion_px, icetide_px, atol=2e-5)  # STAR prints 6 decimals


def test_relion_round_trip_and_x_tilt_refused(tmp_path):
    d = _deformations(shape=(41, 52))
    cols = deformations_to_relion(d, 2.0)
    e = relion_to_deformations(cols, 2.0, d.detector_shape)
    np.testing.assert_allclose(e.shifts_px, d.shifts_px, rtol=0, atol=1e-12)
    np.testing.assert_allclose(e.angles_deg, d.angles_deg, rtol=0, atol=1e-12)
    np.testing.assert_allclose(e.tilt_angles_deg, d.tilt_angles_deg, rtol=0, atol=0)
    write_relion_tilt_series_star(tmp_path / "ts.star", d, 2.0, "ts")
    f = read_relion_tilt_series_star(tmp_path / "ts.star", 2.0, d.detector_shape)
    np.testing.assert_allclose(f.shifts_px, d.shifts_px, atol=1e-6)
    np.testing.assert_allclose(f.angles_deg, d.angles_deg, atol=1e-6)
    cols["rlnTomoXTilt"] = np.full(d.n_tilts, 0.5)
    with pytest.raises(IcetideError, match="no X tilt"):
        relion_to_deformations(cols, 2.0, d.detector_shape)


def test_excluded_views_get_stack_angles_and_transforms_interpolated_in_tilt():
    stack_angles = np.array([-60.0, -40.0, -20.0, 0.0, 20.0, 40.0, 60.0])
    kept = np.array([1, 2, 4, 5])
    # rotations either side of 180 degrees: the interpolation must cross it, not pass through 0
    d = Deformations(stack_angles[kept], [[1, 2], [3, 4], [5, 6], [7, 8]], [179.0, -179.0, -178.0, 178.0],
                     np.ones((4, 2, 3, 3)), (24, 32))
    full = deformations_for_stack(d, kept, stack_angles)
    np.testing.assert_array_equal(full.tilt_angles_deg, stack_angles)
    np.testing.assert_array_equal(full.shifts_px[kept], d.shifts_px)
    np.testing.assert_array_equal(full.angles_deg[kept], d.angles_deg)
    # view 3 (0 degrees) halfway between views 2 and 4; views 0 and 6 take their fitted neighbour's
    np.testing.assert_allclose(full.shifts_px[[0, 3, 6]], [[1, 2], [4, 5], [7, 8]])
    np.testing.assert_allclose(np.cos(np.deg2rad(full.angles_deg[[0, 3, 6]] - [179.0, 181.5, 178.0])), 1.0)
    assert full.local_px.shape == (7, 2, 3, 3) and not full.local_px.any()
    with pytest.raises(IcetideError, match="3 stack indices for 4 tilts"):
        deformations_for_stack(d, kept[:3], stack_angles)
