from __future__ import annotations

import dataclasses

import pytest
import torch

from model.network.backbone import SparseUNetConfig
from model.batch import IGNORE_INDEX, PointBatch
from model.network.fusion import FusionConfig, FusionModel, pool_views
from model.network.losses import semantic_loss
from model.metrics import confusion_matrix, mean_iou

TINY = FusionConfig(
    backbone=SparseUNetConfig(voxel_size=0.1, channels=(8, 16), blocks=(1, 1), out_channels=96),
    dim_2d=12, width=32, gate_hidden=16, num_classes=5, head_hidden=32, clip_dim=10,
)


def box_surface(low: list[float], high: list[float], count: int,
                generator: torch.Generator) -> torch.Tensor:
    """(count, 3) float32 points uniform over the surface of the box [low, high]."""
    low_t, high_t = torch.tensor(low), torch.tensor(high)
    size = high_t - low_t
    face_area = torch.stack([size[1] * size[2], size[0] * size[2], size[0] * size[1]])
    axis = torch.multinomial(face_area.repeat(2), count, replacement=True, generator=generator) % 3
    xyz = low_t + torch.rand(count, 3, generator=generator) * size
    upper = torch.rand(count, generator=generator) < 0.5
    rows = torch.arange(count)
    xyz[rows, axis] = torch.where(upper, high_t[axis], low_t[axis])
    return xyz


def make_batch(points_per_scene: tuple[int, ...] = (300, 200), dim_2d: int = 12, clip_dim: int = 10,
               views_per_scene: int = 3, seed: int = 0) -> PointBatch:
    """Scenes of random box-surface points, half of them seen, each view seeing a random third."""
    generator = torch.Generator().manual_seed(seed)
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("xyz", "batch", "view", "point")}
    offset = 0
    for scene, count in enumerate(points_per_scene):
        parts["xyz"].append(box_surface([0, 0, 0], [1.0, 0.8, 0.6], count, generator))
        parts["batch"].append(torch.full((count,), scene, dtype=torch.int64))
        visible = torch.rand(views_per_scene, count, generator=generator) < 0.33
        view, point = visible.nonzero(as_tuple=True)
        parts["view"].append(view + scene * views_per_scene)
        parts["point"].append(point + offset)
        offset += count
    total = offset
    seen = torch.zeros(total, dtype=torch.bool)
    seen[torch.cat(parts["point"])] = True
    feat2d = torch.randn(total, dim_2d, generator=generator) * seen[:, None]
    return PointBatch(
        xyz=torch.cat(parts["xyz"]),
        rgb=torch.rand(total, 3, generator=generator),
        batch_index=torch.cat(parts["batch"]),
        feat2d=feat2d,
        seen=seen,
        semantic=torch.randint(0, 5, (total,), generator=generator),
        instance=torch.full((total,), -1, dtype=torch.int64),
        view_of_pair=torch.cat(parts["view"]),
        view_point_index=torch.cat(parts["point"]),
        view_global=torch.randn(views_per_scene * len(points_per_scene), clip_dim,
                                generator=generator),
        view_scene=torch.arange(len(points_per_scene)).repeat_interleave(views_per_scene),
    )


def test_output_shapes_and_gate_range():
    torch.manual_seed(0)
    batch = make_batch()
    output = FusionModel(TINY)(batch)
    assert output.fused.shape == (500, 32)
    assert output.semantic_logits.shape == (500, 5)
    assert output.view_embed.shape == (6, 10)
    assert output.view_point_count.sum() == len(batch.view_of_pair)
    seen_gate = output.gate[batch.seen]
    assert ((seen_gate > 0) & (seen_gate < 1)).all()
    assert (output.gate[~batch.seen] == 0).all()


def test_unseen_points_use_only_the_3d_path():
    torch.manual_seed(0)
    model = FusionModel(TINY).eval()
    batch = make_batch()
    output = model(batch)
    altered = batch.feat2d.clone()
    altered[~batch.seen] = 1e4 * torch.randn(int((~batch.seen).sum()), TINY.dim_2d)
    changed = model(dataclasses.replace(batch, feat2d=altered))
    for name in ("fused", "gate", "semantic_logits", "view_embed"):
        torch.testing.assert_close(getattr(changed, name), getattr(output, name), rtol=0, atol=0)
    only_3d = model.proj_3d(model.backbone(batch.xyz, batch.rgb, batch.batch_index))
    torch.testing.assert_close(output.fused[~batch.seen], only_3d[~batch.seen])
    # ...while a seen point's 2D feature does move its fused feature.
    altered = batch.feat2d.clone()
    altered[batch.seen] += 1.0
    moved = model(dataclasses.replace(batch, feat2d=altered)).fused
    assert (moved[batch.seen] - output.fused[batch.seen]).abs().amax(dim=1).min() > 1e-4


