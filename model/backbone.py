"""A sparse-voxel 3D U-Net in pure PyTorch: points -> voxels -> U-Net -> per-point features.

No spconv or MinkowskiEngine: active voxels are found through a sorted table of int64 keys of
their (batch, x, y, z) coordinates, and `torch.searchsorted` looks up the 27 neighbours of every
voxel. A submanifold 3x3x3 convolution gathers the neighbours' features into one
(N, 27 * C_in) matrix (missing neighbours read a zero row) and multiplies it by the
(27 * C_in, C_out) weight, so it computes outputs at active voxels only and equals a dense
`nn.Conv3d(padding=1)` there. Down-sampling is a 2x2x2 stride-2 convolution over each coarse
voxel's (up to 8) children, up-sampling its transpose.

Cost: a submanifold convolution takes N x 27 x C_in x C_out multiply-adds forward and twice
that backward, with a transient (N, 27, C_in) gathered matrix (recomputed in backward, not
stored), so time and memory grow with active voxels x 27; level l has about N / 4^l voxels on
surface-like scenes, so the finest level dominates. Measured on 2 CPU cores, default config:
20k points (15k voxels) take ~0.75 s forward, ~2 s forward + backward (~10k points/s); 100k
points (35k voxels) ~3.9 s. A spconv or MinkowskiEngine backend would implement the same
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


def neighbour_index(coords: Tensor, extent: int) -> Tensor:
    """Rows of the 27 neighbours of each active voxel, -1 where the neighbour is inactive.

    coords: (N, 4) int64 sorted by key (as `voxelize` and `downsample_map` return them).
    Returns (N, 27) int64, neighbour k at offset NEIGHBOUR_OFFSETS[k].
    """
    keys = voxel_keys(coords, extent)
    offsets = NEIGHBOUR_OFFSETS.to(coords.device)
    deltas = (offsets[:, 0] * extent + offsets[:, 1]) * extent + offsets[:, 2]
    queries = keys[:, None] + deltas[None, :]
    rows = torch.searchsorted(keys, queries).clamp_max(max(len(keys) - 1, 0))
    return torch.where(keys[rows] == queries, rows, -1)


def downsample_map(coords: Tensor, extent: int) -> tuple[Tensor, Tensor, Tensor]:
    """Parents of active voxels one level coarser (voxel edge x2).

    coords: (N, 4) int64 (batch, x, y, z), x, y, z >= 0. Returns coarse coords (Nc, 4) int64
    sorted by key; parent: (N,) int64 row of each voxel's parent; child_slot: (N,) int64 in
    [0, 8), the position inside the parent in a dense 2x2x2 kernel's flattened order.
    """
    coarse = torch.cat([coords[:, :1], coords[:, 1:] // 2], dim=1)
    keys, parent = torch.unique(voxel_keys(coarse, extent), return_inverse=True)
    odd = coords[:, 1:] % 2
    child_slot = odd[:, 0] * 4 + odd[:, 1] * 2 + odd[:, 2]
    return decode_keys(keys, extent), parent, child_slot


def _gather_rows(feats: Tensor, rows: Tensor) -> Tensor:
    """(N, C) feats, (N * 27,) rows in [0, N] with N for a missing neighbour -> (N, 27 * C)."""
    padded = torch.cat([feats, feats.new_zeros(1, feats.shape[1])])
    return padded.index_select(0, rows).reshape(feats.shape[0], -1)


class _SubmanifoldConvFunction(torch.autograd.Function):
    """out = gather(feats) @ weight, with a backward that gathers instead of scattering.

    Neighbour k of voxel j is i exactly when neighbour 26 - k of i is j (opposite offsets), so
    the input gradient is the same gather applied to grad_out, times the flipped, transposed
    weight: no scatter-add, and the (N, 27, C_in) gathered input is recomputed, not stored.
    """

    @staticmethod
    def forward(ctx, feats: Tensor, weight: Tensor, rows: Tensor) -> Tensor:
        ctx.save_for_backward(feats, weight, rows)
        return _gather_rows(feats, rows) @ weight.reshape(-1, weight.shape[2])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        feats, weight, rows = ctx.saved_tensors
        grad_feats = grad_weight = None
        grad_out = grad_out.contiguous()
        if ctx.needs_input_grad[0]:
            flipped = weight.flip(0).transpose(1, 2).reshape(-1, weight.shape[1])
            grad_feats = _gather_rows(grad_out, rows) @ flipped.to(grad_out.dtype)
            grad_feats = grad_feats.to(feats.dtype)
        if ctx.needs_input_grad[1]:
            gathered = _gather_rows(feats, rows).to(grad_out.dtype)
            grad_weight = (gathered.T @ grad_out).reshape(weight.shape).to(weight.dtype)
        return grad_feats, grad_weight, None


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

    def forward(self, feats: Tensor, neighbours: Tensor) -> Tensor:
        """feats: (N, C_in); neighbours: (N, 27) int64 from `neighbour_index`. -> (N, C_out)."""
        weight = self.weight
        if torch.is_autocast_enabled(feats.device.type):
            # The Function's backward runs outside autocast: cast here, as autocast would for a
            # matmul, so forward and backward compute in one dtype.
            dtype = torch.get_autocast_dtype(feats.device.type)
            feats, weight = feats.to(dtype), weight.to(dtype)
        rows = torch.where(neighbours < 0, feats.shape[0], neighbours).reshape(-1)
        out = _SubmanifoldConvFunction.apply(feats, weight, rows)
        return out if self.bias is None else out + self.bias


class DownConv3d(nn.Module):
    """2x2x2 stride-2 convolution over active children; equals nn.Conv3d(kernel 2, stride 2).

    weight: (8, C_in, C_out), conv.weight[o, i, kx, ky, kz] = weight[4 kx + 2 ky + kz, i, o].
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, in_channels, out_channels)
                                   * math.sqrt(2.0 / (8 * in_channels)))

    def forward(self, feats: Tensor, parent: Tensor, child_slot: Tensor, num_coarse: int) -> Tensor:
        """feats: (N, C_in) fine; parent, child_slot: (N,) from `downsample_map`. -> (Nc, C_out)."""
        slots = feats.new_zeros(num_coarse * 8, feats.shape[1])
        slots = slots.index_copy(0, parent * 8 + child_slot, feats)
        return slots.reshape(num_coarse, -1) @ self.weight.reshape(-1, self.weight.shape[2])


