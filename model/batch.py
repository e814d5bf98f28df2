"""`PointBatch`: a batch of scenes as one flat set of points, the fusion model's input.

Scenes are concatenated along the point axis (Pointcept style); `batch_index` says which scene a
point belongs to. Views are concatenated too: a view's row in `view_global` is global over the
batch, and the points it sees are listed as (view, point) pairs, which stays small where a dense
(views x points) mask would not (100 views x 200k points is 20M entries; the pairs are the
visible ones only).

Build the pairs of one scene from its dense (V, N) visibility mask with
`view, point = view_visible.nonzero(as_tuple=True)`, then add the scene's view and point offsets.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from storage.labels import IGNORE_INDEX  # noqa: E402,F401 (the label the losses ignore)


@dataclass
class PointBatch:
    """Points of one or more scenes, concatenated; every tensor lives on the same device.

    P points, V views, M (view, point) visibility pairs, C2 the 2D feature width, D the CLIP
    global embedding width.

    xyz: (P, 3) float32, metres, scene frame after augmentation; the backbone voxelises it.
    rgb: (P, 3) float32 in [0, 1], point colour.
    batch_index: (P,) int64 in [0, num_scenes), the scene of each point, non-decreasing.
    feat2d: (P, C2) float32, the mean cached CLIP spatial feature over the views that see the
        point, zero where none does. A constant from the store: requires_grad is False.
    seen: (P,) bool, True where at least one view sees the point (feat2d is meaningful).
    semantic: (P,) int64, ScanNet-20 class in [0, 20) or IGNORE_INDEX (-100).
    instance: (P,) int64, instance id unique within the batch, -1 for no instance.
    view_of_pair: (M,) int64 in [0, V), the view of each visibility pair.
    view_point_index: (M,) int64 in [0, P), the point of each visibility pair.
    view_global: (V, D) float32, the cached global CLIP embedding of each view (not normalised).
    view_scene: (V,) int64 in [0, num_scenes), the scene of each view (as batch_index is the
        scene of each point): views of one scene are never each other's negatives in the
        contrastive CLIP loss.
    segment: (P,) int64 superpoint id unique within the batch, -1 unknown; None if not loaded.
    """

    xyz: Tensor
    rgb: Tensor
    batch_index: Tensor
    feat2d: Tensor
    seen: Tensor
    semantic: Tensor
    instance: Tensor
    view_of_pair: Tensor
    view_point_index: Tensor
    view_global: Tensor
    view_scene: Tensor
    segment: Tensor | None = None

    def __post_init__(self) -> None:
        num_points = self.xyz.shape[0]
        per_point = ("rgb", "batch_index", "feat2d", "seen", "semantic", "instance")
        for name in per_point + (("segment",) if self.segment is not None else ()):
            if getattr(self, name).shape[0] != num_points:
                raise ValueError(f"PointBatch.{name} has {getattr(self, name).shape[0]} rows, "
                                 f"xyz has {num_points}")
        if self.view_of_pair.shape != self.view_point_index.shape:
            raise ValueError("PointBatch.view_of_pair and view_point_index differ in length")
        if self.view_scene.shape != self.view_global.shape[:1]:
            raise ValueError(f"PointBatch.view_scene has {self.view_scene.shape[0]} rows, "
                             f"view_global has {self.view_global.shape[0]}")
        if self.feat2d.requires_grad:
            raise ValueError("PointBatch.feat2d requires grad; cached 2D features are constants")

    @property
    def num_points(self) -> int:
        return self.xyz.shape[0]

    @property
    def num_views(self) -> int:
        return self.view_global.shape[0]

    @property
    def device(self) -> torch.device:
        return self.xyz.device

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PointBatch:
        """A copy with every tensor on `device` (tensors already there are shared, not copied)."""
        moved = {}
        for field in fields(self):
            value = getattr(self, field.name)
            moved[field.name] = (None if value is None
                                 else value.to(device, non_blocking=non_blocking))
        return PointBatch(**moved)
