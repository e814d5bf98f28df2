"""BiFusion's configuration, kept as the baseline of `benchmarks.stability`: CLIP inside the
training step and inside the autograd graph. Benchmarks only, never a default.

What BiFusion's training does, and `python -m model.train` no longer does:

- frozen CLIP runs over the scene's views in every step, and its features enter the model
  partially detached, `f * r + f.detach() * (1 - r)` with `gradient_flow_ratio` r = 0.02: 2% of
  their gradient flows back through CLIP (its weights require grad; no optimiser steps them);
- CLIP's spatial features reach +-50 in a few channels (ViTs' massive activations). Random
  weights do not produce them (the tiny test ViT's largest |activation| is printed beside the
  results), so they are planted: `PLANTED_MAGNITUDE` added with alternating signs to
  `PLANTED_CHANNELS` channels of every seen point's 2D feature. A constant offset per grid
  channel reaches the points unchanged (projection averages with weights that sum to 1), so
  planting on the points is planting on CLIP's output;
- the CLIP consistency loss is BiFusion's ClipConsCriterion, -log(sigmoid(cos / T) + 1e-8) per
  view with T = 0.07, weight 0.05 from the first epoch, on unclamped fused features.

The rest (projection, model, semantic and instance losses, optimiser, clipping at 1.0) is this
project's, so that the CLIP path is the only difference from the cached pipeline. Views that see
no point are left out of BiFusion's mean (BiFusion's 0/0 would make every such step NaN, which
would measure that bug rather than the listed ones).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.batch import PointBatch
from model.dataset import SceneSample, collate
from model.network.fusion import FusionModel
from model.network.losses import LossConfig, compute_losses
from model.train import gradient_norms
from pipeline.projection import GridMapping, fuse_features
from storage.store import FeatureStore

GRADIENT_FLOW_RATIO = 0.02
SEED_TEMPERATURE = 0.07
SEED_EPS = 1e-8
SEED_CLIP_WEIGHT = 0.05
PLANTED_CHANNELS = 4
PLANTED_MAGNITUDE = 50.0


def partial_detach(features: Tensor, ratio: float = GRADIENT_FLOW_RATIO) -> Tensor:
    """BiFusion's gradient_flow_ratio: the value of `features`, `ratio` of their gradient."""
    return features * ratio + features.detach() * (1 - ratio)


def seed_clip_loss(view_embed: Tensor, view_global: Tensor, view_point_count: Tensor) -> Tensor:
    """ClipConsCriterion: mean over views (that see a point) of -log(sigmoid(cos / 0.07) + 1e-8)."""
    used = view_point_count > 0
    cosine = F.cosine_similarity(view_embed[used].float(), view_global[used].float(), dim=1)
    return -torch.log(torch.sigmoid(cosine / SEED_TEMPERATURE) + SEED_EPS).mean()


def planted_offsets(seen: Tensor, channels: int) -> Tensor:
    """(N, C) float32: +-PLANTED_MAGNITUDE (alternating by channel) in PLANTED_CHANNELS channels
    spread over the C, on the seen points; zero elsewhere."""
    offsets = torch.zeros(seen.shape[0], channels, device=seen.device)
    chosen = np.linspace(0, channels - 1, PLANTED_CHANNELS).round().astype(int)
    signs = torch.tensor([(-1.0) ** i for i in range(PLANTED_CHANNELS)], device=seen.device)
    offsets[:, chosen] = PLANTED_MAGNITUDE * signs
    return offsets * seen[:, None]


def with_planted_activations(batch: PointBatch) -> PointBatch:
    """The batch with CLIP's extreme channels planted in its 2D features (a new batch)."""
    return dataclasses.replace(batch, feat2d=batch.feat2d + planted_offsets(batch.seen,
                                                                            batch.feat2d.shape[1]))


