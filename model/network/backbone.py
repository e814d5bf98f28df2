"""A sparse-voxel 3D U-Net in pure PyTorch: points -> voxels -> U-Net -> per-point features.

No spconv or MinkowskiEngine: active voxels are found through a sorted table of int64 keys of
their (batch, x, y, z) coordinates, and `torch.searchsorted` finds each voxel's active
neighbours. Every convolution is computed over active (input, output) voxel pairs only, grouped
by kernel offset in a `KernelMap` (MinkowskiEngine's "kernel map", spconv's "indice pairs"): for
each offset, gather the inputs' rows, multiply by that offset's (C_in, C_out) weight, and
scatter-add into the outputs' rows. A submanifold 3x3x3 convolution thus computes outputs at
active voxels only, reads inactive neighbours as zero, and equals a dense
`nn.Conv3d(padding=1)` there. Down-sampling is a 2x2x2 stride-2 convolution over each coarse
voxel's active children, up-sampling its transpose. The maps are built once per level and
shared by all of that level's convolutions.

Cost: a submanifold convolution takes P x C_in x C_out multiply-adds forward and twice that
backward, P the active pairs: N (the centre) plus N x the mean number of active neighbours,
about 8 on a room surface at 2 cm, so P is about 9 N where a gather over all neighbours takes
27 N. Transient memory is one offset's gathered (P_k, C_in) rows and (P_k, C_out) product at a
time (nothing gathered is stored for backward). Level l has about N / 4^l voxels on
surface-like scenes, so the finest level dominates. Measured (`python -m benchmarks.backbone`,
BENCHMARKS.md; 2 CPU cores shared with other work): forward + backward of the default config on
100k voxels of a synthetic room took 5.5 CPU-seconds on one thread against 18.1 for the
all-27-neighbours gather (3.3x), and its memory peaked 0.7 GB above the process against 1.7 GB;
BENCHMARKS.md has the wall times and how a busy CPU's thread scheduling bears on them. A spconv or MinkowskiEngine backend would implement the same
`SparseUNet.forward_voxels(coords, feats) -> feats` interface.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

NEIGHBOUR_OFFSETS = torch.tensor(list(itertools.product((-1, 0, 1), repeat=3)), dtype=torch.int64)
"""(27, 3) (dx, dy, dz) in the order of a dense Conv3d kernel's flattened (kx, ky, kz) index."""


@dataclass(frozen=True)
class SparseUNetConfig:
    """The 3D backbone.

    voxel_size: metres, the finest level's voxel edge.
    channels: feature width of each level, finest first; len(channels) levels, each one voxel
        size coarser (x2) than the previous.
    blocks: residual blocks (two submanifold convs each) per level, in the encoder and decoder.
    point_offsets: input features are rgb (3) and, if True, each voxel's mean point position
        inside it (3, in voxel units, in [-0.5, 0.5]): 6 input channels, else 3.
    out_channels: width of the per-point output features.
    norm: "batch" (BatchNorm1d over the batch's active voxels, so in training mode the scenes
        of a batch share statistics) or "layer" (per voxel, batch-independent).
    """

    voxel_size: float = 0.02
    channels: tuple[int, ...] = (32, 64, 96, 128)
    blocks: tuple[int, ...] = (1, 1, 1, 1)
    point_offsets: bool = True
    out_channels: int = 96
    norm: str = "batch"

    def __post_init__(self) -> None:
        if len(self.channels) < 2:
            raise ValueError("SparseUNetConfig.channels needs at least 2 levels")
        if len(self.blocks) != len(self.channels):
            raise ValueError(f"SparseUNetConfig: {len(self.channels)} channels but "
                             f"{len(self.blocks)} block counts; give one per level")
        if self.norm not in ("batch", "layer"):
            raise ValueError(f"SparseUNetConfig.norm is {self.norm!r}; use 'batch' or 'layer'")

    @property
    def in_channels(self) -> int:
        return 6 if self.point_offsets else 3


