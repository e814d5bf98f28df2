"""Read the cache from your own training code: scenes, their geometry, per-point CLIP features.

    from model.reader import open_cache

    cache = open_cache("storage/features.zarr")      # a path or an fsspec URL (s3://...)
    cache.scenes()                                   # ['scene0000_00', ...]
    cache.featuresets()                              # {'6ec6a14bd4df': FeatureSetSpec(...)}
    scene = cache.geometry("scene0000_00")           # points, labels, frames: numpy
    points = cache.point_features("scene0000_00")    # (N, C) features, (N,) seen mask
    dataset = cache.dataset()                        # a torch Dataset, one scene an item

Per-point features come from stage 2's own projection (`model.dataset.CachedScenes`, which
runs `pipeline.projection.fuse_features`): each point gets the mean of the cached spatial
features of the usable views that see it (depth test, colour-to-grid mapping, bilinear
sampling), so what your model reads is exactly what `python -m model.train` trains on. Nothing
here imports the network, the training loop or open_clip.

Errors are `storage.StoreError` with one line naming the store, scene, frame or file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from model.dataset import CachedScenes, ProjectionConfig  # stage 2's loader, not its network
from storage.errors import StoreError
from storage.featureset import FeatureSetSpec
from storage.store import FeatureArrays, FeatureStore, SceneArrays, open_store

SAMPLE_KEYS = ("scene_id", "xyz", "rgb", "features", "seen", "semantic", "instance", "segment",
               "view_global")
"""Keys of a `SceneDataset` item (see `SceneDataset.__getitem__`)."""


@dataclass(frozen=True)
class PointFeatures:
    """A scene's per-point 2D features, on the device they were computed on.

    features: (N, C) float32, mean cached spatial feature over the usable views that see the
        point; zeros where `seen` is False (a zero is not a feature: mask with `seen`).
    seen: (N,) bool, at least one usable view sees the point.
    view_global: (V, D) float32, the global CLIP embeddings of the V usable views.
    """

    scene_id: str
    featureset: str
    features: torch.Tensor
    seen: torch.Tensor
    view_global: torch.Tensor


class Cache:
    """A read-only feature store (use `open_cache`)."""

    def __init__(self, store: FeatureStore):
        self.store = store

    def __repr__(self) -> str:
        return f"Cache({self.store.url!r})"

    @property
    def url(self) -> str:
        return self.store.url

    def scenes(self) -> list[str]:
        """Ids of the scenes completely in the store, sorted."""
        return self.store.scenes()

    def featuresets(self) -> dict[str, FeatureSetSpec]:
        """Feature-set id -> its spec (storage.featureset: encoder, model, weights, image_size,
        grid_size, spatial_dim, global_dim, resize, whether it is text-aligned, ...)."""
        return self.store.featuresets()

    def featureset(self, featureset: str | None = None) -> str:
        """The id of `featureset`, or of the store's only feature set when None; a
        StoreError listing them when there are several (or none)."""
        available = self.featuresets()
        if featureset is None and len(available) == 1:
            return next(iter(available))
        listing = "; ".join(spec.describe(f) for f, spec in available.items()) or "none"
        if featureset is None or featureset not in available:
            what = "which feature set to read" if featureset is None else \
                f"no feature set {featureset}"
            raise StoreError(f"{self.url}: {what} (it has: {listing}); pass featureset=<id>")
        return featureset

    def geometry(self, scene_id: str, *, with_depth: bool = False) -> SceneArrays:
        """A scene's points (xyz metres world, rgb, semantic ScanNet-20 with -100 ignored,
        instance -1 none, segment -1 unknown) and frames (camera-to-world poses, intrinsics,
        valid flags; depth maps with with_depth=True), as numpy arrays."""
        return self.store.scene(scene_id, with_depth=with_depth)

    def frame_features(self, scene_id: str, featureset: str | None = None) -> FeatureArrays:
        """The cached per-frame arrays: spatial (F, gh, gw, C) and global (F, D) float16 and
        done (F,); use frames where geometry().valid & done."""
        return self.store.features(scene_id, self.featureset(featureset))

    def point_features(self, scene_id: str, featureset: str | None = None, *,
                       device: str | torch.device = "cpu",
                       projection: ProjectionConfig = ProjectionConfig()) -> PointFeatures:
        """Project a scene's cached spatial features onto its points, as stage 2 does.

        Reads the scene's geometry, then its depth maps and feature grids a chunk of views at
        a time; computes on `device` under no_grad. projection: the depth test's thresholds
        (metres, and a fraction of the measured depth), views projected at once. Raises StoreError when the scene is not
        completely extracted for the feature set or a chunk is missing or corrupt.
        """
        featureset = self.featureset(featureset)
        sample = self._project(scene_id, featureset, device, projection)
        return PointFeatures(scene_id=scene_id, featureset=featureset, features=sample.feat2d,
                             seen=sample.seen, view_global=sample.view_global)

    def dataset(self, featureset: str | None = None, scenes: list[str] | None = None, *,
                projection: ProjectionConfig = ProjectionConfig()) -> SceneDataset:
        """A torch Dataset over `scenes` (default all), one scene an item (see SceneDataset)."""
        return SceneDataset(self.url, featureset=self.featureset(featureset),
                            scenes=self.scenes() if scenes is None else list(scenes),
                            projection=projection, storage_options=self.store.storage_options)

    def _project(self, scene_id: str, featureset: str, device: str | torch.device,
                 projection: ProjectionConfig):
        """Stage 2's SceneSample of the scene: its loader, holding nothing in memory after."""
        loader = CachedScenes({scene_id: self.store}, featureset, torch.device(device),
                              projection=projection, cache_bytes=0)
        return loader.load(scene_id)


