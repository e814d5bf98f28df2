from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from model.batch import IGNORE_INDEX
from model.fusion import FusionModel, ModelOutput, pool_views
from model.losses import (
    LossConfig,
    clip_consistency_loss,
    clip_weight_schedule,
    compute_losses,
    distill_loss,
    effective_temperature,
    finite_or_skip,
    rebalance_for_global_mean,
    semantic_loss,
)
from tests.model.test_fusion import TINY, make_batch


def extreme(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Values of magnitude 45-50 with random signs, like CLIP's massive activations."""
    generator = torch.Generator().manual_seed(seed)
    magnitude = 45 + 5 * torch.rand(shape, generator=generator)
    return torch.where(torch.rand(shape, generator=generator) < 0.5, -magnitude, magnitude)


def test_semantic_loss_ignores_ignored_points_and_survives_all_ignored():
    logits = torch.tensor([[2.0, 0.0], [0.0, 3.0], [5.0, -5.0]], requires_grad=True)
    target = torch.tensor([0, IGNORE_INDEX, 1])
    expected = (F.softplus(torch.tensor(-2.0)) + F.softplus(torch.tensor(10.0))) / 2
    torch.testing.assert_close(semantic_loss(logits, target), expected)
    none_labelled = semantic_loss(logits, torch.full((3,), IGNORE_INDEX))
    assert none_labelled.item() == 0.0
    none_labelled.backward()
    assert (logits.grad == 0).all()


def test_temperature_below_floor_is_raised_to_it():
    assert effective_temperature(0.07) == 0.1
    assert effective_temperature(0.5) == 0.5
    learnable = torch.tensor(0.05, requires_grad=True)
    assert effective_temperature(learnable).item() == pytest.approx(0.1)
    embed, target = torch.randn(4, 6), torch.randn(4, 6)
    counts = torch.ones(4, dtype=torch.int64)
    assert clip_consistency_loss(embed, target, counts, temperature=0.07) == \
        clip_consistency_loss(embed, target, counts, temperature=0.1)


def test_loss_matches_closed_form_for_aligned_views():
    # Two views, each embedding equal to its own global and orthogonal to the other's:
    # cos = 1 on the diagonal, 0 off it; T = 0.1 -> logits 10 and 0.
    embed = torch.tensor([[3.0, 0.0], [0.0, 0.5]])
    loss = clip_consistency_loss(embed, embed * 7, torch.tensor([5, 9]), temperature=0.1)
    expected = (2 * math.log1p(math.exp(-10.0)) + 2 * math.log(2.0)) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_extreme_features_and_small_temperature_give_finite_loss_and_gradients():
    torch.manual_seed(0)
    model = FusionModel(TINY)
    # Half the points extreme, half ordinary.
    fused = torch.cat([extreme((250, TINY.width), seed=1), torch.randn(250, TINY.width)])
    fused.requires_grad_(True)
    batch = make_batch()
    pooled, counts = pool_views(fused, batch.view_of_pair, batch.view_point_index,
                                batch.num_views, TINY.view_feature_clamp)
    view_embed = model.clip_proj(pooled)
    loss = clip_consistency_loss(view_embed, extreme((6, TINY.clip_dim), seed=2), counts,
                                 temperature=0.07)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(fused.grad).all()
    # Clamped values pass no gradient; the ordinary points of a view still learn.
    assert (fused.grad[:250] == 0).all()
    assert (fused.grad[250:][batch.seen[250:]].abs().sum(dim=1) > 0).all()
    assert torch.isfinite(model.clip_proj.weight.grad).all()
    # Every pooled value stayed inside the clamp, so logits are bounded by 1 / 0.1.
    assert pooled.abs().max() <= TINY.view_feature_clamp
    assert loss.item() <= math.log1p(math.exp(10.0)) + 1e-4


def test_logsigmoid_form_is_exact_for_huge_logits():
    # A huge bias makes the off-diagonal logits ~1e4: -log(sigmoid(x) + eps) would saturate at
    # -log(eps) and give no gradient; -logsigmoid(x) is ~x, exactly, with gradient ~1.
    embed = torch.eye(2, requires_grad=True)
    loss = clip_consistency_loss(embed, torch.eye(2), torch.ones(2, dtype=torch.int64),
                                 temperature=0.1, logit_bias=1e4)
    expected = (2 * (1e4 + 0.0) + 2 * math.log1p(math.exp(-(1e4 + 10.0)))) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert torch.isfinite(embed.grad).all()


@pytest.mark.parametrize("epoch, weight", [(0, 0.0), (10, 0.0), (11, 0.001), (20, 0.001),
                                           (21, 0.01), (100, 0.01)])
def test_default_clip_weight_schedule(epoch: int, weight: float):
    assert clip_weight_schedule(epoch) == weight


def test_custom_clip_weight_schedule_is_sorted_and_zero_before_its_first_step():
    schedule = ((5, 0.5), (2, 0.1))
    assert [clip_weight_schedule(e, schedule) for e in (0, 2, 4, 5, 9)] == [0.0, 0.1, 0.1, 0.5, 0.5]


def test_views_that_see_no_point_are_left_out():
    generator = torch.Generator().manual_seed(3)
    embed, target = torch.randn(5, 4, generator=generator), torch.randn(5, 4, generator=generator)
    embed[1] = float("nan")  # what a 0/0 mean would have produced
    counts = torch.tensor([3, 0, 7, 0, 1])
    used = torch.tensor([0, 2, 4])
    loss = clip_consistency_loss(embed, target, counts)
    torch.testing.assert_close(loss, clip_consistency_loss(embed[used], target[used], counts[used]))
    embed.requires_grad_(True)
    none = clip_consistency_loss(embed, target, torch.zeros(5, dtype=torch.int64))
    assert none.item() == 0.0 and none.requires_grad  # in the graph: DDP needs every gradient


def test_finite_or_skip():
    assert finite_or_skip(torch.tensor(1.5))
    assert finite_or_skip(torch.tensor([0.0, -3.0]))
    assert not finite_or_skip(torch.tensor(float("nan")))
    assert not finite_or_skip(torch.tensor([1.0, float("inf")]))


def test_compute_losses_weights_the_clip_term_by_epoch():
    torch.manual_seed(0)
    batch = make_batch()
    output = FusionModel(TINY)(batch)
    early = compute_losses(output, batch, epoch=3)
    late = compute_losses(output, batch, epoch=30, cfg=LossConfig(semantic_weight=2.0))
    assert set(early) == {"semantic", "offset", "direction", "clip", "distill", "clip_weight",
                          "total", "counts"}
    assert early["counts"].tolist() == [float((batch.semantic >= 0).sum()), 0.0,
                                        float(batch.seen.sum())]
    assert early["distill"].item() == 0.0  # TINY computes no point embeddings
    assert early["clip_weight"].item() == 0.0 and late["clip_weight"].item() == pytest.approx(0.01)
    assert early["offset"].item() == 0.0  # make_batch has no instances
    torch.testing.assert_close(early["total"], 0.4 * early["semantic"])
    torch.testing.assert_close(late["total"], 2.0 * late["semantic"] + 0.01 * late["clip"])
    assert 0.0 < early["clip"].item() < 10.0
    # During warm-up a non-finite CLIP term does not reach the total.
    poisoned = dataclasses.replace(output, view_embed=torch.full_like(output.view_embed, math.nan))
    assert finite_or_skip(compute_losses(poisoned, batch, epoch=3)["total"])
    assert not finite_or_skip(compute_losses(poisoned, batch, epoch=30)["total"])


def test_no_gradient_reaches_the_2d_features():
    torch.manual_seed(0)
    model = FusionModel(TINY)
    batch = make_batch()
    before = batch.feat2d.clone()
    losses = compute_losses(model(batch), batch, epoch=30)
    losses["total"].backward()
    assert not batch.feat2d.requires_grad
    assert batch.feat2d.grad is None
    torch.testing.assert_close(batch.feat2d, before, rtol=0, atol=0)
    # ...while the 2D projection, the gate and clip_proj do learn.
    for module in (model.proj_2d, model.gate_mlp, model.clip_proj):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_compute_losses_without_views_is_the_semantic_term():
    output = ModelOutput(
        fused=torch.zeros(2, 3), gate=torch.zeros(2),
        head_outputs={"semantic": torch.tensor([[4.0, 0.0], [0.0, 4.0]])},
        view_embed=torch.zeros(0, 5), view_point_count=torch.zeros(0, dtype=torch.int64))
    batch = dataclasses.replace(make_batch((2,), views_per_scene=0, clip_dim=5),
                                semantic=torch.tensor([0, 1]))
    losses = compute_losses(output, batch, epoch=50)
    assert losses["clip"].item() == 0.0
    assert losses["total"].item() == pytest.approx(0.4 * math.log1p(math.exp(-4.0)), rel=1e-5)


def test_rebalanced_shares_average_to_the_whole_batch_loss():
    """Two processes' shares of a batch hold 30 and 10 labelled points (and 5 and 15 instance
    points): DDP's average of their rebalanced losses is the loss of the 40 points together."""
    cfg = LossConfig(clip_schedule=((0, 0.5),), distill_weight=2.0)
    sums = [{"semantic": 6.0, "offset": 1.0, "direction": 2.0}, {"semantic": 1.0, "offset": 6.0,
                                                                  "direction": 0.5}]
    counts = [torch.tensor([30.0, 5.0, 8.0]), torch.tensor([10.0, 15.0, 2.0])]
    shares = [{"semantic": torch.tensor(s["semantic"] / c[0]), "offset": torch.tensor(s["offset"] / c[1]),
               "direction": torch.tensor(s["direction"] / c[1]), "clip": torch.tensor(clip),
               "distill": torch.tensor(distill / c[2]), "counts": c}
              for s, c, clip, distill in zip(sums, counts, (0.2, 0.4), (4.0, 1.0))]
    rebalanced = [rebalance_for_global_mean(share, counts[0] + counts[1], 2, epoch=1, cfg=cfg)
                  for share in shares]
    average = {name: (rebalanced[0][name] + rebalanced[1][name]) / 2
               for name in ("semantic", "offset", "direction", "distill", "total")}
    assert average["semantic"].item() == pytest.approx(7.0 / 40)
    assert average["offset"].item() == pytest.approx(7.0 / 20)
    assert average["direction"].item() == pytest.approx(2.5 / 20)
    assert average["distill"].item() == pytest.approx(5.0 / 10)
    expected_total = 0.4 * 7.0 / 40 + 7.0 / 20 + 2.5 / 20 + 2.0 * 5.0 / 10 + 0.5 * (0.2 + 0.4) / 2
    assert average["total"].item() == pytest.approx(expected_total)


def test_distill_loss_is_one_minus_cosine_over_seen_points():
    embed = torch.tensor([[1.0, 0.0], [0.0, 2.0], [5.0, 5.0]], requires_grad=True)
    feat2d = torch.tensor([[2.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])
    seen = torch.tensor([True, True, False])
    loss = distill_loss(embed, feat2d, seen)
    assert loss.item() == pytest.approx(1.0 - (1.0 + 0.0) / 2)  # cosines 1 and 0; unseen ignored
    loss.backward()
    assert embed.grad[2].abs().sum() == 0 and embed.grad[1].abs().sum() > 0
    none_seen = distill_loss(embed, feat2d, torch.zeros(3, dtype=torch.bool))
    assert none_seen.item() == 0.0 and none_seen.requires_grad
