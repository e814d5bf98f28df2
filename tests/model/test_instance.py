"""The instance branch: offset targets and losses, clustering (AP: test_instance_eval.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.network.instance import (
    ClusterConfig,
    InstancePrediction,
    centre_offsets,
    cluster_scene,
    offset_losses,
)


def test_offset_targets_point_at_instance_centres():
    xyz = torch.tensor([[0.0, 0, 0], [2, 0, 0], [10, 10, 10], [5, 5, 5]])
    instance = torch.tensor([3, 3, 7, -1])
    target, has = centre_offsets(xyz, instance)
    torch.testing.assert_close(target, torch.tensor([[1.0, 0, 0], [-1, 0, 0], [0, 0, 0], [0, 0, 0]]))
    assert has.tolist() == [True, True, True, False]
    l1, direction = offset_losses(target.clone().requires_grad_(True), xyz, instance)
    # the third point sits on its centre: a zero target has no direction (cosine 0)
    assert l1.item() == 0.0 and direction.item() == pytest.approx(1 / 3, abs=1e-6)
    no_instance = offset_losses(torch.ones(4, 3, requires_grad=True), xyz, torch.full((4,), -1))
    assert no_instance[0].item() == 0.0 and no_instance[0].requires_grad


def two_boxes(n: int = 200, seed: int = 0):
    """Two separate clusters of class 3 and one of class 5, with exact offsets."""
    rng = np.random.default_rng(seed)
    centres = np.array([[0.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0]])
    xyz = np.concatenate([c + rng.uniform(-0.1, 0.1, (n, 3)) for c in centres])
    instance = np.repeat([0, 1, 2], n)
    semantic = np.repeat([3, 3, 5], n)
    offsets = centres[instance] - xyz
    probabilities = np.full((3 * n, 8), 0.01)
    probabilities[np.arange(3 * n), semantic] = 0.93
    return xyz, offsets, probabilities, semantic, instance


def test_clustering_recovers_instances_from_exact_offsets():
    xyz, offsets, probabilities, semantic, instance = two_boxes()
    segment = np.full(len(xyz), -1)
    found = cluster_scene(xyz, offsets, probabilities, segment, (3, 5), ClusterConfig(0.03, 20))
    assert sorted((p.label, p.points.size) for p in found) == [(3, 200), (3, 200), (5, 200)]
    for prediction in found:
        assert len(np.unique(instance[prediction.points])) == 1
        assert prediction.score == pytest.approx(0.93)
    # without offsets the two class-3 boxes, 1 m apart, stay apart; noise joins by superpoint
    noisy = offsets + np.random.default_rng(1).normal(0, 0.2, offsets.shape)
    segment = instance.copy()  # one superpoint per object
    found = cluster_scene(xyz, noisy, probabilities, segment, (3, 5), ClusterConfig(0.03, 20))
    assert len(found) == 3