def open_cache(path_or_url: str | os.PathLike,
               storage_options: dict[str, Any] | None = None) -> Cache:
    """Open a feature store for reading: a local path or an fsspec URL (s3://bucket/x.zarr,
    gs://...); storage_options: non-secret fsspec options such as {"endpoint_url": ...}
    (credentials come from the environment). Raises StoreError (one line) when there is no
    store there or it cannot be read."""
    return Cache(open_store(path_or_url, mode="r", storage_options=storage_options))


class SceneDataset(torch.utils.data.Dataset):
    """Scenes of one feature set, one scene an item, as a dict of CPU tensors:

    scene_id: str. xyz: (N, 3) float32 metres, world frame. rgb: (N, 3) float32 in [0, 1].
    features: (N, C) float32 per-point CLIP features (zeros where not seen).
    seen: (N,) bool. semantic: (N,) int64 ScanNet-20 class, -100 ignored.
    instance: (N,) int64, -1 none. segment: (N,) int64, -1 unknown.
    view_global: (V, D) float32 global CLIP embeddings of the scene's usable views.

    Scenes differ in N, so batch them yourself or use DataLoader(batch_size=None). Works
    with DataLoader workers: each worker opens the store itself.
    """

    def __init__(self, url: str, featureset: str, scenes: list[str], *,
                 projection: ProjectionConfig = ProjectionConfig(),
                 storage_options: dict[str, Any] | None = None):
        self.url, self.featureset, self.scenes = url, featureset, list(scenes)
        self.projection, self.storage_options = projection, storage_options
        self._cache: Cache | None = None

    def __len__(self) -> int:
        return len(self.scenes)

    @property
    def feature_dim(self) -> int:
        """C, the width of `features`."""
        return self._open().featuresets()[self.featureset].spatial_dim

    def __getitem__(self, index: int) -> dict[str, Any]:
        cache = self._open()
        scene_id = self.scenes[index]
        sample = cache._project(scene_id, self.featureset, "cpu", self.projection)
        return {"scene_id": scene_id, "xyz": sample.xyz, "rgb": sample.rgb,
                "features": sample.feat2d, "seen": sample.seen, "semantic": sample.semantic,
                "instance": sample.instance, "segment": sample.segment,
                "view_global": sample.view_global}

    def _open(self) -> Cache:
        if self._cache is None:  # per process: a DataLoader worker opens its own
            self._cache = open_cache(self.url, self.storage_options)
        return self._cache

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cache": None}
