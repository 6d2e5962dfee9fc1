import math

import numpy as np
import torch

from icetide.geometry import (
    box_to_unit,
    centered_coords,
    detector_grid,
    frame_quarter_turns,
    project_points,
    ray_points,
    rotation_2d,
    rotation_y,
    slab_ray_interval,
)


def test_centered_coords_odd_and_even():
    assert centered_coords(5).tolist() == [-2, -1, 0, 1, 2]
    assert centered_coords(4).tolist() == [-1.5, -0.5, 0.5, 1.5]


def test_detector_grid_pixel_positions():
    u, v = detector_grid(3, 4)
    # pixel (row 0, column 3) sits at u = 3 - 1.5, v = 0 - 1
    assert u[0, 3] == 1.5 and v[0, 3] == -1.0
    assert u.shape == (3, 4)


def test_point_projects_where_design_says():
    xyz = torch.tensor([[5.0, -3.0, 7.0]], dtype=torch.float64)
    for deg in (-60.0, -12.0, 0.0, 30.0, 60.0):
        t = torch.tensor(math.radians(deg), dtype=torch.float64)
        uv = project_points(xyz, t)[0]
        assert torch.allclose(uv, torch.tensor([5 * math.cos(t) + 7 * math.sin(t), -3.0], dtype=torch.float64))


def test_positive_tilt_moves_positive_z_to_positive_u():
    uv = project_points(torch.tensor([0.0, 0.0, 10.0]), torch.tensor(math.radians(30)))
    assert uv[0] > 0


def test_rotation_y_matches_projection():
    t = torch.tensor(0.4, dtype=torch.float64)
    xyz = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    uvw = rotation_y(t) @ xyz
    assert torch.allclose(uvw[:2], project_points(xyz, t))
    assert torch.allclose(rotation_y(t) @ rotation_y(t).T, torch.eye(3, dtype=torch.float64))


def test_rotation_2d_is_counter_clockwise():
    r = rotation_2d(torch.tensor(math.pi / 2))
    assert torch.allclose(r @ torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), atol=1e-7)


def test_ray_points_project_back_to_their_detector_point():
    t = torch.linspace(-20, 20, 9)
    theta = torch.tensor(math.radians(-35))
    pts = ray_points(torch.tensor(4.5), torch.tensor(-2.0), theta, t)
    uv = project_points(pts, theta)
    assert torch.allclose(uv[:, 0], torch.full((9,), 4.5), atol=1e-5)
    assert torch.allclose(uv[:, 1], torch.full((9,), -2.0))
    # consecutive samples are 5 voxels apart: t is arc length
    assert torch.allclose(torch.linalg.norm(pts[1:] - pts[:-1], dim=-1), torch.full((8,), 5.0), atol=1e-5)


def test_slab_interval_endpoints_on_slab_faces():
    theta = torch.tensor(math.radians(50))
    t0, t1 = slab_ray_interval(torch.tensor(7.0), theta, 24.0)
    z0 = ray_points(torch.tensor(7.0), torch.tensor(0.0), theta, t0)[2]
    z1 = ray_points(torch.tensor(7.0), torch.tensor(0.0), theta, t1)[2]
    assert math.isclose(z0.item(), -12.0, abs_tol=1e-4) and math.isclose(z1.item(), 12.0, abs_tol=1e-4)
    assert math.isclose((t1 - t0).item(), 24.0 / math.cos(theta.item()), rel_tol=1e-6)


def test_box_to_unit_maps_outer_faces():
    shape = (10, 20, 40)
    corners = torch.tensor([[-20.0, -10.0, -5.0], [20.0, 10.0, 5.0], [0.0, 0.0, 0.0]])
    out = box_to_unit(corners, shape)
    assert np.allclose(out.numpy(), [[0, 0, 0], [1, 1, 1], [0.5, 0.5, 0.5]])


def test_frame_quarter_turns_bring_the_axis_within_45_degrees_of_y():
    cases = {0: 0, 44: 0, 46: 1, 85: 1, -85: -1, 95: 1, -95: -1, 135.5: 0, 175: 0, -175: 0, 265: -1}
    for axis, turns in cases.items():
        assert frame_quarter_turns(axis) == turns, axis
        assert abs((axis - 90 * turns + 90) % 180 - 90) <= 45, axis
