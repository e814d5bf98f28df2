"""The 2D-3D fusion model (BiFusion-style): 3D backbone features and cached CLIP point features,
each projected to a common width and mixed per point by a learned gate, then per-point heads.

The 2D features are inputs, not activations of a network in the graph: they come from the store
as constants, so gradients stop at `proj_2d`. Points no view sees use the 3D path alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from model.network.backbone import SparseUNetConfig
from model.network.backbones import DEFAULT_BACKBONE, build_backbone
from model.batch import PointBatch
from model.network.heads import mlp, semantic_head
from model.network.instance import offset_head


@dataclass(frozen=True)
class FusionConfig:
    """The fusion model.

    backbone: the 3D backbone's settings (voxel size, widths per level, blocks, normalisation).
    backbone_name: which backbone of model.network.backbones.BACKBONES is built from them.
    dim_2d: width of PointBatch.feat2d (768 for ViT-B tokens, 512 for MaskCLIP-style features).
    width: common width of the projected 3D, 2D and fused features.
    gate_hidden: hidden width of the gate MLP.
    num_classes: semantic classes (ScanNet-20).
    head_hidden: hidden width of the semantic head.
    clip_dim: width of the cached global CLIP embeddings that `clip_proj` maps to.
    use_2d: False gives the pure-3D model (no 2D projection, no gate) for ablations.
    view_feature_clamp: fused features are clamped to [-c, c] before the per-view mean that the
        CLIP consistency loss compares, so one extreme point cannot dominate a view.
    instance_head: add the "offset" head (model.network.instance): offsets to instance centres.
    point_embed: also return every point's CLIP-space embedding (ModelOutput.point_embed), which
        the per-point distillation loss compares with the point's 2D feature.
    """

    backbone: SparseUNetConfig = field(default_factory=SparseUNetConfig)
    backbone_name: str = DEFAULT_BACKBONE
    dim_2d: int = 768
    width: int = 256
    gate_hidden: int = 128
    num_classes: int = 20
    head_hidden: int = 256
    clip_dim: int = 512
    use_2d: bool = True
    view_feature_clamp: float = 10.0
    instance_head: bool = True
    point_embed: bool = False


@dataclass
class ModelOutput:
    """What FusionModel.forward returns for a PointBatch of P points and V views.

    fused: (P, width) float, the gated features the heads read.
    gate: (P,) float in [0, 1], weight of the 2D path per point; 0 where unseen or use_2d=False.
    head_outputs: head name -> (P, ...) output; "semantic" -> (P, num_classes) logits,
        "offset" -> (P, 3) offsets to the instance centre in metres (with the instance head).
    view_embed: (V, clip_dim) float, clip_proj of the mean clamped fused feature of the points
        each view sees (zero-feature mean for views that see none).
    view_point_count: (V,) int64, how many batch points each view sees; 0 means skip the view.
    point_embed: (P, clip_dim) float32, `point_clip_embed` of every point, or None unless
        config.point_embed.
    """

    fused: Tensor
    gate: Tensor
    head_outputs: dict[str, Tensor]
    view_embed: Tensor
    view_point_count: Tensor
    point_embed: Tensor | None = None

    @property
    def semantic_logits(self) -> Tensor:
        return self.head_outputs["semantic"]


def pool_views(features: Tensor, view_of_pair: Tensor, view_point_index: Tensor, num_views: int,
               clamp: float) -> tuple[Tensor, Tensor]:
    """Mean of the clamped features of the points each view sees.

    features: (P, C). view_of_pair, view_point_index: (M,) int64 visibility pairs.
    Returns pooled (V, C) float32 (zero for a view with no point) and counts (V,) int64.
    A sparse (V, P) averaging matrix times features: memory O(M + V C), never (M, C).
    """
    counts = torch.bincount(view_of_pair, minlength=num_views)
    # float32 throughout: the mean over thousands of points is a reduction that fp16 would round.
    with torch.autocast(features.device.type, enabled=False):
        clamped = features.float().clamp(-clamp, clamp)
        weights = 1.0 / counts.clamp_min(1).to(torch.float32)[view_of_pair]
        averaging = torch.sparse_coo_tensor(
            torch.stack([view_of_pair, view_point_index]), weights,
            (num_views, features.shape[0]), is_coalesced=False, check_invariants=False)
        pooled = torch.sparse.mm(averaging, clamped)
    return pooled, counts


class FusionModel(nn.Module):
    """PointBatch -> ModelOutput. Heads live in `heads` (a ModuleDict keyed by output name):
    "semantic" and, with config.instance_head, "offset" (model.network.instance)."""

    def __init__(self, config: FusionConfig = FusionConfig()):
        super().__init__()
        self.config = config
        width = config.width
        self.backbone = build_backbone(config.backbone_name, config.backbone)
        self.proj_3d = nn.Sequential(nn.Linear(config.backbone.out_channels, width),
                                     nn.LayerNorm(width))
        if config.use_2d:
            self.proj_2d = nn.Sequential(nn.Linear(config.dim_2d, width), nn.LayerNorm(width))
            self.gate_mlp = mlp((2 * width, config.gate_hidden, 1))
        self.heads = nn.ModuleDict(
            {"semantic": semantic_head(width, config.head_hidden, config.num_classes)})
        if config.instance_head:
            self.heads["offset"] = offset_head(width, config.head_hidden)
        self.clip_proj = nn.Linear(width, config.clip_dim)

    def forward(self, batch: PointBatch) -> ModelOutput:
        point_3d = self.backbone(batch.xyz, batch.rgb, batch.batch_index)
        fused_3d = self.proj_3d(point_3d)
        if self.config.use_2d:
            fused, gate = self._gated(fused_3d, batch.feat2d, batch.seen)
        else:
            fused, gate = fused_3d, fused_3d.new_zeros(fused_3d.shape[0])
        pooled, counts = pool_views(fused, batch.view_of_pair, batch.view_point_index,
                                    batch.num_views, self.config.view_feature_clamp)
        return ModelOutput(
            fused=fused,
            gate=gate,
            head_outputs={name: head(fused) for name, head in self.heads.items()},
            view_embed=self.clip_proj(pooled),
            view_point_count=counts,
            point_embed=self.point_clip_embed(fused) if self.config.point_embed else None,
        )

    def point_clip_embed(self, fused: Tensor) -> Tensor:
        """Each point's fused feature in CLIP's embedding space: (P, width) -> (P, clip_dim)
        float32, `clip_proj` of the feature clamped as `pool_views` clamps it.

        clip_proj is affine, so the mean of this over a view's points is that view's
        `view_embed`, which the CLIP consistency loss aligns with the view's global CLIP
        embedding; per point it is the model's own estimate in that (text-aligned) space, what
        open-vocabulary queries (model.query) compare with text embeddings.
        """
        clamp = self.config.view_feature_clamp
        with torch.autocast(fused.device.type, enabled=False):
            return self.clip_proj(fused.float().clamp(-clamp, clamp))

    def _gated(self, fused_3d: Tensor, feat2d: Tensor, seen: Tensor) -> tuple[Tensor, Tensor]:
        """g = sigmoid(MLP([f3d, f2d])); fused = g f2d + (1 - g) f3d where seen, f3d elsewhere."""
        if feat2d.shape[1] != self.config.dim_2d:
            raise ValueError(f"feat2d has {feat2d.shape[1]} channels but FusionConfig.dim_2d is "
                             f"{self.config.dim_2d}; set dim_2d to the feature set's width")
        # Only seen rows enter the 2D path: unseen points' (zero) 2D features reach neither the
        # outputs nor the gradients, whatever their values.
        rows = seen.nonzero().squeeze(1)
        fused_2d = self.proj_2d(feat2d[rows])
        seen_3d = fused_3d[rows]
        gate = torch.sigmoid(self.gate_mlp(torch.cat([seen_3d, fused_2d], dim=1))).squeeze(1)
        mixed = gate[:, None] * fused_2d + (1 - gate[:, None]) * seen_3d
        # Under autocast the two paths can differ in dtype; the output keeps the 3D path's.
        fused = fused_3d.index_put((rows,), mixed.to(fused_3d.dtype))
        all_gates = fused_3d.new_zeros(fused_3d.shape[0])
        return fused, all_gates.index_put((rows,), gate.to(fused_3d.dtype))
