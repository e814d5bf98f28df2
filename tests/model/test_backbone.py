from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from benchmarks import all_neighbours
from model.network.backbone import (
    CENTRE,
    NEIGHBOUR_OFFSETS,
    DownConv3d,
    KernelMap,
    SparseUNet,
    SparseUNetConfig,
    SubmanifoldConv3d,
    UpConv3d,
    downsample_map,
    grid_extent,
    sparse_conv,
    submanifold_map,
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


def brute_force_neighbours(coords: torch.Tensor) -> list[list[int]]:
    """(N, 27) rows of each voxel's neighbour at NEIGHBOUR_OFFSETS[k], -1 where inactive."""
    row_of = {tuple(c): row for row, c in enumerate(coords.tolist())}
    return [[row_of.get((b, x + dx, y + dy, z + dz), -1)
             for dx, dy, dz in itertools.product((-1, 0, 1), repeat=3)]
            for b, x, y, z in coords.tolist()]


def test_submanifold_map_holds_exactly_the_active_neighbour_pairs():
    coords = random_active_grid((2, 5, 4, 6), fraction=0.4, seed=0)
    table = brute_force_neighbours(coords)
    kernel_map = submanifold_map(coords, grid_extent(coords))
    assert kernel_map.identity == CENTRE and NEIGHBOUR_OFFSETS[CENTRE].tolist() == [0, 0, 0]
    assert kernel_map.num_inputs == kernel_map.num_outputs == len(coords)
    for k in range(27):
        expected = ([] if k == CENTRE else
                    [(row[k], out) for out, row in enumerate(table) if row[k] >= 0])
        inputs, outputs = kernel_map.inputs[k], kernel_map.outputs[k]
        assert list(zip(inputs.tolist(), outputs.tolist())) == expected, k
        # ascending, and no row twice in one slot: one slot's scatter-add never collides
        for rows in (inputs, outputs):
            assert bool((rows[1:] > rows[:-1]).all()), k


def test_all_neighbours_baseline_table_matches_brute_force():
    coords = random_active_grid((2, 5, 4, 6), fraction=0.4, seed=0)
    table = all_neighbours.neighbour_index(coords, grid_extent(coords))
    assert table.tolist() == brute_force_neighbours(coords)


def _active_pairs_conv(feats, weight, coords, bias=None):
    out = sparse_conv(feats, weight, submanifold_map(coords, grid_extent(coords)))
    return out if bias is None else out + bias


def _all_neighbours_conv(feats, weight, coords, bias=None):
    table = all_neighbours.neighbour_index(coords, grid_extent(coords))
    return all_neighbours.submanifold_conv(feats, weight, table, bias)


CONVS = pytest.mark.parametrize("conv", [_active_pairs_conv, _all_neighbours_conv],
                                ids=["active-pairs", "all-neighbours-baseline"])


def dense_submanifold(coords, feats, weight, shape, bias=None):
    """The reference: a dense Conv3d(padding=1) read at the active sites."""
    kernel = weight.reshape(3, 3, 3, weight.shape[1], weight.shape[2]).permute(4, 3, 0, 1, 2)
    return at_sites(F.conv3d(to_dense(coords, feats, shape), kernel, bias, padding=1), coords)


@CONVS
def test_submanifold_conv_equals_dense_conv3d_at_active_sites(conv):
    shape = (2, 7, 6, 5)
    coords = random_active_grid(shape, fraction=0.35, seed=1)
    feats = torch.randn(len(coords), 4, generator=torch.Generator().manual_seed(2))
    module = SubmanifoldConv3d(4, 5, bias=True)
    with torch.no_grad():
        module.bias.copy_(torch.randn(5))
    sparse = conv(feats, module.weight, coords, module.bias)
    dense = dense_submanifold(coords, feats, module.weight, shape, module.bias)
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)
    if conv is _active_pairs_conv:  # the module is the same computation
        kernel_map = submanifold_map(coords, grid_extent(coords))
        torch.testing.assert_close(module(feats, kernel_map), sparse, rtol=0, atol=0)


