from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.projection import (
    GridMapping,
    fuse_features,
    project,
    project_loop_numpy,
)

DEPTH_H, DEPTH_W = 48, 64
K_DEPTH = torch.tensor([[50.0, 0.0, 32.0], [0.0, 50.0, 24.0], [0.0, 0.0, 1.0]])
# The colour camera has twice the resolution and a narrower field of view (x / z within
# +-0.535 against the depth camera's +-0.65); its principal point is the image centre.
COLOR_H, COLOR_W = 96, 128
K_COLOR = torch.tensor([[120.0, 0.0, 63.5], [0.0, 120.0, 47.5], [0.0, 0.0, 1.0]])


def rotation(axis: tuple[float, float, float], degrees: float) -> torch.Tensor:
    """(3, 3) float32 rotation about `axis` (Rodrigues)."""
    a = torch.tensor(axis, dtype=torch.float64)
    a = a / a.norm()
    skew = torch.tensor([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    t = math.radians(degrees)
    return (torch.eye(3, dtype=torch.float64) + math.sin(t) * skew
            + (1 - math.cos(t)) * skew @ skew).float()


def pose(r: torch.Tensor, t: tuple[float, float, float]) -> torch.Tensor:
    """(4, 4) float32 camera-to-world from rotation and camera position."""
    m = torch.eye(4)
    m[:3, :3], m[:3, 3] = r, torch.tensor(t)
    return m


def flat_depth(metres: float, n_views: int = 1) -> torch.Tensor:
    """(V, H, W) uint16 millimetre depth maps, constant."""
    return torch.full((n_views, DEPTH_H, DEPTH_W), round(metres * 1000), dtype=torch.uint16)


def to_world(camera_points: torch.Tensor, cam_to_world: torch.Tensor) -> torch.Tensor:
    return camera_points @ cam_to_world[:3, :3].T + cam_to_world[:3, 3]


def test_known_point_lands_on_its_pixel_identity_pose():
    # u = 50 * 0.2 / 2 + 32 = 37, v = 50 * 0.16 / 2 + 24 = 28.
    points = torch.tensor([[0.2, 0.16, 2.0], [0.0, 0.0, 2.0]])
    uv, visible = project(points, torch.eye(4)[None], K_DEPTH, flat_depth(2.0))
    assert uv.shape == (1, 2, 2) and uv.dtype == torch.float32
    torch.testing.assert_close(uv[0], torch.tensor([[37.0, 28.0], [32.0, 24.0]]))
    assert visible.tolist() == [[True, True]]


@pytest.mark.parametrize("per_view_intrinsics", [False, True])
def test_rotated_poses_and_both_intrinsic_shapes(per_view_intrinsics):
    poses = torch.stack([
        pose(rotation((0, 1, 0), 90), (1.0, 2.0, 0.5)),
        pose(rotation((1, -2, 0.5), 137), (-3.0, 0.2, 1.5)),
    ])
    k_second = torch.tensor([[40.0, 0.0, 30.0], [0.0, 45.0, 20.0], [0.0, 0.0, 1.0]])
    intrinsic = torch.stack([K_DEPTH, k_second]) if per_view_intrinsics else K_DEPTH
    # One point per view, placed in that view's camera frame where its pixel is known.
    camera_points = torch.tensor([[0.2, 0.16, 2.0], [-0.5, 0.3, 2.5]])
    points = torch.stack([to_world(camera_points[i:i + 1], poses[i])[0] for i in range(2)])
    depth = torch.stack([flat_depth(2.0)[0], flat_depth(2.5)[0]])
    uv, visible = project(points, poses, intrinsic, depth)
    expected_second = ([40 * -0.2 + 30, 45 * 0.12 + 20] if per_view_intrinsics
                       else [50 * -0.2 + 32, 50 * 0.12 + 24])
    torch.testing.assert_close(uv[0, 0], torch.tensor([37.0, 28.0]), atol=1e-4, rtol=0)
    torch.testing.assert_close(uv[1, 1], torch.tensor(expected_second), atol=1e-4, rtol=0)
    assert visible[0, 0] and visible[1, 1]
    assert not visible[0, 1] and not visible[1, 0]


def test_zero_depth_is_no_reading():
    points = torch.tensor([[0.2, 0.16, 2.0], [0.0, 0.0, 2.0]])
    depth = flat_depth(2.0)
    depth[0, 28, 37] = 0
    _, visible = project(points, torch.eye(4)[None], K_DEPTH, depth)
    assert visible.tolist() == [[False, True]]


def test_behind_the_camera_is_not_visible_whatever_the_tolerance():
    # Mirrored, this point lands inside the image; only the z test can reject it.
    points = torch.tensor([[0.2, 0.16, -2.0], [0.2, 0.16, 2.0]])
    uv, visible = project(points, torch.eye(4)[None], K_DEPTH, flat_depth(2.0),
                          depth_threshold=100.0)
    assert 0 <= uv[0, 0, 0] < DEPTH_W and 0 <= uv[0, 0, 1] < DEPTH_H
    assert visible.tolist() == [[False, True]]


def test_occlusion_absolute_and_relative_tolerance():
    depth = flat_depth(1.5)
    depth[0, :, 40:] = 4000
    points = torch.tensor([
        [0.0, 0.0, 2.0],    # 0.5 m behind the surface: occluded
        [0.0, 0.0, 1.549],  # within 5 cm
        [0.0, 0.0, 1.551],  # beyond 5 cm (2% of 1.5 m is only 3 cm)
        [0.8, 0.0, 4.079],  # u = 41.8 -> column 42, depth 4 m: 7.9 cm < 2% of 4 m = 8 cm
        [0.8, 0.0, 4.081],  # 8.1 cm: too far
        [0.8, 0.0, 3.921],  # 7.9 cm in front: a nearer surface than measured is also rejected
        [0.8, 0.0, 3.919],
    ])
    _, visible = project(points, torch.eye(4)[None], K_DEPTH, depth)
    assert visible[0].tolist() == [False, True, False, True, False, True, False]


def test_border_margin_and_pixel_edges():
    # Depth is 2 m everywhere; u = 25 x + 32 for a point at z = 2.
    u = torch.tensor([-0.6, -0.4, 1.0, 62.0, 63.4, 63.6])
    points = torch.stack([(u - 32) / 25, torch.zeros(6), torch.full((6,), 2.0)], dim=1)
    depth = flat_depth(2.0)
    expected = {
        0: [False, True, True, True, True, False],
        1: [False, False, True, True, False, False],
        2: [False, False, False, False, False, False],
    }
    for border, mask in expected.items():
        _, visible = project(points, torch.eye(4)[None], K_DEPTH, depth, border=border)
        assert visible[0].tolist() == mask, border


@pytest.mark.parametrize("bad", [float("nan"), float("-inf"), float("inf")])
def test_non_finite_pose_sees_nothing(bad):
    grid = torch.stack(torch.meshgrid(torch.linspace(-0.5, 0.5, 20),
                                      torch.linspace(-0.4, 0.4, 20), indexing="xy"), -1)
    points = torch.cat([grid.reshape(-1, 2), torch.full((400, 1), 2.0)], dim=1)
    poses = torch.eye(4).repeat(3, 1, 1)
    poses[1, 0, 3] = bad
    poses[2, :3, :3] = bad
    _, visible = project(points, poses, K_DEPTH, flat_depth(2.0, 3))
    assert visible[0].sum() > 300
    assert not visible[1:].any()
    mapping = GridMapping((COLOR_H, COLOR_W), (48, 64), (3, 4), "squash")
    fused = fuse_features(points, poses, K_DEPTH, flat_depth(2.0, 3), K_COLOR,
                          torch.ones(3, 3, 4, 5), mapping)
    assert torch.equal(fused.count, visible[0].int())
    assert torch.isfinite(fused.features).all()


def random_scene(n_views: int = 7, n_points: int = 3000, seed: int = 0):
    """Views on a circle looking at a cloud around the origin; depth maps from the cloud's
    own z-buffer, so visibility is a mix of visible, occluded and out-of-view points."""
    gen = torch.Generator().manual_seed(seed)
    points = (torch.rand(n_points, 3, generator=gen) - 0.5) * torch.tensor([3.0, 3.0, 1.5])
    poses = []
    for i in range(n_views):
        angle = 2 * math.pi * i / n_views
        position = torch.tensor([3.0 * math.cos(angle), 3.0 * math.sin(angle), 0.3])
        forward = -position / position.norm()
        right = torch.linalg.cross(forward, torch.tensor([0.0, 0.0, 1.0]))
        right = right / right.norm()
        down = torch.linalg.cross(forward, right)
        m = torch.eye(4)
        m[:3, 0], m[:3, 1], m[:3, 2], m[:3, 3] = right, down, forward, position
        poses.append(m)
    poses = torch.stack(poses)
    no_reading = 65535
    depth = torch.full((n_views, DEPTH_H * DEPTH_W), no_reading, dtype=torch.int32)
    for view in range(n_views):
        camera = (points - poses[view, :3, 3]) @ poses[view, :3, :3]
        u = torch.round(50 * camera[:, 0] / camera[:, 2] + 32).long()
        v = torch.round(50 * camera[:, 1] / camera[:, 2] + 24).long()
        keep = (u >= 0) & (u < DEPTH_W) & (v >= 0) & (v < DEPTH_H)
        millimetres = torch.round(camera[keep, 2] * 1000).int()
        depth[view].scatter_reduce_(0, v[keep] * DEPTH_W + u[keep], millimetres, reduce="amin")
    depth[depth == no_reading] = 0
    return points, poses, depth.reshape(n_views, DEPTH_H, DEPTH_W).to(torch.uint16)


def test_chunking_gives_identical_results():
    points, poses, depth = random_scene()
    uv_one, visible_one = project(points, poses, K_DEPTH, depth, view_chunk=100)
    assert 0.05 < visible_one.float().mean() < 0.5
    for chunk in (1, 3):
        uv, visible = project(points, poses, K_DEPTH, depth, view_chunk=chunk)
        assert torch.equal(uv, uv_one) and torch.equal(visible, visible_one)
    spatial = torch.randn(7, 3, 4, 6)
    mapping = GridMapping((COLOR_H, COLOR_W), (48, 64), (3, 4), "squash")
    fused = [fuse_features(points, poses, K_DEPTH, depth, K_COLOR, spatial, mapping,
                           view_chunk=chunk, return_visibility=True) for chunk in (1, 3, 100)]
    for other in fused[1:]:
        torch.testing.assert_close(other.features, fused[0].features, atol=1e-6, rtol=1e-6)
        assert torch.equal(other.count, fused[0].count)
        assert torch.equal(other.view_visible, fused[0].view_visible)


def test_numpy_loop_agrees_with_project():
    points, poses, depth = random_scene(n_views=9, n_points=5000, seed=3)
    intrinsic = torch.stack([K_DEPTH] * 9)
    intrinsic[::2, 0, 0] = 47.0
    uv, visible = project(points, poses, intrinsic, depth, border=2)
    uv_np, visible_np = project_loop_numpy(points.numpy(), poses.numpy(), intrinsic.numpy(),
                                           depth.numpy(), border=2)
    assert visible.float().mean() > 0.05
    assert (visible.numpy() == visible_np).mean() >= 0.9999
    np.testing.assert_allclose(uv.numpy()[visible_np], uv_np[visible_np], atol=1e-3)


def test_grid_mapping_squash_centre_and_corners():
    mapping = GridMapping((480, 640), (224, 224), (14, 14), "squash")
    uv = torch.tensor([[319.5, 239.5], [-0.5, -0.5], [0.0, 0.0], [639.0, 479.0],
                       [639.49, 479.49], [639.5, 100.0], [-0.51, 100.0]])
    grid, inside = mapping.color_to_grid(uv)
    torch.testing.assert_close(grid[0], torch.zeros(2))
    torch.testing.assert_close(grid[1], torch.tensor([-1.0, -1.0]))
    torch.testing.assert_close(grid[2], torch.tensor([-1 + 1 / 640, -1 + 1 / 480]))
    torch.testing.assert_close(grid[3], torch.tensor([1 - 1 / 640, 1 - 1 / 480]))
    assert inside.tolist() == [True, True, True, True, True, False, False]


def test_grid_mapping_crop_drops_the_side_bands():
    # 640x480 -> scale 224/480, width 298.7, 37.3 input pixels = 80 colour pixels cut per side.
    mapping = GridMapping((480, 640), (224, 224), (14, 14), "crop")
    uv = torch.tensor([[319.5, 239.5], [79.0, 239.5], [80.0, 239.5], [559.0, 239.5],
                       [560.0, 239.5], [79.5, -0.5], [320.0, 479.0], [10.0, 10.0]])
    grid, inside = mapping.color_to_grid(uv)
    torch.testing.assert_close(grid[0], torch.zeros(2))
    torch.testing.assert_close(grid[5], torch.tensor([-1.0, -1.0]))
    torch.testing.assert_close(grid[2, 0], torch.tensor(-1 + 1 / 480))  # half a pixel of 480
    assert inside.tolist() == [True, False, True, True, False, True, True, False]


def test_grid_mapping_non_square_input_scannet_frame():
    squash = GridMapping((968, 1296), (240, 320), (15, 20), "squash")
    crop = GridMapping((968, 1296), (240, 320), (15, 20), "crop")
    centre = torch.tensor([[647.5, 483.5]])
    for mapping in (squash, crop):
        torch.testing.assert_close(mapping.color_to_grid(centre)[0], torch.zeros(1, 2))
    # crop: s = 240 / 968 (height fits), width 1290.67 of 1296 kept: 2.67 colour pixels cut.
    uv = torch.tensor([[2.0, 483.5], [3.0, 483.5], [1292.0, 483.5], [1293.0, 483.5]])
    assert crop.color_to_grid(uv)[1].tolist() == [False, True, True, False]
    assert squash.color_to_grid(uv)[1].tolist() == [True, True, True, True]
    # squash: the centre of grid cell (row 3, column 5) is colour pixel (5.5 * 1296 / 20 - 0.5,
    # 3.5 * 968 / 15 - 0.5); align_corners=False puts that cell centre at (2 * 5.5 / 20 - 1, ...).
    cell = torch.tensor([[5.5 * 1296 / 20 - 0.5, 3.5 * 968 / 15 - 0.5]])
    torch.testing.assert_close(squash.color_to_grid(cell)[0],
                               torch.tensor([[2 * 5.5 / 20 - 1, 2 * 3.5 / 15 - 1]]))


def test_grid_mapping_rejects_unknown_resize():
    with pytest.raises(ValueError, match="resize"):
        GridMapping((480, 640), (224, 224), (14, 14), "pad")


def linear_grid(n_views: int, gh: int, gw: int) -> torch.Tensor:
    """(V, gh, gw, 3): channel 0 = column index, 1 = row index, 2 = 7."""
    rows, columns = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    grid = torch.stack([columns, rows, torch.full_like(rows, 7)], dim=-1).float()
    return grid.expand(n_views, gh, gw, 3).clone()


def expected_cell(u: np.ndarray, scale: float, offset: float, patch: float, cells: int):
    """Continuous grid coordinate of colour pixel u, clamped as border padding does."""
    return np.clip(((u + 0.5) * scale - offset) / patch - 0.5, 0, cells - 1)


def test_fuse_samples_a_linear_grid_exactly():
    # Colour frame 96x128 squashed to a 48x64 input, patch 16: grid 3x4.
    mapping = GridMapping((COLOR_H, COLOR_W), (48, 64), (3, 4), "squash")
    gen = torch.Generator().manual_seed(1)
    camera = torch.cat([(torch.rand(500, 2, generator=gen) - 0.5) * torch.tensor([2.4, 1.8]),
                        torch.full((500, 1), 2.0)], dim=1)
    fused = fuse_features(camera, torch.eye(4)[None], K_DEPTH, flat_depth(2.0), K_COLOR,
                          linear_grid(1, 3, 4).half(), mapping)
    # On the optical axis: colour (63.5, 47.5) -> input (32, 24) -> grid cell (1.5, 1).
    centre = fuse_features(torch.tensor([[0.0, 0.0, 2.0]]), torch.eye(4)[None], K_DEPTH,
                           flat_depth(2.0), K_COLOR, linear_grid(1, 3, 4), mapping)
    torch.testing.assert_close(centre.features, torch.tensor([[1.5, 1.0, 7.0]]))

    _, depth_visible = project(camera, torch.eye(4)[None], K_DEPTH, flat_depth(2.0))
    u = 120 * camera[:, 0].double().numpy() / 2 + 63.5
    v = 120 * camera[:, 1].double().numpy() / 2 + 47.5
    seen = fused.seen.numpy()
    assert fused.features.dtype == torch.float32
    assert depth_visible.all()
    assert 300 < seen.sum() < 450  # the depth camera sees wider than the colour camera
    colour_inside = (u >= -0.5) & (u < COLOR_W - 0.5) & (v >= -0.5) & (v < COLOR_H - 0.5)
    np.testing.assert_array_equal(seen, colour_inside)
    np.testing.assert_allclose(fused.features[seen, 0], expected_cell(u[seen], 0.5, 0, 16, 4),
                               atol=1e-4)
    np.testing.assert_allclose(fused.features[seen, 1], expected_cell(v[seen], 0.5, 0, 16, 3),
                               atol=1e-4)
    np.testing.assert_allclose(fused.features[seen, 2], 7.0, rtol=1e-6)


def test_fuse_crop_mapping_linear_grid_and_side_bands():
    # 96x128 colour -> crop to 48x48 (scale 0.5, 16 colour columns cut per side), grid 3x3.
    mapping = GridMapping((COLOR_H, COLOR_W), (48, 48), (3, 3), "crop")
    x = torch.linspace(-1.1, 1.1, 220)  # no point on a crop edge
    camera = torch.stack([x, torch.full_like(x, 0.3), torch.full_like(x, 2.0)], dim=1)
    fused = fuse_features(camera, torch.eye(4)[None], K_DEPTH, flat_depth(2.0), K_COLOR,
                          linear_grid(1, 3, 3), mapping)
    _, depth_visible = project(camera, torch.eye(4)[None], K_DEPTH, flat_depth(2.0))
    u = (120 * x.double() / 2 + 63.5).numpy()
    in_crop = (u + 0.5 >= 16) & (u + 0.5 < 112)
    assert depth_visible[0].all()
    assert (~in_crop).sum() > 50
    np.testing.assert_array_equal(fused.seen.numpy(), in_crop)
    np.testing.assert_allclose(fused.features[in_crop, 0], expected_cell(u[in_crop], 0.5, 8, 16, 3),
                               atol=1e-4)
    # v = 120 * 0.3 / 2 + 47.5 = 65.5 -> input (65.5 + 0.5) * 0.5 = 33 -> cell 33 / 16 - 0.5
    np.testing.assert_allclose(fused.features[in_crop, 1], 1.5625, atol=1e-5)
    assert (fused.features[~in_crop] == 0).all()


def test_fuse_mean_over_views_count_and_unseen_points():
    mapping = GridMapping((COLOR_H, COLOR_W), (48, 64), (3, 4), "squash")
    points = torch.tensor([
        [-0.3, 0.0, 2.0],   # left half: seen by both views
        [0.3, 0.0, 2.0],    # right half: view 1 has no depth there
        [0.0, 0.0, -2.0],   # behind both cameras
        [0.0, 0.0, 3.0],    # occluded in both
    ])
    depth = flat_depth(2.0, 2)
    depth[1, :, 32:] = 0
    spatial = torch.stack([torch.full((3, 4, 2), 1.0), torch.full((3, 4, 2), 3.0)])
    spatial[1, ..., 1] = -5.0
    fused = fuse_features(points, torch.eye(4).repeat(2, 1, 1), K_DEPTH, depth, K_COLOR,
                          spatial, mapping, return_visibility=True)
    torch.testing.assert_close(fused.features, torch.tensor(
        [[2.0, -2.0], [1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]))
    assert fused.count.dtype == torch.int32
    assert fused.count.tolist() == [2, 1, 0, 0]
    assert fused.seen.tolist() == [True, True, False, False]
    assert fused.view_visible.tolist() == [[True, True, False, False], [True, False, False, False]]
    assert fuse_features(points, torch.eye(4).repeat(2, 1, 1), K_DEPTH, depth, K_COLOR,
                         spatial, mapping).view_visible is None


def test_fuse_never_carries_gradient_and_leaves_spatial_unchanged():
    mapping = GridMapping((COLOR_H, COLOR_W), (48, 64), (3, 4), "squash")
    spatial = torch.randn(1, 3, 4, 8, requires_grad=True)
    before = spatial.detach().clone()
    points = torch.tensor([[0.1, 0.1, 2.0]], requires_grad=True)
    fused = fuse_features(points, torch.eye(4)[None], K_DEPTH, flat_depth(2.0), K_COLOR,
                          spatial, mapping)
    assert fused.count.tolist() == [1]
    assert not fused.features.requires_grad and fused.features.grad_fn is None
    assert torch.equal(spatial.detach(), before) and spatial.grad is None


def test_fuse_accepts_numpy_store_arrays():
    points, poses, depth = random_scene(n_views=4, n_points=800, seed=5)
    mapping = GridMapping((COLOR_H, COLOR_W), (48, 64), (3, 4), "squash")
    spatial = torch.randn(4, 3, 4, 5).half()
    from_tensors = fuse_features(points, poses, K_DEPTH, depth, K_COLOR, spatial, mapping)
    from_numpy = fuse_features(points, poses.double().numpy(), K_DEPTH.numpy(), depth.numpy(),
                               K_COLOR.numpy(), spatial.numpy(), mapping, view_chunk=3)
    torch.testing.assert_close(from_numpy.features, from_tensors.features)
    assert from_tensors.seen.sum() > 50


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    points, poses, depth = random_scene(n_views=5, n_points=2000, seed=7)
    mapping = GridMapping((COLOR_H, COLOR_W), (48, 64), (3, 4), "squash")
    spatial = torch.randn(5, 3, 4, 16).half()
    cpu = fuse_features(points, poses, K_DEPTH, depth, K_COLOR, spatial, mapping,
                        return_visibility=True)
    gpu = fuse_features(points.cuda(), poses, K_DEPTH, depth, K_COLOR, spatial, mapping,
                        return_visibility=True)
    assert gpu.features.device.type == "cuda"
    assert (gpu.view_visible.cpu() == cpu.view_visible).float().mean() > 0.999
    both = gpu.seen.cpu() & cpu.seen & (gpu.count.cpu() == cpu.count)
    torch.testing.assert_close(gpu.features.cpu()[both], cpu.features[both], atol=1e-3, rtol=1e-3)


def supersampled(intrinsic: np.ndarray, size: tuple[int, int], factor: int):
    """Intrinsics and size of the same camera with factor x factor pixels per pixel: coarse
    pixel coordinate u is fine coordinate (u + 0.5) * factor - 0.5."""
    fine = np.array(intrinsic, dtype=np.float64)[:3, :3]
    fine[:2, :2] *= factor
    fine[:2, 2] = (fine[:2, 2] + 0.5) * factor - 0.5
    return fine, (size[0] * factor, size[1] * factor)


def ray_depth(depth: torch.Tensor, column: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """z-depth along the ray through continuous pixel (column, row) of a (H, W) float ray-cast
    depth map: bilinear interpolation of inverse depth, exact on a plane (where 1/z is affine in
    pixel coordinates). No hit (inf or 0) is inverse depth 0."""
    height, width = depth.shape
    column, row = column.clamp(0, width - 1), row.clamp(0, height - 1)
    left, top = column.floor().clamp(max=width - 2), row.floor().clamp(max=height - 2)
    a, b = column - left, row - top
    inverse = 1 / torch.where(torch.isfinite(depth) & (depth > 0), depth, torch.inf)
    left, top = left.long(), top.long()
    value = ((1 - a) * (1 - b) * inverse[top, left] + a * (1 - b) * inverse[top, left + 1]
             + (1 - a) * b * inverse[top + 1, left] + a * b * inverse[top + 1, left + 1])
    return 1 / value


def test_visibility_against_ray_cast_truth(request):
    from pipeline.readers.scannet import ScanNetScene
    from pipeline import synthetic
    from pipeline.readers.synthetic import SyntheticScene

    root = request.getfixturevalue("synthetic_root")
    scene_dir = root if (root / "pose").is_dir() else sorted(
        path for path in root.iterdir() if (path / "pose").is_dir())[0]
    boxes = SyntheticScene.open(scene_dir).boxes
    scene = ScanNetScene(scene_dir)
    xyz = scene.read_points().xyz.astype(np.float64)
    intrinsic = np.asarray(scene.intrinsic_depth, dtype=np.float64)[:3, :3]
    height, width = scene.depth_size
    picks = np.unique(np.linspace(0, len(scene.frame_ids) - 1, 4).astype(int))
    frames = [scene.read_frame(int(scene.frame_ids[i]), color=False) for i in picks]
    frames = [frame for frame in frames if frame.valid]
    assert frames
    _, visible = project(torch.as_tensor(xyz, dtype=torch.float32),
                         torch.as_tensor(np.stack([frame.pose for frame in frames])),
                         torch.as_tensor(intrinsic),
                         torch.as_tensor(np.stack([frame.depth_mm for frame in frames])))

    # Truth looks along each point's own ray, in float metres (no millimetre PNG): ray-cast
    # at sub-pixels and interpolate inverse depth at the point's exact projection. Against an
    # analytic box ray-caster this agreed with exact truth on 99.5% of (view, point) pairs.
    factor = min(4, max(1, 960 // width))  # fine image <= ~960 pixels wide: seconds
    fine_intrinsic, fine_size = supersampled(intrinsic, (height, width), factor)
    truth = np.zeros(visible.shape, dtype=bool)
    for view, frame in enumerate(frames):
        camera = (xyz - frame.pose[:3, 3]) @ frame.pose[:3, :3]
        z = camera[:, 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            u = intrinsic[0, 0] * camera[:, 0] / z + intrinsic[0, 2]
            v = intrinsic[1, 1] * camera[:, 1] / z + intrinsic[1, 2]
        inside = (z > 0.1) & (u >= -0.5) & (u < width - 0.5) & (v >= -0.5) & (v < height - 0.5)
        fine_depth = torch.as_tensor(np.asarray(synthetic.raycast_depth(
            boxes, frame.pose, fine_intrinsic, fine_size), dtype=np.float64))
        hit = ray_depth(fine_depth, torch.as_tensor(np.where(inside, u, 0) + 0.5) * factor - 0.5,
                        torch.as_tensor(np.where(inside, v, 0) + 0.5) * factor - 0.5).numpy()
        truth[view] = inside & (np.abs(hit - z) < 0.005)

    visible = visible.numpy()
    true_positive = (visible & truth).sum()
    assert truth.sum() > 500
    # Nearest-pixel depth testing is inexact in two places whatever the implementation: within
    # half a pixel of a silhouette (the pixel shows the other surface) and on back faces or
    # undersides within the tolerance of the front surface. On a box room at 320x240 these cost
    # ~3% precision and ~4% recall (measured 0.969 / 0.963); a half-pixel shift drops recall
    # to ~0.91, OpenScene's 25% relative tolerance drops precision to ~0.74.
    assert true_positive / visible.sum() >= 0.95  # precision
    assert true_positive / truth.sum() >= 0.95  # recall
