"""The cache-backed dataset: projection from a real store, collation, augmentation, metrics."""

from __future__ import annotations

import math

import numpy as np

import torch

from model.batch import IGNORE_INDEX
from model.dataset import AugmentConfig, CachedScenes, augment, collate
from model.metrics import class_iou, confusion_matrix, mean_iou
from storage import open_store


def test_scenes_from_the_store_are_projected_and_collated(tiny_store):
    store = open_store(tiny_store)
    (featureset,) = store.featuresets()
    scenes = CachedScenes({s: store for s in store.scenes()}, featureset, torch.device("cpu"))
    a, b = scenes.get("scene0000_00"), scenes.get("scene0001_00")
    assert scenes.get("scene0000_00") is a  # the second epoch reads memory, not the store
    assert a.seen.float().mean() > 0.5 and not a.feat2d[~a.seen].any()
    assert a.view_visible.shape == (8, a.xyz.shape[0]) and a.view_global.shape == (8, 64)
    batch = collate([a, b])
    n_a, n_b = a.xyz.shape[0], b.xyz.shape[0]
    assert batch.num_points == n_a + n_b and batch.num_views == 16
    assert (batch.batch_index[:n_a] == 0).all() and (batch.batch_index[n_a:] == 1).all()
    assert len(batch.view_of_pair) == int(a.view_visible.sum() + b.view_visible.sum())
    second = batch.view_of_pair >= 8  # pairs of scene b point at scene b's points
    assert (batch.view_point_index[second] >= n_a).all() and (batch.view_point_index[~second] < n_a).all()
    ids_a = set(batch.instance[:n_a].unique().tolist()) - {-1}
    ids_b = set(batch.instance[n_a:].unique().tolist()) - {-1}
    assert ids_a and ids_b and not ids_a & ids_b  # instance ids unique across the batch


def test_scene_cache_is_bounded(tiny_store):
    store = open_store(tiny_store)
    (featureset,) = store.featuresets()
    scenes = CachedScenes({s: store for s in store.scenes()}, featureset, torch.device("cpu"),
                          cache_bytes=1)
    scenes.get("scene0000_00")
    scenes.get("scene0001_00")
    assert list(scenes._cache) == ["scene0001_00"]


def test_augmentation_keeps_shape_and_distances_up_to_scale():
    xyz = torch.rand(500, 3)
    generator = torch.Generator().manual_seed(0)
    moved = augment(xyz, AugmentConfig(jitter=0.0, scale=(1.0, 1.0)), generator)
    distances = lambda p: torch.cdist(p, p, compute_mode="donot_use_mm_for_euclid_dist")
    torch.testing.assert_close(distances(moved), distances(xyz), atol=1e-5, rtol=0)
    assert not torch.allclose(moved, xyz - xyz.mean(0))
    same = augment(xyz, AugmentConfig.none(), generator)
    torch.testing.assert_close(same, xyz - xyz.mean(0))


def test_confusion_matrix_and_iou():
    target = torch.tensor([0, 0, 1, 1, 2, IGNORE_INDEX])
    prediction = torch.tensor([0, 1, 1, 1, 0, 2])
    confusion = confusion_matrix(prediction, target, 4)
    assert confusion.sum() == 5 and confusion[0, 0] == 1 and confusion[2, 0] == 1
    iou = class_iou(confusion)
    assert math.isclose(iou[0], 1 / 3) and math.isclose(iou[1], 2 / 3) and iou[2] == 0
    assert math.isnan(iou[3])  # absent from the target: no IoU of its own
    assert math.isclose(mean_iou(confusion), (1 / 3 + 2 / 3 + 0) / 3)


def test_invalid_frames_never_reach_training(tiny_store, tmp_path):
    import shutil

    path = tmp_path / "store.zarr"
    shutil.copytree(tiny_store, path)
    store = open_store(path, mode="a")
    (featureset,) = store.featuresets()
    frames = store.root["scenes"]["scene0000_00"]["frames"]
    frames["valid"][0] = False
    frames["reason"][0] = "colour image does not decode (color/0.jpg)"
    load = lambda: CachedScenes({"scene0000_00": store}, featureset,  # noqa: E731
                                torch.device("cpu")).load("scene0000_00")
    before = load()
    assert before.view_global.shape[0] == 7 and before.view_visible.shape[0] == 7
    spatial = store.root["scenes"]["scene0000_00"]["features"][featureset]["spatial"]
    spatial[0] = np.full(spatial.shape[1:], 1000.0, np.float16)  # the invalid frame's features
    frames["pose"][0] = np.full((4, 4), -np.inf)
    after = load()
    torch.testing.assert_close(after.feat2d, before.feat2d, rtol=0, atol=0)
