"""The baseline of the backbone row: the U-Net's convolutions as they were before they computed
active pairs only.

Benchmarks only, never a default. A submanifold 3x3x3 convolution here gathers all 27
neighbours of every voxel into one (N, 27 * C_in) matrix, a zero row for each missing one, and
multiplies it by the (27 * C_in, C_out) weight: N x 27 x C_in x C_out multiply-adds whatever the
neighbourhood, about 3.5x the active pairs' on a room surface (about 7 of the 26 neighbours of a
surface voxel are active). Down-sampling scatters each voxel into its parent's 8 child slots
(zeros where a child is missing) and multiplies the (Nc, 8 * C_in) matrix; up-sampling computes
all 8 slots of every parent and keeps the active children's.

`forward_voxels_all_neighbours(model, coords, feats)` runs a `model.network.backbone.SparseUNet` with
this arithmetic and the model's own parameters, so it computes the same function as
`model.forward_voxels` (tests/model/test_backbone.py checks both against dense convolutions and
against each other).
"""

from __future__ import annotations

import torch
from torch import Tensor

from model.network.backbone import NEIGHBOUR_OFFSETS, SparseUNet, decode_keys, grid_extent, voxel_keys


def neighbour_index(coords: Tensor, extent: int) -> Tensor:
    """Rows of the 27 neighbours of each active voxel, -1 where the neighbour is inactive.

    coords: (N, 4) int64 sorted by key. Returns (N, 27) int64, neighbour k at NEIGHBOUR_OFFSETS[k].
    """
    keys = voxel_keys(coords, extent)
    offsets = NEIGHBOUR_OFFSETS.to(coords.device)
    deltas = (offsets[:, 0] * extent + offsets[:, 1]) * extent + offsets[:, 2]
    queries = keys[:, None] + deltas[None, :]
    rows = torch.searchsorted(keys, queries).clamp_max(max(len(keys) - 1, 0))
    return torch.where(keys[rows] == queries, rows, -1)


def downsample_parents(coords: Tensor, extent: int) -> tuple[Tensor, Tensor, Tensor]:
    """Coarse coords (Nc, 4) sorted by key; parent: (N,) row of each voxel's parent; child_slot:
    (N,) in [0, 8), the position inside the parent in a dense 2x2x2 kernel's flattened order."""
    coarse = torch.cat([coords[:, :1], coords[:, 1:] // 2], dim=1)
    keys, parent = torch.unique(voxel_keys(coarse, extent), return_inverse=True)
    odd = coords[:, 1:] % 2
    child_slot = odd[:, 0] * 4 + odd[:, 1] * 2 + odd[:, 2]
    return decode_keys(keys, extent), parent, child_slot


def _gather_rows(feats: Tensor, rows: Tensor) -> Tensor:
    """(N, C) feats, (N * 27,) rows in [0, N] with N for a missing neighbour -> (N, 27 * C)."""
    padded = torch.cat([feats, feats.new_zeros(1, feats.shape[1])])
    # (not -1: the model's code before this baseline was split off crashed on an empty set)
    return padded.index_select(0, rows).reshape(feats.shape[0], 27 * feats.shape[1])


class _AllNeighboursConvFunction(torch.autograd.Function):
    """out = gather(feats) @ weight, with a backward that gathers instead of scattering.

    Neighbour k of voxel j is i exactly when neighbour 26 - k of i is j (opposite offsets), so
    the input gradient is the same gather applied to grad_out, times the flipped, transposed
    weight; the (N, 27, C_in) gathered input is recomputed in backward, not stored.
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


def submanifold_conv(feats: Tensor, weight: Tensor, neighbours: Tensor,
                     bias: Tensor | None = None) -> Tensor:
    """feats: (N, C_in); weight: (27, C_in, C_out); neighbours: (N, 27) from `neighbour_index`."""
    if torch.is_autocast_enabled(feats.device.type):
        dtype = torch.get_autocast_dtype(feats.device.type)
        feats, weight = feats.to(dtype), weight.to(dtype)
    rows = torch.where(neighbours < 0, feats.shape[0], neighbours).reshape(-1)
    out = _AllNeighboursConvFunction.apply(feats, weight, rows)
    return out if bias is None else out + bias


def down_conv(feats: Tensor, weight: Tensor, parent: Tensor, child_slot: Tensor,
              num_coarse: int) -> Tensor:
    """feats: (N, C_in) fine; weight: (8, C_in, C_out) -> (Nc, C_out), all 8 slots per parent."""
    slots = feats.new_zeros(num_coarse * 8, feats.shape[1])
    slots = slots.index_copy(0, parent * 8 + child_slot, feats)
    return slots.reshape(num_coarse, -1) @ weight.reshape(-1, weight.shape[2])


def up_conv(coarse_feats: Tensor, weight: Tensor, parent: Tensor, child_slot: Tensor) -> Tensor:
    """coarse_feats: (Nc, C_in); weight: (8, C_in, C_out) -> (N, C_out) at the children."""
    out_channels = weight.shape[2]
    per_slot = coarse_feats @ weight.permute(1, 0, 2).reshape(coarse_feats.shape[1], -1)
    return per_slot.reshape(-1, 8, out_channels)[parent, child_slot]


def _block(block, feats: Tensor, neighbours: Tensor) -> Tensor:
    """`model.network.backbone.ResidualBlock.forward` with the all-neighbours convolution."""
    hidden = torch.relu(block.norm1(submanifold_conv(feats, block.conv1.weight, neighbours,
                                                     block.conv1.bias)))
    out = block.norm2(submanifold_conv(hidden, block.conv2.weight, neighbours, block.conv2.bias))
    return torch.relu(out + block.shortcut(feats))


def forward_voxels_all_neighbours(model: SparseUNet, coords: Tensor, feats: Tensor) -> Tensor:
    """`model.forward_voxels(coords, feats)` computed with the all-neighbours arithmetic.

    coords: (N, 4) int64 (batch, x, y, z) >= 0, unique, sorted by key; feats: (N, C_in).
    Returns (N, out_channels).
    """
    extent = grid_extent(coords)
    neighbours = [neighbour_index(coords, extent)]
    parents, slots, sizes = [], [], []
    for _ in range(len(model.config.channels) - 1):
        coords, parent, child_slot = downsample_parents(coords, extent)
        neighbours.append(neighbour_index(coords, extent))
        parents.append(parent)
        slots.append(child_slot)
        sizes.append(len(coords))

    stem = model.stem
    feats = torch.relu(model.stem_norm(submanifold_conv(feats, stem.weight, neighbours[0],
                                                        stem.bias)))
    skips = []
    for level, blocks in enumerate(model.encoder):
        for block in blocks:
            feats = _block(block, feats, neighbours[level])
        if level < len(model.down):
            skips.append(feats)
            coarse = down_conv(feats, model.down[level].weight, parents[level], slots[level],
                               sizes[level])
            feats = torch.relu(model.down_norm[level](coarse))
    for level in reversed(range(len(model.up))):
        up = up_conv(feats, model.up[level].weight, parents[level], slots[level])
        feats = torch.cat([torch.relu(model.up_norm[level](up)), skips[level]], dim=1)
        for block in model.decoder[level]:
            feats = _block(block, feats, neighbours[level])
    return feats
