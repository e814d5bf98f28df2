from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from model.backbone import (
    DownConv3d,
    SparseUNet,
    SparseUNetConfig,
    SubmanifoldConv3d,
    UpConv3d,
    downsample_map,
    grid_extent,
    neighbour_index,
    voxel_keys,
    voxelize,
)

SMALL = SparseUNetConfig(voxel_size=0.05, channels=(8, 16, 24), blocks=(1, 1, 1), out_channels=96)


def box_surface_points(count: int, seed: int, size: float = 1.0) -> torch.Tensor:
    """(count, 3) float32 points on the six faces of a cube [0, size]^3."""
    generator = torch.Generator().manual_seed(seed)
    xyz = torch.rand(count, 3, generator=generator) * size
    face = torch.randint(0, 6, (count,), generator=generator)
    xyz[torch.arange(count), face % 3] = (face // 3).float() * size
    return xyz


def random_active_grid(shape: tuple[int, ...], fraction: float, seed: int) -> torch.Tensor:
    """(N, 4) int64 (batch, x, y, z) active voxels of a (B, X, Y, Z) grid, sorted by key."""
    generator = torch.Generator().manual_seed(seed)
    coords = (torch.rand(shape, generator=generator) < fraction).nonzero()
    keys = voxel_keys(coords, grid_extent(coords))
    return coords[torch.argsort(keys)]


def to_dense(coords: torch.Tensor, feats: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Sparse (N, 4) coords, (N, C) feats -> dense (B, C, X, Y, Z), zeros where inactive."""
    dense = feats.new_zeros(shape[0], feats.shape[1], *shape[1:])
    batch, x, y, z = coords.unbind(1)
    dense[batch, :, x, y, z] = feats
    return dense


def at_sites(dense: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    batch, x, y, z = coords.unbind(1)
    return dense[batch, :, x, y, z]


def test_voxelize_groups_points_of_one_voxel_and_separates_scenes():
    xyz = torch.tensor([[0.01, 0.01, 0.01], [0.03, 0.02, 0.04], [0.06, 0.0, 0.0],
                        [0.01, 0.01, 0.01]])
    batch_index = torch.tensor([0, 0, 0, 1])
    coords, point_to_voxel = voxelize(xyz, batch_index, voxel_size=0.05)
    assert coords.tolist() == [[0, 0, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0]]
    assert point_to_voxel.tolist() == [0, 0, 1, 2]


def test_neighbour_index_matches_brute_force():
    coords = random_active_grid((2, 5, 4, 6), fraction=0.4, seed=0)
    table = neighbour_index(coords, grid_extent(coords))
    row_of = {tuple(c): row for row, c in enumerate(coords.tolist())}
    for row, (b, x, y, z) in enumerate(coords.tolist()):
        for k, (dx, dy, dz) in enumerate(itertools.product((-1, 0, 1), repeat=3)):
            assert table[row, k].item() == row_of.get((b, x + dx, y + dy, z + dz), -1)


def test_submanifold_conv_equals_dense_conv3d_at_active_sites():
    shape = (2, 7, 6, 5)
    coords = random_active_grid(shape, fraction=0.35, seed=1)
    feats = torch.randn(len(coords), 4, generator=torch.Generator().manual_seed(2))
    conv = SubmanifoldConv3d(4, 5, bias=True)
    with torch.no_grad():
        conv.bias.copy_(torch.randn(5))
    sparse = conv(feats, neighbour_index(coords, grid_extent(coords)))

    dense_weight = conv.weight.reshape(3, 3, 3, 4, 5).permute(4, 3, 0, 1, 2)
    dense = F.conv3d(to_dense(coords, feats, shape), dense_weight, conv.bias, padding=1)
    torch.testing.assert_close(sparse, at_sites(dense, coords), rtol=1e-5, atol=1e-5)


def test_submanifold_conv_backward_matches_dense_conv3d():
    shape = (1, 5, 5, 4)
    coords = random_active_grid(shape, fraction=0.5, seed=3)
    feats = torch.randn(len(coords), 3, dtype=torch.float64, requires_grad=True)
    conv = SubmanifoldConv3d(3, 2).double()
    upstream = torch.randn(len(coords), 2, dtype=torch.float64)
    (conv(feats, neighbour_index(coords, grid_extent(coords))) * upstream).sum().backward()

    dense_feats = feats.detach().clone().requires_grad_(True)
    dense_weight = conv.weight.detach().clone().requires_grad_(True)
    kernel = dense_weight.reshape(3, 3, 3, 3, 2).permute(4, 3, 0, 1, 2)
    out = at_sites(F.conv3d(to_dense(coords, dense_feats, shape), kernel, padding=1), coords)
    (out * upstream).sum().backward()
    torch.testing.assert_close(feats.grad, dense_feats.grad)
    torch.testing.assert_close(conv.weight.grad, dense_weight.grad)


def test_down_and_up_convs_equal_dense_strided_and_transposed_convs():
    shape = (2, 8, 6, 4)
    coords = random_active_grid(shape, fraction=0.3, seed=4)
    feats = torch.randn(len(coords), 3, generator=torch.Generator().manual_seed(5))
    coarse, parent, child_slot = downsample_map(coords, grid_extent(coords))
    down, up = DownConv3d(3, 4), UpConv3d(4, 3)

    pooled = down(feats, parent, child_slot, len(coarse))
    kernel = down.weight.reshape(2, 2, 2, 3, 4).permute(4, 3, 0, 1, 2)
    dense_down = F.conv3d(to_dense(coords, feats, shape), kernel, stride=2)
    torch.testing.assert_close(pooled, at_sites(dense_down, coarse), rtol=1e-5, atol=1e-5)

    coarse_shape = (2, 4, 3, 2)
    restored = up(pooled, parent, child_slot)
    kernel = up.weight.reshape(2, 2, 2, 4, 3).permute(3, 4, 0, 1, 2)
    dense_up = F.conv_transpose3d(to_dense(coarse, pooled, coarse_shape), kernel, stride=2)
    torch.testing.assert_close(restored, at_sites(dense_up, coords), rtol=1e-5, atol=1e-5)


def test_output_is_per_point_96d_and_equal_within_a_voxel():
    torch.manual_seed(0)
    xyz = box_surface_points(600, seed=0)
    # A twin of every point a few millimetres away, inside the same 5 cm voxel.
    twin = xyz.clone()
    twin_cell = torch.floor(xyz / SMALL.voxel_size)
    twin = torch.minimum(twin + 0.004, (twin_cell + 1) * SMALL.voxel_size - 1e-4)
    xyz = torch.cat([xyz, twin])
    rgb = torch.rand(len(xyz), 3)
    out = SparseUNet(SMALL)(xyz, rgb, torch.zeros(len(xyz), dtype=torch.int64))
    assert out.shape == (1200, 96) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:600], out[600:])
    assert out[:600].std(dim=0).mean() > 1e-3  # not collapsed to one vector


def test_two_scenes_in_a_batch_match_each_scene_alone():
    torch.manual_seed(0)
    model = SparseUNet(SMALL).eval()
    xyz_a, xyz_b = box_surface_points(400, seed=1), box_surface_points(500, seed=2, size=0.7)
    rgb_a, rgb_b = torch.rand(400, 3), torch.rand(500, 3)
    # Overlapping coordinates: only the batch index keeps the scenes apart.
    batch_index = torch.cat([torch.zeros(400, dtype=torch.int64),
                             torch.ones(500, dtype=torch.int64)])
    both = model(torch.cat([xyz_a, xyz_b]), torch.cat([rgb_a, rgb_b]), batch_index)
    alone_a = model(xyz_a, rgb_a, torch.zeros(400, dtype=torch.int64))
    alone_b = model(xyz_b, rgb_b, torch.zeros(500, dtype=torch.int64))
    assert both.shape == (900, 96)
    torch.testing.assert_close(both[:400], alone_a, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(both[400:], alone_b, rtol=1e-4, atol=1e-5)


def test_shift_by_coarsest_voxel_multiple_gives_same_features():
    torch.manual_seed(0)
    model = SparseUNet(SMALL).eval()
    # Points at voxel centres, so float rounding cannot move one across a voxel boundary.
    cells = torch.unique(torch.floor(box_surface_points(800, seed=3) / SMALL.voxel_size), dim=0)
    xyz = (cells + 0.5) * SMALL.voxel_size
    rgb = torch.rand(len(xyz), 3)
    batch_index = torch.zeros(len(xyz), dtype=torch.int64)
    coarsest = SMALL.voxel_size * 2 ** (len(SMALL.channels) - 1)
    shifted = xyz + torch.tensor([3.0, -5.0, 2.0]) * coarsest
    torch.testing.assert_close(model(shifted, rgb, batch_index), model(xyz, rgb, batch_index),
                               rtol=1e-4, atol=1e-5)


def test_gradient_reaches_every_parameter():
    torch.manual_seed(0)
    model = SparseUNet(SMALL)
    xyz = box_surface_points(500, seed=4)
    model(xyz, torch.rand(500, 3), torch.zeros(500, dtype=torch.int64)).square().mean().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert parameter.grad.abs().sum() > 0, name


def test_layer_norm_variant_runs_and_config_is_validated():
    config = SparseUNetConfig(voxel_size=0.1, channels=(8, 16), blocks=(1, 2), norm="layer",
                              point_offsets=False, out_channels=12)
    xyz = box_surface_points(300, seed=5)
    out = SparseUNet(config)(xyz, torch.rand(300, 3), torch.zeros(300, dtype=torch.int64))
    assert out.shape == (300, 12)
    with pytest.raises(ValueError, match="block counts"):
        SparseUNetConfig(channels=(8, 16), blocks=(1,))
    with pytest.raises(ValueError, match="norm"):
        SparseUNetConfig(norm="group")