@CONVS
def test_submanifold_conv_backward_matches_dense_conv3d(conv):
    shape = (1, 5, 5, 4)
    coords = random_active_grid(shape, fraction=0.5, seed=3)
    feats = torch.randn(len(coords), 3, dtype=torch.float64, requires_grad=True)
    weight = SubmanifoldConv3d(3, 2).weight.detach().double().requires_grad_(True)
    upstream = torch.randn(len(coords), 2, dtype=torch.float64)
    (conv(feats, weight, coords) * upstream).sum().backward()

    dense_feats = feats.detach().clone().requires_grad_(True)
    dense_weight = weight.detach().clone().requires_grad_(True)
    (dense_submanifold(coords, dense_feats, dense_weight, shape) * upstream).sum().backward()
    torch.testing.assert_close(feats.grad, dense_feats.grad)
    torch.testing.assert_close(weight.grad, dense_weight.grad)


def test_sparse_conv_passes_gradcheck_on_every_map_kind():
    coords = random_active_grid((2, 4, 4, 4), fraction=0.4, seed=6)
    extent = grid_extent(coords)
    _, stride = downsample_map(coords, extent)
    generator = torch.Generator().manual_seed(7)
    for kernel_map, slots in ((submanifold_map(coords, extent), 27), (stride, 8),
                              (stride.transpose(), 8)):
        feats = torch.randn(kernel_map.num_inputs, 2, dtype=torch.float64, generator=generator)
        weight = torch.randn(slots, 2, 3, dtype=torch.float64, generator=generator)
        assert torch.autograd.gradcheck(
            lambda f, w, m=kernel_map: sparse_conv(f, w, m),
            (feats.requires_grad_(True), weight.requires_grad_(True)))