def voxelize(xyz: Tensor, batch_index: Tensor, voxel_size: float) -> tuple[Tensor, Tensor]:
    """Voxel coordinates of the points, shifted per scene so that each scene's minimum is 0.

    xyz: (P, 3) float, metres. batch_index: (P,) int64 scene of each point.
    Returns coords: (N, 4) int64 unique active voxels (batch, x, y, z), sorted by `voxel_keys`;
    point_to_voxel: (P,) int64 row of coords holding each point. Shifting a scene by a multiple
    of voxel_size changes neither.
    """
    grid = torch.floor(xyz / voxel_size).to(torch.int64)
    num_scenes = int(batch_index.max()) + 1 if batch_index.numel() else 0
    scene_min = torch.full((num_scenes, 3), torch.iinfo(torch.int64).max, dtype=torch.int64,
                           device=xyz.device)
    scene_min = scene_min.scatter_reduce(0, batch_index[:, None].expand(-1, 3), grid, "amin")
    grid = grid - scene_min[batch_index]
    point_coords = torch.cat([batch_index[:, None], grid], dim=1)
    extent = grid_extent(point_coords)
    keys, point_to_voxel = torch.unique(voxel_keys(point_coords, extent), return_inverse=True)
    return decode_keys(keys, extent), point_to_voxel


def grid_extent(coords: Tensor) -> int:
    """Side of the key space for (N, 4) coords with x, y, z >= 0: room for a -1/+1 neighbour."""
    extent = int(coords[:, 1:].max()) + 3 if coords.numel() else 3
    if (int(coords[:, 0].max()) + 1 if coords.numel() else 1) * extent**3 >= 2**62:
        raise ValueError(f"voxel grid of side {extent} is too large for int64 keys; "
                         "use a larger voxel_size or crop the scene")
    return extent


def voxel_keys(coords: Tensor, extent: int) -> Tensor:
    """(N, 4) int64 (batch, x, y, z) with x, y, z in [-1, extent - 2] -> (N,) int64 keys.

    Keys are linear in the coordinates, so a neighbour's key is the key plus a constant.
    """
    batch, x, y, z = coords.unbind(dim=1)
    return ((batch * extent + x + 1) * extent + y + 1) * extent + z + 1


