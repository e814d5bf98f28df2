from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from model.batch import IGNORE_INDEX
from model.network.fusion import FusionModel, ModelOutput, pool_views
from model.network.losses import (
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


def test_loss_matches_closed_form():
    # Two views: the first's embedding points along its own global embedding (cos 1), the
    # second's is orthogonal to its own (cos 0); T = 0.1 -> logits 10 and 0.
    embed = torch.tensor([[3.0, 0.0], [0.0, 0.5]])
    target = torch.tensor([[7.0, 0.0], [2.0, 0.0]])
    loss = clip_consistency_loss(embed, target, torch.tensor([5, 9]), temperature=0.1)
    expected = (math.log1p(math.exp(-10.0)) + math.log(2.0)) / 2
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


def test_logsigmoid_form_is_exact_for_an_opposed_view():
    # An embedding nearly opposite to its target, cos ~ -0.99 at T = 0.1: -logsigmoid(10 cos)
    # is softplus(-10 cos), value and gradient; BiFusion's -log(sigmoid(10 cos) + 1e-8) is off
    # by the 1e-8 floor there (and saturates at -log(1e-8) ~ 18.4 with T = 0.07 and a bias).
    embed = torch.tensor([[-2.0, 0.3]], requires_grad=True)
    target = torch.tensor([[1.0, 0.0]])
    loss = clip_consistency_loss(embed, target, torch.ones(1, dtype=torch.int64))
    reference_embed = embed.detach().double().requires_grad_(True)
    cosine = F.cosine_similarity(reference_embed, target.double(), dim=1)
    reference = F.softplus(-cosine / 0.1).mean()
    reference.backward()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    seed_form = -math.log(1 / (1 + math.exp(-cosine.item() / 0.1)) + 1e-8)
    assert abs(seed_form - reference.item()) > 1e-5
    loss.backward()
    torch.testing.assert_close(embed.grad.double(), reference_embed.grad, rtol=1e-5, atol=1e-7)


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
                                        float(batch.seen.sum()),
                                        float((output.view_point_count > 0).sum())]
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
    points, 3 and 1 views): DDP's average of their rebalanced losses is the loss of the 40
    points (and 4 views) together."""
    cfg = LossConfig(clip_schedule=((0, 0.5),), distill_weight=2.0)
    sums = [{"semantic": 6.0, "offset": 1.0, "direction": 2.0}, {"semantic": 1.0, "offset": 6.0,
                                                                  "direction": 0.5}]
    counts = [torch.tensor([30.0, 5.0, 8.0, 3.0]), torch.tensor([10.0, 15.0, 2.0, 1.0])]
    shares = [{"semantic": torch.tensor(s["semantic"] / c[0]), "offset": torch.tensor(s["offset"] / c[1]),
               "direction": torch.tensor(s["direction"] / c[1]), "clip": torch.tensor(clip),
               "distill": torch.tensor(distill / c[2]), "counts": c}
              for s, c, clip, distill in zip(sums, counts, (0.2, 0.4), (4.0, 1.0))]
    rebalanced = [rebalance_for_global_mean(share, counts[0] + counts[1], 2, epoch=1, cfg=cfg)
                  for share in shares]
    average = {name: (rebalanced[0][name] + rebalanced[1][name]) / 2
               for name in ("semantic", "offset", "direction", "distill", "clip", "total")}
    assert average["semantic"].item() == pytest.approx(7.0 / 40)
    assert average["offset"].item() == pytest.approx(7.0 / 20)
    assert average["direction"].item() == pytest.approx(2.5 / 20)
    assert average["distill"].item() == pytest.approx(5.0 / 10)
    assert average["clip"].item() == pytest.approx((3 * 0.2 + 1 * 0.4) / 4)
    expected_total = (0.4 * 7.0 / 40 + 7.0 / 20 + 2.5 / 20 + 2.0 * 5.0 / 10
                      + 0.5 * (3 * 0.2 + 1 * 0.4) / 4)
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


# ---------------------------------------------------------------------------- the CLIP term's
# direction, on views of one room: their global CLIP embeddings are near duplicates (pairwise
# cosine 0.87-0.98 on the tiny test store), which is where a loss that takes a scene's other
# views as negatives turns against its purpose.


def near_duplicate_views(n_views: int = 6, dim: int = 32, seed: int = 0) -> torch.Tensor:
    """(n_views, dim) global embeddings of the views of one room: one direction shared by all
    plus a small per-view part, pairwise cosine >= 0.9."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(dim, generator=generator)
    views = base + 0.2 * base.norm() / math.sqrt(dim) * torch.randn(n_views, dim, generator=generator)
    unit = F.normalize(views, dim=1)
    assert (unit @ unit.T).min() >= 0.9
    return views * 3.0  # CLIP's global embeddings are not unit vectors


def own_cosines(embed: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(embed, target, dim=1)


def descend(loss, shape: tuple[int, int], seed: int, steps: int = 1500) -> torch.Tensor:
    """Free embeddings from a random start after `steps` of Adam on `loss(embed)`. (The
    positive term saturates as the cosine nears 1, sigmoid(10 cos): the steps it takes to
    get there are why Adam's second-moment average is kept short.)"""
    embed = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).requires_grad_(True)
    optimizer = torch.optim.Adam([embed], lr=0.02, betas=(0.9, 0.99))
    for _ in range(steps):
        optimizer.zero_grad()
        loss(embed).backward()
        optimizer.step()
    return embed.detach()