class UpConv3d(nn.Module):
    """Transpose of DownConv3d: each child gets its parent's features through its slot's linear map.

    weight: (8, C_in, C_out); equals nn.ConvTranspose3d(kernel 2, stride 2) at active children
    with conv.weight[i, o, kx, ky, kz] = weight[4 kx + 2 ky + kz, i, o].
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, in_channels, out_channels)
                                   * math.sqrt(2.0 / in_channels))

    def forward(self, coarse_feats: Tensor, parent: Tensor, child_slot: Tensor) -> Tensor:
        """coarse_feats: (Nc, C_in); parent, child_slot: (N,). -> (N, C_out) at the children."""
        out_channels = self.weight.shape[2]
        per_slot = coarse_feats @ self.weight.permute(1, 0, 2).reshape(coarse_feats.shape[1], -1)
        return per_slot.reshape(-1, 8, out_channels)[parent, child_slot]


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

    def forward(self, feats: Tensor, neighbours: Tensor) -> Tensor:
        hidden = torch.relu(self.norm1(self.conv1(feats, neighbours)))
        return torch.relu(self.norm2(self.conv2(hidden, neighbours)) + self.shortcut(feats))


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
        neighbours = [neighbour_index(coords, extent)]
        parents, slots, sizes = [], [], []
        for _ in range(len(self.config.channels) - 1):
            coords, parent, child_slot = downsample_map(coords, extent)
            neighbours.append(neighbour_index(coords, extent))
            parents.append(parent)
            slots.append(child_slot)
            sizes.append(len(coords))

        feats = torch.relu(self.stem_norm(self.stem(feats, neighbours[0])))
        skips = []
        for level, blocks in enumerate(self.encoder):
            for block in blocks:
                feats = block(feats, neighbours[level])
            if level < len(self.down):
                skips.append(feats)
                coarse = self.down[level](feats, parents[level], slots[level], sizes[level])
                feats = torch.relu(self.down_norm[level](coarse))
        for level in reversed(range(len(self.up))):
            up = self.up[level](feats, parents[level], slots[level])
            feats = torch.cat([torch.relu(self.up_norm[level](up)), skips[level]], dim=1)
            for block in self.decoder[level]:
                feats = block(feats, neighbours[level])
        return feats