def decode_keys(keys: Tensor, extent: int) -> Tensor:
    """Inverse of `voxel_keys`: (N,) int64 -> (N, 4) int64 (batch, x, y, z)."""
    z = keys % extent - 1
    y = keys // extent % extent - 1
    x = keys // extent**2 % extent - 1
    return torch.stack([keys // extent**3, x, y, z], dim=1)


@dataclass(frozen=True)
class KernelMap:
    """The active (input row, output row) pairs of a sparse convolution, grouped by kernel slot.

    Slot k computes out[outputs[k]] += feats[inputs[k]] @ weight[k]; inputs[k] and outputs[k]
    are (P_k,) int64, both ascending. A row appears at most once in each slot's inputs and at
    most once in its outputs, so no two terms of one slot's scatter-add land on the same row
    (deterministic on every device, whatever the scatter kernel). `identity`: a slot that pairs
    every row with itself (the submanifold convolution's centre), computed as one matmul; its
    lists are empty. num_inputs, num_outputs: rows of the input and output feature matrices.
    """

    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    num_inputs: int
    num_outputs: int
    identity: int | None = None

    def transpose(self) -> KernelMap:
        """The map of the transposed convolution: every pair reversed, slot by slot."""
        return KernelMap(self.outputs, self.inputs, self.num_outputs, self.num_inputs,
                         self.identity)


CENTRE = 13
"""Slot of NEIGHBOUR_OFFSETS[13] = (0, 0, 0) in a submanifold kernel."""


def submanifold_map(coords: Tensor, extent: int) -> KernelMap:
    """Active neighbour pairs of a submanifold 3x3x3 convolution over one voxel set.

    coords: (N, 4) int64 unique, sorted by key (as `voxelize` and `downsample_map` return them).
    Slot k pairs each voxel (output) with its active neighbour at NEIGHBOUR_OFFSETS[k] (input);
    slot CENTRE is the identity. Offsets k and 26 - k are opposite, so slot 26 - k holds slot
    k's pairs reversed: only 13 offsets are searched. Keys are linear in the coordinates and
    sorted, so the neighbours at z - 1, z, z + 1 of one (x + dx, y + dy) column sit in
    consecutive rows: one `searchsorted` per column finds all three.
    """
    keys = voxel_keys(coords, extent)
    rows = torch.arange(len(keys), device=keys.device)
    padded = torch.cat([keys, keys.new_full((1,), -1)])  # -1 is no voxel's key (coords >= 0)
    inputs: list[Tensor] = [rows[:0]] * 27
    outputs: list[Tensor] = [rows[:0]] * 27

    def add(slot: int, found: Tensor, neighbour: Tensor) -> None:
        voxel = found.nonzero().squeeze(1)
        inputs[slot], outputs[slot] = neighbour[voxel], voxel
        inputs[26 - slot], outputs[26 - slot] = voxel, neighbour[voxel]

    for dx, dy in ((-1, -1), (-1, 0), (-1, 1), (0, -1)):
        below = keys + (dx * extent + dy) * extent - 1  # key of (x + dx, y + dy, z - 1)
        position = torch.searchsorted(keys, below)
        for dz in (-1, 0, 1):
            found = padded[position] == below + (dz + 1)
            add(9 * (dx + 1) + 3 * (dy + 1) + dz + 1, found, position)
            position = position + found
    add(CENTRE - 1, padded[rows - 1] == keys - 1, rows - 1)  # (0, 0, -1): the previous row
    return KernelMap(tuple(inputs), tuple(outputs), len(keys), len(keys), identity=CENTRE)


def downsample_map(coords: Tensor, extent: int) -> tuple[Tensor, KernelMap]:
    """Parents of active voxels one level coarser (voxel edge x2), and the stride-2 kernel map.

    coords: (N, 4) int64 (batch, x, y, z), x, y, z >= 0, sorted by key. Returns coarse coords
    (Nc, 4) int64 sorted by key, and a map whose slot s (a dense 2x2x2 kernel's flattened
    (kx, ky, kz) index, s = 4 (x % 2) + 2 (y % 2) + z % 2) pairs each voxel in that position
    (input) with its parent (output). Its transpose is the up-sampling map.
    """
    coarse = torch.cat([coords[:, :1], coords[:, 1:] // 2], dim=1)
    keys, parent = torch.unique(voxel_keys(coarse, extent), return_inverse=True)
    odd = coords[:, 1:] % 2
    child_slot = odd[:, 0] * 4 + odd[:, 1] * 2 + odd[:, 2]
    order = torch.argsort(child_slot, stable=True)
    children = order.split(torch.bincount(child_slot, minlength=8).tolist())
    kernel_map = KernelMap(children, tuple(parent[rows] for rows in children), len(coords),
                           len(keys))
    return decode_keys(keys, extent), kernel_map


def _add_rows(out: Tensor, rows: Tensor, values: Tensor) -> None:
    """out[rows] += values in place; rows: (P,) distinct (one kernel slot's outputs or inputs).

    CUDA: index_add_, whose atomic adds give one result whatever their order since no two hit
    one row (under torch.use_deterministic_algorithms PyTorch swaps in its sorted kernel). CPU:
    index_put_ with accumulate, a serial loop: index_add_ (parallel scatter_add_) took the same
    time on one thread and twice as long on 2 cores busy with other work (measured).
    """
    if out.is_cuda:
        out.index_add_(0, rows, values)
    else:
        out.index_put_((rows,), values, accumulate=True)


def _apply_map(feats: Tensor, weight: Tensor, kernel_map: KernelMap) -> Tensor:
    """(num_inputs, C_in) feats, (K, C_in, C_out) weight -> (num_outputs, C_out)."""
    if kernel_map.identity is None:
        out = feats.new_zeros(kernel_map.num_outputs, weight.shape[2])
    else:
        out = feats @ weight[kernel_map.identity]
    for slot, (inputs, outputs) in enumerate(zip(kernel_map.inputs, kernel_map.outputs)):
        if len(inputs):
            _add_rows(out, outputs, feats.index_select(0, inputs) @ weight[slot])
    return out


class _SparseConvFunction(torch.autograd.Function):
    """out = sum over slots of scatter(gather(feats) @ weight[slot]), gathers recomputed in
    backward (only feats and weight are stored).

    The input gradient is the same computation over the transposed map with each slot's weight
    transposed; the weight gradient of a slot is its gathered inputs^T @ its gathered grad_out.
    """

    @staticmethod
    def forward(ctx, feats: Tensor, weight: Tensor, kernel_map: KernelMap) -> Tensor:
        ctx.save_for_backward(feats, weight)
        ctx.kernel_map = kernel_map
        return _apply_map(feats, weight, kernel_map)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        feats, weight = ctx.saved_tensors
        kernel_map: KernelMap = ctx.kernel_map
        feats_dtype, weight_dtype = feats.dtype, weight.dtype
        grad_out = grad_out.contiguous()
        feats, weight = feats.to(grad_out.dtype), weight.to(grad_out.dtype)
        need_feats, need_weight = ctx.needs_input_grad[:2]
        grad_feats = grad_weight = None
        if need_feats:
            if kernel_map.identity is None:
                grad_feats = grad_out.new_zeros(kernel_map.num_inputs, weight.shape[1])
            else:
                grad_feats = grad_out @ weight[kernel_map.identity].T
        if need_weight:
            grad_weight = torch.zeros_like(weight)
            if kernel_map.identity is not None:
                grad_weight[kernel_map.identity] = feats.T @ grad_out
        for slot, (inputs, outputs) in enumerate(zip(kernel_map.inputs, kernel_map.outputs)):
            if not len(inputs):
                continue
            grad_rows = grad_out.index_select(0, outputs)
            if need_feats:
                _add_rows(grad_feats, inputs, grad_rows @ weight[slot].T)
            if need_weight:
                grad_weight[slot] = feats.index_select(0, inputs).T @ grad_rows
        return (None if grad_feats is None else grad_feats.to(feats_dtype),
                None if grad_weight is None else grad_weight.to(weight_dtype), None)


def sparse_conv(feats: Tensor, weight: Tensor, kernel_map: KernelMap) -> Tensor:
    """feats: (num_inputs, C_in); weight: (K, C_in, C_out), K the map's slots -> (num_outputs,
    C_out): each slot's active pairs only."""
    if torch.is_autocast_enabled(feats.device.type):
        # The Function's backward runs outside autocast: cast here, as autocast would for a
        # matmul, so forward and backward compute in one dtype.
        dtype = torch.get_autocast_dtype(feats.device.type)
        feats, weight = feats.to(dtype), weight.to(dtype)
    return _SparseConvFunction.apply(feats, weight, kernel_map)


class SubmanifoldConv3d(nn.Module):
    """3x3x3 convolution evaluated at active voxels only, reading inactive neighbours as 0.

    weight: (27, C_in, C_out); equals nn.Conv3d(C_in, C_out, 3, padding=1) with
    conv.weight[o, i, kx, ky, kz] = weight[9 kx + 3 ky + kz, i, o].
    """

    def __init__(self, in_channels: int, out_channels: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(27, in_channels, out_channels)
                                   * math.sqrt(2.0 / (27 * in_channels)))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    def forward(self, feats: Tensor, kernel_map: KernelMap) -> Tensor:
        """feats: (N, C_in); kernel_map: from `submanifold_map`. -> (N, C_out)."""
        out = sparse_conv(feats, self.weight, kernel_map)
        return out if self.bias is None else out + self.bias


class DownConv3d(nn.Module):
    """2x2x2 stride-2 convolution over active children; equals nn.Conv3d(kernel 2, stride 2).

    weight: (8, C_in, C_out), conv.weight[o, i, kx, ky, kz] = weight[4 kx + 2 ky + kz, i, o].
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, in_channels, out_channels)
                                   * math.sqrt(2.0 / (8 * in_channels)))

    def forward(self, feats: Tensor, kernel_map: KernelMap) -> Tensor:
        """feats: (N, C_in) fine; kernel_map: from `downsample_map`. -> (Nc, C_out)."""
        return sparse_conv(feats, self.weight, kernel_map)


class UpConv3d(nn.Module):
    """Transpose of DownConv3d: each child gets its parent's features through its slot's linear map.

    weight: (8, C_in, C_out); equals nn.ConvTranspose3d(kernel 2, stride 2) at active children
    with conv.weight[i, o, kx, ky, kz] = weight[4 kx + 2 ky + kz, i, o].
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, in_channels, out_channels)
                                   * math.sqrt(2.0 / in_channels))

    def forward(self, coarse_feats: Tensor, kernel_map: KernelMap) -> Tensor:
        """coarse_feats: (Nc, C_in); kernel_map: the down-sampling map from `downsample_map`.
        -> (N, C_out) at the children."""
        return sparse_conv(coarse_feats, self.weight, kernel_map.transpose())


def _norm(channels: int, kind: str) -> nn.Module:
    return nn.BatchNorm1d(channels) if kind == "batch" else nn.LayerNorm(channels)


class ResidualBlock(nn.Module):
    """Two submanifold convs with norm + ReLU and a shortcut (linear where widths differ)."""

    def __init__(self, in_channels: int, out_channels: int, norm: str):
        super().__init__()
        self.conv1 = SubmanifoldConv3d(in_channels, out_channels)
        self.norm1 = _norm(out_channels, norm)
        self.conv2 = SubmanifoldConv3d(out_channels, out_channels)
        self.norm2 = _norm(out_channels, norm)
        self.shortcut = (nn.Identity() if in_channels == out_channels
                         else nn.Linear(in_channels, out_channels, bias=False))

    def forward(self, feats: Tensor, kernel_map: KernelMap) -> Tensor:
        hidden = torch.relu(self.norm1(self.conv1(feats, kernel_map)))
        return torch.relu(self.norm2(self.conv2(hidden, kernel_map)) + self.shortcut(feats))


class SparseUNet(nn.Module):
    """Sparse-voxel U-Net: (xyz, rgb, batch_index) -> (P, out_channels) per-point features.

    Encoder: stem conv, then at each level `blocks` residual blocks and a stride-2 down conv to
    the next level. Decoder: up conv, concatenation with the encoder's skip features, residual
    blocks; the finest decoder level outputs `out_channels`. Points in one voxel share a feature.
    """

    def __init__(self, config: SparseUNetConfig = SparseUNetConfig()):
        super().__init__()
        self.config = config
        channels, norm = config.channels, config.norm
        self.stem = SubmanifoldConv3d(config.in_channels, channels[0])
        self.stem_norm = _norm(channels[0], norm)
        self.encoder = nn.ModuleList(
            nn.ModuleList(ResidualBlock(width, width, norm) for _ in range(count))
            for width, count in zip(channels, config.blocks))
        self.down = nn.ModuleList(DownConv3d(fine, coarse)
                                  for fine, coarse in zip(channels[:-1], channels[1:]))
        self.down_norm = nn.ModuleList(_norm(coarse, norm) for coarse in channels[1:])
        decoder_widths = (config.out_channels,) + tuple(channels[1:-1])
        below_widths = tuple(decoder_widths[1:]) + (channels[-1],)
        self.up = nn.ModuleList(UpConv3d(below, width)
                                for below, width in zip(below_widths, channels[:-1]))
        self.up_norm = nn.ModuleList(_norm(width, norm) for width in channels[:-1])
        self.decoder = nn.ModuleList(
            nn.ModuleList(ResidualBlock(2 * skip if index == 0 else out, out, norm)
                          for index in range(max(count, 1)))
            for skip, out, count in zip(channels[:-1], decoder_widths, config.blocks[:-1]))

    def forward(self, xyz: Tensor, rgb: Tensor, batch_index: Tensor) -> Tensor:
        """xyz: (P, 3) float32 metres; rgb: (P, 3) float32 in [0, 1]; batch_index: (P,) int64.

        Returns (P, out_channels) point features (float32, or the autocast dtype), equal for
        points in one voxel. Input features per voxel: mean of rgb - 0.5 and, with
        point_offsets, of the points' offsets from the voxel centre.
        """
        scaled = xyz / self.config.voxel_size
        coords, point_to_voxel = voxelize(xyz, batch_index, self.config.voxel_size)
        point_feats = rgb - 0.5
        if self.config.point_offsets:
            point_feats = torch.cat([point_feats, scaled - torch.floor(scaled) - 0.5], dim=1)
        voxel_sum = point_feats.new_zeros(len(coords), point_feats.shape[1])
        voxel_sum = voxel_sum.index_add(0, point_to_voxel, point_feats)
        counts = torch.bincount(point_to_voxel, minlength=len(coords)).clamp_min(1)
        voxel_feats = voxel_sum / counts[:, None].to(voxel_sum.dtype)
        return self.forward_voxels(coords, voxel_feats)[point_to_voxel]

    def forward_voxels(self, coords: Tensor, feats: Tensor) -> Tensor:
        """coords: (N, 4) int64 (batch, x, y, z) >= 0 sorted by key, unique; feats: (N, C_in).

        Returns (N, out_channels). The interface an spconv/MinkowskiEngine backend would match.
        """
        extent = grid_extent(coords)
        neighbours = [submanifold_map(coords, extent)]
        strides = []
        for _ in range(len(self.config.channels) - 1):
            coords, stride = downsample_map(coords, extent)
            neighbours.append(submanifold_map(coords, extent))
            strides.append(stride)

        feats = torch.relu(self.stem_norm(self.stem(feats, neighbours[0])))
        skips = []
        for level, blocks in enumerate(self.encoder):
            for block in blocks:
                feats = block(feats, neighbours[level])
            if level < len(self.down):
                skips.append(feats)
                feats = torch.relu(self.down_norm[level](self.down[level](feats, strides[level])))
        for level in reversed(range(len(self.up))):
            up = self.up[level](feats, strides[level])
            feats = torch.cat([torch.relu(self.up_norm[level](up)), skips[level]], dim=1)
            for block in self.decoder[level]:
                feats = block(feats, neighbours[level])
        return feats