def test_clip_loss_is_lowest_when_each_view_matches_its_own_embedding():
    targets = near_duplicate_views()
    counts = torch.full((6,), 40)
    generator = torch.Generator().manual_seed(1)
    aligned = clip_consistency_loss(targets * 0.5, targets, counts)
    random = torch.stack([clip_consistency_loss(torch.randn(targets.shape, generator=generator),
                                                targets, counts) for _ in range(20)])
    anti = clip_consistency_loss(-targets, targets, counts)
    assert aligned < random.min() and random.max() < anti
    # the default is BiFusion's per-view positive term, -logsigmoid(cos / T), with T = 0.1
    assert aligned.item() == pytest.approx(math.log1p(math.exp(-10.0)), rel=1e-4)
    assert anti.item() == pytest.approx(math.log1p(math.exp(10.0)), rel=1e-6)


def test_descending_the_clip_loss_aligns_each_view_with_its_own_embedding():
    targets = near_duplicate_views()
    counts = torch.full((6,), 40)
    start = torch.randn(targets.shape, generator=torch.Generator().manual_seed(2))
    assert own_cosines(start, targets).abs().max() < 0.5
    embed = descend(lambda e: clip_consistency_loss(e, targets, counts), targets.shape, seed=2)
    assert own_cosines(embed, targets).min() >= 0.95


def two_rooms(views_per_room: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Global embeddings of two rooms' views (near duplicates within a room) and (V,) the room
    of each view."""
    targets = torch.cat([near_duplicate_views(views_per_room, seed=0),
                         near_duplicate_views(views_per_room, seed=5)])
    return targets, torch.repeat_interleave(torch.arange(2), views_per_room)


def test_contrastive_clip_loss_takes_negatives_only_from_other_scenes():
    targets, scene = two_rooms()
    counts = torch.full((8,), 30)
    embed = torch.randn(targets.shape, generator=torch.Generator().manual_seed(3))
    loss = clip_consistency_loss(embed, targets, counts, view_scene=scene, mode="contrastive")
    # by hand: the positive term, plus per view the cross-entropy of its own embedding among
    # its own and the other room's four
    cosine = F.normalize(embed, dim=1) @ F.normalize(targets, dim=1).T / 0.1
    expected = -F.logsigmoid(cosine.diagonal()).mean()
    for view in range(8):
        others = [j for j in range(8) if scene[j] != scene[view]]
        candidates = torch.cat([cosine[view, view:view + 1], cosine[view, others]])
        expected = expected - torch.log_softmax(candidates, dim=0)[0] / 8
    torch.testing.assert_close(loss, expected)
    # a view's loss does not depend on the embeddings of its own room's other views: no
    # gradient links view 0 to the target of view 1 (same room), one does to view 4's
    embed.requires_grad_(True)
    changed = targets.clone()
    changed[1] = torch.randn(targets.shape[1], generator=torch.Generator().manual_seed(4))
    grads = []
    for target in (targets, changed):
        embed.grad = None
        clip_consistency_loss(embed, target, counts, view_scene=scene,
                              mode="contrastive").backward()
        grads.append(embed.grad[0].clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
    # with one room in the batch there is no negative: the contrastive form is the positive one
    one_room = torch.zeros(8, dtype=torch.int64)
    torch.testing.assert_close(
        clip_consistency_loss(embed, targets, counts, view_scene=one_room, mode="contrastive"),
        clip_consistency_loss(embed, targets, counts))


def test_contrastive_clip_loss_still_prefers_each_views_own_embedding():
    targets, scene = two_rooms()
    counts = torch.full((8,), 30)

    def loss(embed):
        return clip_consistency_loss(embed, targets, counts, view_scene=scene, mode="contrastive")

    generator = torch.Generator().manual_seed(6)
    random = torch.stack([loss(torch.randn(targets.shape, generator=generator)) for _ in range(20)])
    assert loss(targets) < random.min() and random.max() < loss(-targets)
    assert own_cosines(descend(loss, targets.shape, seed=7), targets).min() >= 0.95


def test_compute_losses_passes_each_views_scene_to_the_contrastive_term():
    torch.manual_seed(0)
    batch = make_batch()  # two scenes of three views
    output = FusionModel(TINY)(batch)
    positive = compute_losses(output, batch, epoch=30)["clip"]
    contrastive = compute_losses(output, batch, epoch=30,
                                 cfg=LossConfig(clip_loss="contrastive"))["clip"]
    expected = clip_consistency_loss(output.view_embed, batch.view_global,
                                     output.view_point_count, view_scene=batch.view_scene,
                                     mode="contrastive")
    torch.testing.assert_close(contrastive, expected)
    assert contrastive > positive  # the InfoNCE part is positive with negatives present
    one_scene = dataclasses.replace(batch, view_scene=torch.zeros_like(batch.view_scene))
    torch.testing.assert_close(compute_losses(output, one_scene, epoch=30,
                                              cfg=LossConfig(clip_loss="contrastive"))["clip"],
                               positive)


def test_gradient_norms_per_module_group():
    from model.train import GRADIENT_GROUPS, gradient_norms

    torch.manual_seed(0)
    model = FusionModel(TINY)
    batch = make_batch()
    compute_losses(model(batch), batch, epoch=30)["total"].backward()
    norms = gradient_norms(model)
    assert set(norms) == set(GRADIENT_GROUPS)  # every parameter falls in a group
    expected = torch.cat([p.grad.flatten() for p in model.proj_2d.parameters()]).norm()
    assert norms["proj_2d"] == pytest.approx(float(expected), rel=1e-5)
    assert all(name.startswith(sum(GRADIENT_GROUPS.values(), ())) for name, _ in
               model.named_parameters())