def test_pure_3d_model_ignores_2d_features():
    torch.manual_seed(0)
    model = FusionModel(dataclasses.replace(TINY, use_2d=False)).eval()
    assert not any(name.startswith(("proj_2d", "gate_mlp")) for name, _ in model.named_parameters())
    batch = make_batch()
    output = model(batch)
    other = model(dataclasses.replace(batch, feat2d=torch.randn_like(batch.feat2d)))
    torch.testing.assert_close(other.fused, output.fused, rtol=0, atol=0)
    assert (output.gate == 0).all()


def test_wrong_2d_width_is_a_clear_error():
    with pytest.raises(ValueError, match="dim_2d"):
        FusionModel(TINY)(make_batch(dim_2d=7))


def test_pool_views_means_clamped_features_and_counts_empty_views():
    features = torch.tensor([[1.0, 100.0], [3.0, -2.0], [5.0, 4.0]], requires_grad=True)
    view_of_pair = torch.tensor([0, 0, 2, 2, 2])
    point = torch.tensor([0, 1, 0, 1, 2])
    pooled, counts = pool_views(features, view_of_pair, point, num_views=3, clamp=10.0)
    assert counts.tolist() == [2, 0, 3]
    torch.testing.assert_close(pooled, torch.tensor([[2.0, 4.0], [0.0, 0.0], [3.0, 4.0]]))
    pooled.sum().backward()
    # Clamped value: no gradient; others: 1/2 from view 0 plus 1/3 from view 2.
    torch.testing.assert_close(features.grad, torch.tensor(
        [[5 / 6, 0.0], [5 / 6, 5 / 6], [1 / 3, 1 / 3]]))


def test_point_batch_to_moves_every_tensor_and_checks_rows():
    batch = dataclasses.replace(make_batch(), segment=torch.zeros(500, dtype=torch.int64))
    moved = batch.to("meta")
    for field in dataclasses.fields(PointBatch):
        assert getattr(moved, field.name).device.type == "meta", field.name
    assert moved.num_points == 500 and moved.num_views == 6
    with pytest.raises(ValueError, match="seen"):
        dataclasses.replace(batch, seen=batch.seen[:10])
    with pytest.raises(ValueError, match="requires grad"):
        dataclasses.replace(batch, feat2d=batch.feat2d.clone().requires_grad_(True))


def synthetic_room(seed: int = 0) -> PointBatch:
    """A floor, a box, a pole and a table top: four classes told apart by shape, not colour.

    Colours are one random distribution for all; half the points carry uninformative 2D
    features, so learning must come from geometry through the 3D path.
    """
    generator = torch.Generator().manual_seed(seed)
    parts = [
        box_surface([0.0, 0.0, -0.04], [1.6, 1.6, 0.0], 1200, generator),   # floor
        box_surface([0.2, 0.2, 0.0], [0.6, 0.6, 0.4], 700, generator),      # box
        box_surface([1.2, 0.3, 0.0], [1.28, 0.38, 0.9], 400, generator),    # pole
        box_surface([0.6, 1.0, 0.5], [1.4, 1.4, 0.56], 700, generator),     # table top
    ]
    xyz = torch.cat(parts)
    semantic = torch.cat([torch.full((len(p),), label) for label, p in enumerate(parts)])
    semantic[torch.rand(len(xyz), generator=generator) < 0.02] = IGNORE_INDEX
    total = len(xyz)
    seen = torch.rand(total, generator=generator) < 0.5
    return PointBatch(
        xyz=xyz,
        rgb=torch.rand(total, 3, generator=generator),
        batch_index=torch.zeros(total, dtype=torch.int64),
        feat2d=torch.randn(total, 16, generator=generator) * seen[:, None],
        seen=seen,
        semantic=semantic,
        instance=torch.full((total,), -1, dtype=torch.int64),
        view_of_pair=torch.zeros(0, dtype=torch.int64),
        view_point_index=torch.zeros(0, dtype=torch.int64),
        view_global=torch.zeros(0, 8),
        view_scene=torch.zeros(0, dtype=torch.int64),
    )


def test_full_model_overfits_a_small_synthetic_scene():
    torch.manual_seed(0)
    config = FusionConfig(
        backbone=SparseUNetConfig(voxel_size=0.04, channels=(16, 32, 48), blocks=(1, 1, 1)),
        dim_2d=16, width=64, gate_hidden=32, num_classes=4, head_hidden=64, clip_dim=8)
    model = FusionModel(config)
    batch = synthetic_room()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(40):
        loss = semantic_loss(model(batch).semantic_logits, batch.semantic)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        prediction = model(batch).semantic_logits.argmax(dim=1)
    assert mean_iou(confusion_matrix(prediction, batch.semantic, 4)) >= 0.9


def test_forward_and_backward_under_autocast():
    torch.manual_seed(0)
    model = FusionModel(TINY)
    batch = make_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = model(batch)
        loss = (semantic_loss(output.semantic_logits, batch.semantic)
                + output.view_embed.float().sum() + output.head_outputs["offset"].float().sum())
    loss.backward()
    assert torch.isfinite(loss)
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.dtype == torch.float32, name
        assert torch.isfinite(parameter.grad).all(), name