@CONVS
@pytest.mark.parametrize("count", [0, 1])
def test_empty_and_single_voxel_sets(conv, count):
    coords = torch.tensor([[0, 2, 1, 3]], dtype=torch.int64)[:count]
    feats = torch.randn(count, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(27, 3, 4, dtype=torch.float64, requires_grad=True)
    out = conv(feats, weight, coords)
    assert out.shape == (count, 4)
    # a lone voxel has no active neighbour: only the centre tap contributes
    torch.testing.assert_close(out, feats @ weight[CENTRE])
    out.sum().backward()
    assert feats.grad.shape == feats.shape
    expected = torch.zeros_like(weight)
    expected[CENTRE] = feats.detach().T @ torch.ones(count, 4, dtype=torch.float64)
    torch.testing.assert_close(weight.grad, expected)


def test_down_and_up_convs_equal_dense_strided_and_transposed_convs():
    shape = (2, 8, 6, 4)
    coords = random_active_grid(shape, fraction=0.3, seed=4)
    feats = torch.randn(len(coords), 3, dtype=torch.float64, requires_grad=True)
    coarse, stride = downsample_map(coords, grid_extent(coords))
    down, up = DownConv3d(3, 4).double(), UpConv3d(4, 3).double()
    coarse_shape = (2, 4, 3, 2)

    pooled = down(feats, stride)
    restored = up(pooled, stride)
    upstream = torch.randn_like(restored)
    (restored * upstream).sum().backward()

    dense_feats = feats.detach().clone().requires_grad_(True)
    down_weight = down.weight.detach().clone().requires_grad_(True)
    up_weight = up.weight.detach().clone().requires_grad_(True)
    kernel = down_weight.reshape(2, 2, 2, 3, 4).permute(4, 3, 0, 1, 2)
    dense_pooled = at_sites(F.conv3d(to_dense(coords, dense_feats, shape), kernel, stride=2),
                            coarse)
    kernel = up_weight.reshape(2, 2, 2, 4, 3).permute(3, 4, 0, 1, 2)
    dense_up = F.conv_transpose3d(to_dense(coarse, dense_pooled, coarse_shape), kernel, stride=2)
    dense_restored = at_sites(dense_up, coords)
    (dense_restored * upstream).sum().backward()

    torch.testing.assert_close(pooled, dense_pooled)
    torch.testing.assert_close(restored, dense_restored)
    torch.testing.assert_close(feats.grad, dense_feats.grad)
    torch.testing.assert_close(down.weight.grad, down_weight.grad)
    torch.testing.assert_close(up.weight.grad, up_weight.grad)


def test_downsample_map_pairs_each_voxel_with_its_parent_in_its_slot():
    coords = random_active_grid((2, 6, 5, 4), fraction=0.3, seed=8)
    coarse, stride = downsample_map(coords, grid_extent(coords))
    assert stride.num_inputs == len(coords) and stride.num_outputs == len(coarse)
    assert stride.identity is None
    seen = []
    for slot, (children, parents) in enumerate(zip(stride.inputs, stride.outputs)):
        for child, parent in zip(children.tolist(), parents.tolist()):
            b, x, y, z = coords[child].tolist()
            assert coarse[parent].tolist() == [b, x // 2, y // 2, z // 2]
            assert slot == 4 * (x % 2) + 2 * (y % 2) + z % 2
            seen.append(child)
        for rows in (children, parents):
            assert bool((rows[1:] > rows[:-1]).all())
    assert sorted(seen) == list(range(len(coords)))
    transposed = stride.transpose()
    assert transposed.inputs == stride.outputs and transposed.outputs == stride.inputs
    assert (transposed.num_inputs, transposed.num_outputs) == (len(coarse), len(coords))


def test_unet_equals_the_all_neighbours_baseline_forward_and_backward():
    torch.manual_seed(0)
    model = SparseUNet(SMALL).double()
    cells = torch.unique(torch.floor(box_surface_points(1500, seed=9) / SMALL.voxel_size), dim=0)
    coords = torch.cat([torch.zeros(len(cells), 1), cells], dim=1).to(torch.int64)
    coords = coords[torch.argsort(voxel_keys(coords, grid_extent(coords)))]
    feats = torch.randn(len(coords), SMALL.in_channels, dtype=torch.float64)
    upstream = torch.randn(len(coords), SMALL.out_channels, dtype=torch.float64)

    (model.forward_voxels(coords, feats) * upstream).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    out = all_neighbours.forward_voxels_all_neighbours(model, coords, feats)
    (out * upstream).sum().backward()
    torch.testing.assert_close(model.forward_voxels(coords, feats).detach(), out.detach())
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(grads[name], parameter.grad, msg=name)


def test_forward_and_backward_are_bitwise_repeatable_in_deterministic_mode():
    """Training's --deterministic sets torch.use_deterministic_algorithms(True): every op of
    the backbone must be allowed there (no error) and give the same bits twice."""
    xyz = box_surface_points(800, seed=10)
    rgb = torch.rand(800, 3, generator=torch.Generator().manual_seed(11))
    batch_index = torch.zeros(800, dtype=torch.int64)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            torch.manual_seed(0)
            model = SparseUNet(SMALL)
            out = model(xyz, rgb, batch_index)
            out.square().mean().backward()
            runs.append([out.detach()] + [p.grad for p in model.parameters()])
    finally:
        torch.use_deterministic_algorithms(was)
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def test_bfloat16_autocast_runs_forward_and_backward_in_one_dtype():
    torch.manual_seed(0)
    model = SparseUNet(SMALL)
    xyz = box_surface_points(600, seed=12)
    rgb = torch.rand(600, 3)
    batch_index = torch.zeros(600, dtype=torch.int64)
    reference = model(xyz, rgb, batch_index)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(xyz, rgb, batch_index)
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.dtype == torch.float32, name
        assert torch.isfinite(parameter.grad).all(), name
    # bfloat16 keeps 8 bits of mantissa: close to float32, not equal
    assert (out.float() - reference).abs().mean() < 0.05 * reference.abs().mean()


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


def test_a_batchs_gradients_are_the_sum_of_each_scenes_gradients():
    """What DDP relies on: with per-voxel norms, one process's two-scene batch and two
    processes' one-scene batches (gradients summed by all-reduce) give the same gradients.
    float64, so that any difference is a leak between the scenes, not rounding."""
    torch.manual_seed(0)
    model = SparseUNet(SparseUNetConfig(voxel_size=SMALL.voxel_size, channels=SMALL.channels,
                                        blocks=SMALL.blocks, norm="layer")).double()
    xyz = [box_surface_points(400, seed=1).double(), box_surface_points(500, seed=2).double()]
    rgb = [torch.rand(400, 3, dtype=torch.float64), torch.rand(500, 3, dtype=torch.float64)]

    def gradients(indices: list[int]) -> dict[str, torch.Tensor]:
        model.zero_grad()
        batch_index = torch.cat([torch.full((len(xyz[i]),), k) for k, i in enumerate(indices)])
        out = model(torch.cat([xyz[i] for i in indices]), torch.cat([rgb[i] for i in indices]),
                    batch_index)
        out.sin().sum().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    both, alone_a, alone_b = gradients([0, 1]), gradients([0]), gradients([1])
    for name, grad in both.items():
        torch.testing.assert_close(grad, alone_a[name] + alone_b[name], rtol=1e-9, atol=1e-12,
                                   msg=name)


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