class SeedClipScenes:
    """Scenes whose 2D features come from CLIP run in the step, gradients kept.

    encoder: a pipeline.encoders.clip.FrozenClipEncoder of the store's feature set (tokens);
    inputs: scene id -> (V, 3, H, W) preprocessed frames of the store's valid frames.
    """

    def __init__(self, store: FeatureStore, encoder, inputs: dict[str, Tensor],
                 device: torch.device):
        self.store, self.encoder, self.inputs, self.device = store, encoder, inputs, device
        self.visual = encoder.visual.requires_grad_(True)  # BiFusion's "frozen" CLIP leaks
        self.spec = encoder.describe()

    def batch(self, scene_id: str) -> PointBatch:
        """One scene's PointBatch; its feat2d and view_global carry the gradient into CLIP,
        partially detached, with the extreme channels planted."""
        scene = self.store.scene(scene_id)
        usable = scene.valid
        out = self.visual.forward_intermediates(self.inputs[scene_id][usable].to(self.device),
                                                indices=1, output_fmt="NCHW")
        spatial = partial_detach(out["image_intermediates"][-1].permute(0, 2, 3, 1))
        global_ = partial_detach(out["image_features"])
        xyz = torch.as_tensor(scene.xyz, device=self.device)
        fused = fuse_features.__wrapped__(  # the projection without its no_grad: BiFusion's path
            xyz, torch.as_tensor(scene.pose[usable], dtype=torch.float32, device=self.device),
            torch.as_tensor(scene.intrinsic_depth, dtype=torch.float32, device=self.device),
            scene.depth[usable],
            torch.as_tensor(scene.intrinsic_color, dtype=torch.float32, device=self.device),
            spatial, GridMapping.for_featureset(self.spec, scene.color_size),
            depth_scale=scene.depth_scale, return_visibility=True)
        sample = SceneSample(
            scene_id=scene_id, xyz=xyz,
            rgb=torch.as_tensor(scene.rgb, dtype=torch.float32, device=self.device) / 255.0,
            feat2d=fused.features.detach(), seen=fused.seen,
            semantic=torch.as_tensor(scene.semantic, dtype=torch.int64, device=self.device),
            instance=torch.as_tensor(scene.instance, dtype=torch.int64, device=self.device),
            segment=torch.as_tensor(scene.segment, dtype=torch.int64, device=self.device),
            view_pairs=fused.view_pairs.to(torch.int32), view_global=global_.detach())
        batch = collate([sample])
        # PointBatch refuses 2D features that require grad (cached features are constants):
        # BiFusion's are not, so they are put in after the check, as BiFusion's model saw them
        batch.feat2d = fused.features + planted_offsets(fused.seen, fused.features.shape[1])
        batch.view_global = global_
        return batch


def seed_train_step(model: FusionModel, clip: nn.Module, batch: PointBatch,
                    optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, *,
                    amp: bool, grad_clip: float = 1.0) -> dict[str, float]:
    """One step of BiFusion's configuration; returns the loss terms, "finite", and the
    gradient norms per group ("grad_norm/<group>", "grad_norm/clip" for CLIP's weights). Like
    BiFusion, it steps whatever the loss (no finite-loss guard; AMP's scaler skips inf
    gradients)."""
    model.train()
    with torch.autocast(batch.device.type, dtype=torch.float16, enabled=amp):
        output = model(batch)
    losses = compute_losses(output, batch, 0, LossConfig(clip_schedule=((0, 0.0),)))
    clip_term = seed_clip_loss(output.view_embed, batch.view_global, output.view_point_count)
    total = losses["total"] + SEED_CLIP_WEIGHT * clip_term
    optimizer.zero_grad(set_to_none=True)
    clip.zero_grad(set_to_none=True)
    scaler.scale(total).backward()
    scaler.unscale_(optimizer)
    norms = gradient_norms(model)
    scale = scaler.get_scale() if scaler.is_enabled() else 1.0  # CLIP is not in the optimiser
    clip_grads = [p.grad.float().square().sum() for p in clip.parameters() if p.grad is not None]
    norms["clip"] = (float(torch.stack(clip_grads).sum().sqrt()) / scale if clip_grads
                     else 0.0)
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    terms = {"total": float(total.detach()), "clip": float(clip_term.detach()),
             "semantic": float(losses["semantic"].detach()),
             "finite": bool(math.isfinite(float(total.detach())))}
    terms.update({f"grad_norm/{group}": value for group, value in norms.items()})
    return terms


def frame_inputs(encoder, scenes_root: Path, store: FeatureStore) -> dict[str, Tensor]:
    """Scene id -> (F, 3, H, W) preprocessed colour frames of the store's frames (decoded once,
    ahead of the steps, which favours the baseline's timings, not measured here anyway)."""
    from pipeline.readers.synthetic import SyntheticScene

    inputs = {}
    for scene_id in store.scenes():
        raw = SyntheticScene.open(scenes_root / scene_id)
        frame_ids = store.scene(scene_id, with_depth=False).frame_id
        inputs[scene_id] = torch.stack(
            [encoder.preprocess(raw.read_frame(int(f), depth=False).color) for f in frame_ids])
    return inputs
