"""Training losses: semantic cross-entropy and the CLIP consistency loss, with its weight schedule.

The CLIP consistency loss pulls each view's pooled fused feature (through the CLIP head) toward
that view's own cached global CLIP embedding: BiFusion's per-view positive term
`-log(sigmoid(cos / T))` (benchmarks/seed_clip.py runs it as BiFusion does), with its numerical
failures fixed: cosines clamped to [-1, 1] (the fused features were clamped before pooling, in
model.network.fusion.pool_views), a temperature floor of 0.1, `-logsigmoid` instead of
`log(sigmoid + eps)`, eps in the normalisation, and views that see no point left out instead of
producing a 0/0 mean. Optionally (`mode="contrastive"`) views of *other scenes* in the batch are
negatives; two views of one scene never are, since their global embeddings are near duplicates
(pairwise cosine 0.87-0.98 in one room).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from model.batch import IGNORE_INDEX, PointBatch
from model.network.fusion import ModelOutput
from model.network.instance import offset_losses

log = logging.getLogger(__name__)

LOSS_TERMS = ("total", "semantic", "offset", "direction", "clip", "distill")
"""The loss terms `compute_losses` returns, as training and evaluation log them."""

DEFAULT_CLIP_SCHEDULE = ((0, 0.0), (11, 0.001), (21, 0.01))
"""(first epoch, weight) steps of the CLIP consistency weight: 0, then 0.001, then 0.01."""
ClipLossMode = Literal["positive", "contrastive"]


@dataclass(frozen=True)
class LossConfig:
    """Loss terms and weights.

    semantic_weight: weight of the semantic cross-entropy (BiFusion's 0.4; it uses 0.5 for the
        3D-only model, which model.train picks with --no-use-2d).
    offset_weight, direction_weight: weights of the instance offset terms (L1 and direction),
        used when the model has the offset head.
    stuff_classes: semantic classes without instances (ScanNet-20: wall 0, floor 1); their
        points take no part in the offset terms (a wall's centre is metres away, PointGroup
        leaves them out alike).
    clip_schedule: (first epoch, weight) steps of the CLIP consistency weight, by first epoch.
    clip_loss: "positive" (each view toward its own global embedding) or "contrastive" (also
        away from the global embeddings of other scenes' views); see clip_consistency_loss.
    temperature: CLIP logit temperature; raised to temperature_floor if below it.
    temperature_floor: the smallest temperature used (0.07 scales cosines by 14x, 0.1 by 10x).
    eps: normalisation epsilon of the embeddings.
    distill_weight: weight of the per-point distillation term (OpenScene's 3D distillation):
        1 - cosine between each seen point's CLIP-space embedding and its projected 2D feature.
        Only meaningful when the 2D features are text-aligned (maskclip feature sets); it is
        what makes a trained model answer per-point text queries (model.query).
    """

    semantic_weight: float = 0.4
    offset_weight: float = 1.0
    direction_weight: float = 1.0
    stuff_classes: tuple[int, ...] = (0, 1)
    clip_schedule: tuple[tuple[int, float], ...] = DEFAULT_CLIP_SCHEDULE
    clip_loss: ClipLossMode = "positive"
    temperature: float = 0.1
    temperature_floor: float = 0.1
    eps: float = 1e-6
    distill_weight: float = 0.0


def semantic_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Mean cross-entropy over labelled points; 0 (still in the graph) if none is labelled.

    logits: (P, K) float. target: (P,) int64 in [0, K) or IGNORE_INDEX.
    """
    if not bool((target != IGNORE_INDEX).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX)


def distill_loss(point_embed: Tensor, feat2d: Tensor, seen: Tensor, eps: float = 1e-6) -> Tensor:
    """Mean of 1 - cosine(point_embed, feat2d) over the seen points; 0 (in the graph) if none.

    point_embed: (P, D) float, the model's per-point CLIP-space embeddings. feat2d: (P, D) the
    projected cached features (constants). seen: (P,) bool. Returns a float32 scalar in [0, 2].
    """
    if not bool(seen.any()):
        return point_embed.float().sum() * 0.0
    with torch.autocast(point_embed.device.type, enabled=False):
        cosine = F.cosine_similarity(point_embed[seen].float(), feat2d[seen].float(), dim=1,
                                     eps=eps)
    return 1.0 - cosine.mean()


def effective_temperature(temperature: float | Tensor, floor: float = 0.1) -> float | Tensor:
    """The temperature the loss uses: max(temperature, floor); a tensor stays a tensor."""
    if isinstance(temperature, Tensor):
        return temperature.clamp_min(floor)
    return max(float(temperature), floor)


def clip_consistency_loss(
    view_embed: Tensor,
    view_global: Tensor,
    view_point_count: Tensor,
    temperature: float | Tensor = 0.1,
    temperature_floor: float = 0.1,
    eps: float = 1e-6,
    *,
    view_scene: Tensor | None = None,
    mode: ClipLossMode = "positive",
) -> Tensor:
    """Pull each view's embedding toward its own cached global CLIP embedding.

    view_embed: (V, D) float, clip_proj of each view's pooled fused features.
    view_global: (V, D) float, each view's cached global CLIP embedding (any norm); constants.
    view_point_count: (V,) int64, points each view sees; views with 0 are left out.
    view_scene: (V,) int64, the scene (batch position) of each view; needed by "contrastive".
    Over the U used views, with cos_ij = cos(embed_i, global_j) and T = max(temperature, floor):

    - "positive" (default, BiFusion's term): mean over views of -logsigmoid(cos_ii / T).
    - "contrastive": that, plus per view the softmax cross-entropy (CLIP's InfoNCE) that
      picks its own global embedding among those of the views of *other scenes*:
      logsumexp_j(cos_ij / T) - cos_ii / T over j = i and every j of another scene, averaged
      over views. Views of one scene are never each other's negatives; a view with no other
      scene in the batch (or on its process, under DDP) adds 0, so with one scene this equals
      "positive". (A sigmoid term per negative instead would push each view's embedding to
      cosine -1 with every other room's, and CLIP embeddings of two rooms are far from
      opposite: on two such rooms it stopped at cosine ~0.75 to the view's own.)

    Returns a float32 scalar; 0 (still in the graph, as DDP needs) with no usable view.
    """
    used = view_point_count > 0
    if not bool(used.any()):
        return torch.nan_to_num(view_embed.float()).sum() * 0.0
    if mode not in ("positive", "contrastive"):
        raise ValueError(f"clip loss mode {mode!r}: positive or contrastive")
    with torch.autocast(view_embed.device.type, enabled=False):
        embed = F.normalize(view_embed[used].float(), dim=1, eps=eps)
        target = F.normalize(view_global[used].float(), dim=1, eps=eps)
        scale = 1.0 / effective_temperature(temperature, temperature_floor)
        own = (embed * target).sum(dim=1).clamp(-1.0, 1.0)
        loss = -F.logsigmoid(own * scale).mean()
        if mode == "contrastive":
            if view_scene is None:
                raise ValueError("the contrastive CLIP loss needs each view's scene (view_scene)")
            scene = view_scene[used]
            candidates = (scene[:, None] != scene[None, :]) | torch.eye(
                len(scene), dtype=torch.bool, device=scene.device)
            logits = (embed @ target.T).clamp(-1.0, 1.0) * scale
            logits = logits.masked_fill(~candidates, float("-inf"))
            loss = loss + (torch.logsumexp(logits, dim=1) - logits.diagonal()).mean()
        return loss


def clip_weight_schedule(epoch: int,
                         schedule: Sequence[tuple[int, float]] = DEFAULT_CLIP_SCHEDULE) -> float:
    """Weight of the CLIP consistency loss at `epoch` (0-based), piecewise constant.

    schedule: (first epoch, weight) steps; the last step whose first epoch is <= epoch holds.
    Before the first step the weight is 0. The default: epochs 0-10 -> 0, 11-20 -> 0.001,
    21 on -> 0.01.
    """
    weight = 0.0
    for first_epoch, step_weight in sorted(schedule):
        if epoch >= first_epoch:
            weight = step_weight
    return weight


def finite_or_skip(loss: Tensor) -> bool:
    """True if every element of `loss` is finite (step on); False: skip the step and count it.

    On a GPU this synchronises once (one bool); call it once per step, on the total.
    """
    finite = bool(torch.isfinite(loss).all())
    if not finite:
        log.debug("non-finite loss %s", loss.detach().cpu())
    return finite


def compute_losses(output: ModelOutput, batch: PointBatch, epoch: int,
                   cfg: LossConfig = LossConfig()) -> dict[str, Tensor]:
    """Each loss term and the weighted total, all scalar tensors on the batch's device.

    Keys: "semantic", "offset", "direction", "clip", "distill" (each unweighted; the offset
    terms are 0 without an offset head, "distill" 0 without output.point_embed), "clip_weight"
    (the schedule's value), "total", and "counts": (4,) float32, what each mean is over
    (labelled points; points of thing instances; seen points; views that see a point), which
    `rebalance_for_global_mean` needs when a batch is split across processes.
    The CLIP term enters the total only when its weight is > 0, so a non-finite CLIP term
    during the warm-up cannot poison the step.
    """
    semantic = semantic_loss(output.semantic_logits, batch.semantic)
    clip = clip_consistency_loss(output.view_embed, batch.view_global, output.view_point_count,
                                 cfg.temperature, cfg.temperature_floor, cfg.eps,
                                 view_scene=batch.view_scene, mode=cfg.clip_loss)
    clip_weight = clip_weight_schedule(epoch, cfg.clip_schedule)
    total = cfg.semantic_weight * semantic
    offset = direction = semantic.new_zeros(())
    stuff = torch.isin(batch.semantic, torch.tensor(cfg.stuff_classes, device=batch.device))
    things = torch.where(stuff, -1, batch.instance)
    if "offset" in output.head_outputs:
        offset, direction = offset_losses(output.head_outputs["offset"], batch.xyz, things)
        total = total + cfg.offset_weight * offset + cfg.direction_weight * direction
    distill = semantic.new_zeros(())
    if output.point_embed is not None:
        distill = distill_loss(output.point_embed, batch.feat2d, batch.seen, cfg.eps)
        total = total + cfg.distill_weight * distill
    if clip_weight > 0:
        total = total + clip_weight * clip
    return {
        "semantic": semantic,
        "offset": offset,
        "direction": direction,
        "clip": clip,
        "distill": distill,
        "clip_weight": torch.tensor(clip_weight, device=semantic.device),
        "total": total,
        "counts": torch.stack([(batch.semantic != IGNORE_INDEX).sum(), (things >= 0).sum(),
                               batch.seen.sum(), (output.view_point_count > 0).sum()]).float(),
    }


def rebalance_for_global_mean(losses: dict[str, Tensor], global_counts: Tensor, world_size: int,
                              epoch: int, cfg: LossConfig = LossConfig()) -> dict[str, Tensor]:
    """The loss terms of one process's share of a batch split across `world_size` processes.

    DDP averages gradients over processes, which weighs each process's means equally although
    their shares hold different numbers of points. Scaling each mean by
    world_size * local count / global count makes that average the mean over the whole batch,
    as one process would compute it (and the average of the returned terms over processes the
    batch's loss terms). global_counts: (4,) the sum of every process's losses["counts"]. The
    CLIP term is rebalanced by views; its "contrastive" negatives are the other scenes' views
    on the same process (its share of the batch), not those of the whole batch. Returns the
    keys of `compute_losses`, with "total" recomputed.
    """
    scale = world_size * losses["counts"] / global_counts.clamp_min(1)
    terms = {**losses,
             "semantic": scale[0] * losses["semantic"],
             "offset": scale[1] * losses["offset"],
             "direction": scale[1] * losses["direction"],
             "distill": scale[2] * losses["distill"],
             "clip": scale[3] * losses["clip"]}
    total = (cfg.semantic_weight * terms["semantic"] + cfg.offset_weight * terms["offset"]
             + cfg.direction_weight * terms["direction"] + cfg.distill_weight * terms["distill"])
    clip_weight = clip_weight_schedule(epoch, cfg.clip_schedule)
    if clip_weight > 0:
        total = total + clip_weight * terms["clip"]
    else:  # DDP wants a gradient, if 0, for every parameter the model's outputs depend on
        total = total + 0.0 * torch.nan_to_num(losses["clip"], nan=0.0, posinf=0.0, neginf=0.0)
    terms["total"] = total
    return terms
