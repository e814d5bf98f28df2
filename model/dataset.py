"""The cache-backed dataset: scenes from the store, cached CLIP features projected onto points.

Nothing here runs CLIP. A scene's spatial features are read from the store and fused onto its
points by `pipeline.projection.fuse_features` on the training device under `no_grad`; the
result is a constant input of the model. Augmentation moves the points after projection, so
each point keeps the 2D feature of the place it was seen at.

Memory does not grow with frames x points: depth maps and feature grids are read from the
store a chunk of views at a time (every chunk checked: a missing or corrupt one is a one-line
error naming the frame), the features are summed into per-point accumulators, and each view
keeps at most `max_view_points` of the points it sees for the CLIP consistency loss.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from model.batch import PointBatch
from pipeline.projection import (DEPTH_THRESHOLD, RELATIVE_THRESHOLD, GridMapping, fuse_features,
                                 rigid_poses)
from storage.chunks import FrameArray
from storage.featureset import FeatureSetSpec
from storage.store import FeatureStore, SceneArrays

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProjectionConfig:
    """How cached features are attached to points (see pipeline.projection.project)."""

    depth_threshold: float = DEPTH_THRESHOLD
    relative_threshold: float = RELATIVE_THRESHOLD
    view_chunk: int | None = None  # views read and projected at once; None: by memory
    max_view_points: int = 4096  # points each view keeps for the CLIP consistency loss


@dataclass(frozen=True)
class AugmentConfig:
    """3D augmentation of the training input, applied after projection."""

    rotate_z: bool = True
    flip: bool = True
    scale: tuple[float, float] = (0.9, 1.1)
    jitter: float = 0.005  # metres, std of per-point noise

    @staticmethod
    def none() -> AugmentConfig:
        return AugmentConfig(rotate_z=False, flip=False, scale=(1.0, 1.0), jitter=0.0)


@dataclass
class SceneSample:
    """One scene ready for the model, on the device.

    xyz: (N, 3) float32 metres world. rgb: (N, 3) float32 in [0, 1].
    feat2d: (N, C) float32 mean cached feature over the views that see the point (0 if none).
    seen: (N,) bool. semantic: (N,) int64 (-100 ignored). instance: (N,) int64 (-1 none).
    segment: (N,) int64 superpoint id (-1 unknown).
    view_pairs: (2, M) int32 (view, point) pairs: which points each used view sees, at most
    ProjectionConfig.max_view_points per view (a fixed random subset of a view that sees
    more), view-major. view_global: (V, D) float32 cached global embeddings of those views.
    """

    scene_id: str
    xyz: torch.Tensor
    rgb: torch.Tensor
    feat2d: torch.Tensor
    seen: torch.Tensor
    semantic: torch.Tensor
    instance: torch.Tensor
    segment: torch.Tensor
    view_pairs: torch.Tensor
    view_global: torch.Tensor

    @property
    def view_visible(self) -> torch.Tensor:
        """(V, N) bool, the pairs as a dense mask (V x N bytes: small scenes and tests only)."""
        dense = torch.zeros(self.view_global.shape[0], self.xyz.shape[0], dtype=torch.bool,
                            device=self.xyz.device)
        dense[self.view_pairs[0].long(), self.view_pairs[1].long()] = True
        return dense


class CachedScenes:
    """Reads scenes of one feature set from their stores and projects their features.

    sources: scene id -> the store that holds it (scenes may come from several stores).
    The store's arrays become torch tensors on `device` with requires_grad=False and are never
    written back. Projected scenes are kept, most recently used first, up to `cache_bytes`, so
    that later epochs neither read the store nor project again.
    """

    def __init__(
        self,
        sources: dict[str, FeatureStore],
        featureset: str,
        device: torch.device,
        projection: ProjectionConfig = ProjectionConfig(),
        cache_bytes: float = 2e9,
    ):
        self.sources = dict(sources)
        self.featureset = featureset
        self.device = device
        self.projection = projection
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[str, SceneSample] = OrderedDict()

    def __len__(self) -> int:
        return len(self.sources)

    def get(self, scene_id: str) -> SceneSample:
        """The projected scene, from memory when it was loaded before."""
        if scene_id in self._cache:
            self._cache.move_to_end(scene_id)
            return self._cache[scene_id]
        sample = self.load(scene_id)
        self._cache[scene_id] = sample
        while len(self._cache) > 1 and sum(map(_nbytes, self._cache.values())) > self.cache_bytes:
            self._cache.popitem(last=False)
        return sample

    def load(self, scene_id: str) -> SceneSample:
        """Read one scene and project its cached features onto its points.

        Depth and spatial features are read a chunk of views at a time; raises StoreError
        (naming the scene, frame and chunk file) for a frame whose chunks are missing or corrupt,
        and for scenes whose frames are not all done."""
        store = self.sources[scene_id]
        scene = store.scene(scene_id, with_depth=False)
        spec = store.featureset_spec(self.featureset)
        done = store.done(scene_id, self.featureset)
        if not done.all():
            store.features(scene_id, self.featureset)  # the error that says how to finish them
        store.check_frame_state(scene_id, done, scene.valid)
        usable = scene.valid & done
        not_rigid = usable & ~rigid_poses(scene.pose)
        if not_rigid.any():  # stored as valid by a stage 1 that did not check poses
            log.warning("%s: leaving out %d frames whose pose is not a rigid transform (e.g. "
                        "frame %d); rerun extract-clip into a new store to record them as "
                        "invalid", scene_id, int(not_rigid.sum()),
                        scene.frame_id[np.flatnonzero(not_rigid)[0]])
            usable &= ~not_rigid
        positions = np.flatnonzero(usable)
        frames = lambda name: store.frame_array(scene_id, name, positions)  # noqa: E731
        global_ = frames(f"features/{self.featureset}/global")[:]  # (V, D): small
        return self.attach(scene_id, scene, usable, frames(f"features/{self.featureset}/spatial"),
                           global_, spec, depth=frames("frames/depth"))

    def attach(self, scene_id: str, scene: SceneArrays, usable: np.ndarray, spatial, global_,
               spec: FeatureSetSpec, depth=None) -> SceneSample:
        """Project the spatial features of the `usable` frames onto the scene's points.

        usable: (F,) bool frames to use. spatial: (V, gh, gw, C) and global_: (V, D) of those V
        frames: numpy, torch (the benchmarks' online-CLIP baseline passes live features here)
        or storage.store.FrameArray (read a chunk of views at a time). depth: (V, h, w) of
        those frames, default `scene.depth[usable]`.
        """
        device = self.device

        def as_tensor(array, dtype: torch.dtype) -> torch.Tensor:
            if isinstance(array, torch.Tensor):  # live features, possibly already on the GPU
                return array.to(device=device, dtype=dtype)
            return torch.as_tensor(np.ascontiguousarray(array), dtype=dtype, device=device)

        xyz = as_tensor(scene.xyz, torch.float32)
        mapping = GridMapping.for_featureset(spec, scene.color_size)
        fused = fuse_features(
            xyz,
            as_tensor(scene.pose[usable], torch.float32),
            as_tensor(scene.intrinsic_depth, torch.float32),
            scene.depth[usable] if depth is None else depth,  # uint16, moved a chunk at a time
            as_tensor(scene.intrinsic_color, torch.float32),
            spatial if isinstance(spatial, FrameArray) else as_tensor(spatial, torch.float16),
            mapping,
            depth_scale=scene.depth_scale,
            depth_threshold=self.projection.depth_threshold,
            relative_threshold=self.projection.relative_threshold,
            view_chunk=self.projection.view_chunk,
            return_visibility=True,
            max_view_points=self.projection.max_view_points,
        )
        return SceneSample(
            scene_id=scene_id,
            xyz=xyz,
            rgb=as_tensor(scene.rgb, torch.float32) / 255.0,
            feat2d=fused.features,
            seen=fused.seen,
            semantic=as_tensor(scene.semantic, torch.int64),
            instance=as_tensor(scene.instance, torch.int64),
            segment=as_tensor(scene.segment, torch.int64),
            view_pairs=fused.view_pairs.to(torch.int32),
            view_global=as_tensor(global_, torch.float32),
        )


def projection_memory_bound(n_points: int, n_views: int, spatial_dim: int, global_dim: int,
                            config: ProjectionConfig = ProjectionConfig()) -> int:
    """Bytes of memory `CachedScenes.load` needs for a scene, at most, on top of what the
    process held before (README, "When things go wrong", states it):

    - per point, 4 * spatial_dim + 140 bytes: the feature sums, the point cloud as read from
      the store (25) and as tensors (45), view counts and seen flags (5), and the sampling of
      the points each view sees (up to ~65);
    - one chunk of views: WORKING_BYTES, or BYTES_PER_VIEW_POINT per point when even a single
      view of the scene needs more (a chunk is never less than one view);
    - per usable view: its global embedding (4 * global_dim) and at most max_view_points
      (view, point) pairs of 8 bytes;
    - 96 MB of buffers torch's kernels and threads allocate on first use.
    Nothing here grows with views x points, nor with the size or number of depth maps.
    Measured on CPU (tests/reliability/test_memory_bound.py): 2M points, 32 usable views of
    640 stored: 638 MiB above the memory before loading, against a bound of 742 MiB (the code
    before took 2988 MiB)."""
    from pipeline.projection import BYTES_PER_VIEW_POINT, WORKING_BYTES

    per_point = 4 * spatial_dim + 140
    chunk = max(WORKING_BYTES, BYTES_PER_VIEW_POINT * n_points)
    per_view = 4 * global_dim + 8 * config.max_view_points + 32
    return n_points * per_point + chunk + n_views * per_view + 96 * 2**20


def _nbytes(sample: SceneSample) -> int:
    return sum(value.nbytes for value in vars(sample).values() if isinstance(value, torch.Tensor))


def augment(xyz: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Rotate about z, flip, scale and jitter (N, 3) points; returns new (N, 3) points."""
    device = xyz.device
    rand = lambda *shape: torch.rand(*shape, generator=generator).to(device)
    out = xyz - xyz.mean(dim=0, keepdim=True)
    if config.rotate_z:
        angle = float(rand(1)) * 2 * math.pi
        cos, sin = math.cos(angle), math.sin(angle)
        rotation = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0], [0.0, 0.0, 1.0]], device=device)
        out = out @ rotation.T
    if config.flip:
        signs = torch.where(rand(2) < 0.5, -1.0, 1.0)
        out = out * torch.cat([signs, torch.ones(1, device=device)])
    low, high = config.scale
    out = out * (low + (high - low) * float(rand(1)))
    if config.jitter > 0:
        noise = torch.randn(out.shape, generator=generator).to(device) * config.jitter
        out = out + noise
    return out


