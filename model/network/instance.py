"""The instance branch, bottom-up (PointGroup style): per-point offsets to the instance centre,
then clustering of the shifted points of each thing class, smoothed over superpoints.

Why bottom-up rather than ESAM/OneFormer3D's query masks with Hungarian matching: it needs no
matching, its loss is per point (so it trains with any batch size, on a CPU, in the tests), and
it reuses what the store already holds: the superpoints (ScanNet's segs.json, the synthetic
scenes' face grid) pool noisy offsets and classes before clustering, as ESAM pools features.
The cost: instances touching in the shifted space merge, which query-based designs avoid.

Offsets are learnt in the augmented frame: targets come from the batch's own points, so a
rotated scene has rotated targets and no label is stored for them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from torch import Tensor

from model.network.heads import mlp


def offset_head(in_channels: int, hidden: int) -> torch.nn.Sequential:
    """(P, in_channels) fused features -> (P, 3) offsets to the instance centre, metres."""
    return mlp((in_channels, hidden, 3))


def centre_offsets(xyz: Tensor, instance: Tensor) -> tuple[Tensor, Tensor]:
    """Target offsets: (P, 3) from each point to the mean of its instance's points, and the
    (P,) bool mask of points that have an instance (instance ids unique within the batch)."""
    has = instance >= 0
    target = torch.zeros_like(xyz)
    if bool(has.any()):
        ids, inverse = torch.unique(instance[has], return_inverse=True)
        sums = torch.zeros(len(ids), 3, device=xyz.device).index_add_(0, inverse, xyz[has].float())
        counts = torch.bincount(inverse, minlength=len(ids)).clamp_min(1)[:, None]
        target[has] = (sums / counts)[inverse].to(xyz.dtype) - xyz[has]
    return target, has


def offset_losses(offsets: Tensor, xyz: Tensor, instance: Tensor) -> tuple[Tensor, Tensor]:
    """PointGroup's two offset terms over the points that belong to an instance.

    offsets: (P, 3) predicted. Returns (L1 distance to the target, mean 1 - cosine between
    predicted and target directions), float32 scalars; both 0 (in the graph) with no instance.
    """
    target, has = centre_offsets(xyz, instance)
    if not bool(has.any()):
        zero = offsets.float().sum() * 0.0
        return zero, zero
    predicted = offsets[has].float()
    target = target[has].float()
    l1 = (predicted - target).abs().sum(dim=1).mean()
    direction = 1.0 - F.cosine_similarity(predicted, target, dim=1, eps=1e-6).mean()
    return l1, direction


@dataclass(frozen=True)
class ClusterConfig:
    """radius: metres, cell edge of the grid on which shifted points are linked (neighbouring
    occupied cells join). min_points: smaller clusters are dropped (ScanNet's evaluation ignores
    ground truth under 100 points)."""

    radius: float = 0.03
    min_points: int = 50


@dataclass
class InstancePrediction:
    """One predicted instance of one scene: point indices into the scene, class, score."""

    points: np.ndarray  # (M,) int64
    label: int
    score: float


def cluster_scene(xyz: np.ndarray, offsets: np.ndarray, probabilities: np.ndarray,
                  segment: np.ndarray, thing_classes: tuple[int, ...],
                  config: ClusterConfig = ClusterConfig()) -> list[InstancePrediction]:
    """Instances of one scene from its points' offsets and class probabilities.

    xyz, offsets: (N, 3) metres. probabilities: (N, K) softmax. segment: (N,) superpoint ids,
    -1 for none. Each superpoint's points take its mean shifted position and its summed class
    vote; the shifted points of each thing class are linked on a grid of `radius` cells.
    Score: the mean probability of the instance's class over its points.
    """
    shifted = xyz + offsets
    votes = probabilities.copy()
    in_segment = segment >= 0
    if in_segment.any():
        ids, inverse = np.unique(segment[in_segment], return_inverse=True)
        counts = np.bincount(inverse, minlength=len(ids))[:, None]
        mean_shift = np.zeros((len(ids), 3))
        np.add.at(mean_shift, inverse, shifted[in_segment])
        shifted[in_segment] = (mean_shift / counts)[inverse]
        vote = np.zeros((len(ids), votes.shape[1]))
        np.add.at(vote, inverse, votes[in_segment])
        votes[in_segment] = vote[inverse]
    label = votes.argmax(axis=1)
    instances = []
    for thing in thing_classes:
        members = np.flatnonzero(label == thing)
        if members.size < config.min_points:
            continue
        components = _grid_components(shifted[members], config.radius)
        for component in range(components.max() + 1):
            points = members[components == component]
            if points.size >= config.min_points:
                score = float(probabilities[points, thing].mean())
                instances.append(InstancePrediction(points, thing, score))
    return instances


_FORWARD_NEIGHBOURS = np.array([(dx, dy, dz) for dx in (-1, 0, 1) for dy in (-1, 0, 1)
                                for dz in (-1, 0, 1) if (dx, dy, dz) > (0, 0, 0)])


def _grid_components(points: np.ndarray, cell: float) -> np.ndarray:
    """(M,) component id of each point: occupied cells of edge `cell` that touch (26-neighbours)
    are one component."""
    coords = np.floor(points / cell).astype(np.int64)
    coords -= coords.min(axis=0)
    extent = int(coords.max()) + 3
    keys = ((coords[:, 0] + 1) * extent + coords[:, 1] + 1) * extent + coords[:, 2] + 1
    cells, point_cell = np.unique(keys, return_inverse=True)
    cell_coords = np.stack(np.unravel_index(cells, (extent, extent, extent)), axis=1)
    rows, cols = [np.arange(len(cells))], [np.arange(len(cells))]
    for delta in _FORWARD_NEIGHBOURS:
        neighbour = cell_coords + delta
        neighbour_keys = np.ravel_multi_index(neighbour.T, (extent, extent, extent), mode="clip")
        found = np.searchsorted(cells, neighbour_keys)
        found = np.minimum(found, len(cells) - 1)
        hit = cells[found] == neighbour_keys
        rows.append(np.flatnonzero(hit))
        cols.append(found[hit])
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(cells), len(cells)))
    _, cell_component = connected_components(graph, directed=False)
    return cell_component[point_cell.reshape(-1)]