def collate(
    samples: Sequence[SceneSample],
    augmentation: AugmentConfig | None = None,
    generators: Sequence[torch.Generator] = (),
) -> PointBatch:
    """Concatenate scenes into one PointBatch, augmenting each scene's points.

    augmentation: None for evaluation (points as stored); otherwise `generators` holds one
    random generator per sample, so a scene's augmentation does not depend on which other
    scenes share its batch (or its process, under DDP). Visibility
    pairs come from each scene's (V, N) mask with view and point offsets added; instance and
    segment ids are offset so they are unique within the batch.
    """
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in (
        "xyz", "rgb", "batch_index", "feat2d", "seen", "semantic", "instance", "segment",
        "view_of_pair", "view_point_index", "view_global", "view_scene")}
    point_offset = view_offset = instance_offset = segment_offset = 0
    if augmentation is not None and len(generators) != len(samples):
        raise ValueError(f"collate: {len(samples)} samples but {len(generators)} generators")
    for index, sample in enumerate(samples):
        xyz = (sample.xyz if augmentation is None
               else augment(sample.xyz, augmentation, generators[index]))
        view, point = sample.view_pairs.long()
        parts["xyz"].append(xyz)
        parts["rgb"].append(sample.rgb)
        parts["batch_index"].append(torch.full_like(sample.semantic, index))
        parts["feat2d"].append(sample.feat2d)
        parts["seen"].append(sample.seen)
        parts["semantic"].append(sample.semantic)
        parts["instance"].append(_offset_ids(sample.instance, instance_offset))
        parts["segment"].append(_offset_ids(sample.segment, segment_offset))
        parts["view_of_pair"].append(view + view_offset)
        parts["view_point_index"].append(point + point_offset)
        parts["view_global"].append(sample.view_global)
        parts["view_scene"].append(torch.full((sample.view_global.shape[0],), index,
                                              dtype=torch.int64, device=sample.xyz.device))
        point_offset += sample.xyz.shape[0]
        view_offset += sample.view_global.shape[0]
        instance_offset += int(sample.instance.max().clamp_min(-1)) + 1
        segment_offset += int(sample.segment.max().clamp_min(-1)) + 1
    return PointBatch(**{name: torch.cat(tensors) for name, tensors in parts.items()})


def _offset_ids(ids: torch.Tensor, offset: int) -> torch.Tensor:
    """Shift non-negative ids by `offset`; -1 (none) stays -1."""
    return torch.where(ids >= 0, ids + offset, ids)
