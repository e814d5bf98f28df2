"""The 3D backbones the fusion model can be built with, by name (`TrainConfig.backbone`).

A backbone turns a batch's points into per-point features; `FusionModel` needs nothing else
of it. Adding one (say an spconv or MinkowskiEngine U-Net, which needs a GPU to train) is a
module with a class that implements `Backbone` and takes `SparseUNetConfig`, plus one line in
`BACKBONES`; `--backbone NAME` then trains with it and checkpoints record the name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from torch import Tensor, nn

from cli.errors import UserError
from model.network.backbone import SparseUNet, SparseUNetConfig


class Backbone(Protocol):
    """A 3D backbone: an `nn.Module` built from a `SparseUNetConfig` (voxel size, widths per
    level, blocks, normalisation, `out_channels`) whose forward maps points to features.

    forward(xyz, rgb, batch_index): xyz (P, 3) float32, metres, world frame; rgb (P, 3) float32
    in [0, 1]; batch_index (P,) int64 scene of each point. Returns (P, config.out_channels)
    float32 (or the autocast dtype).
    """

    config: SparseUNetConfig

    def __call__(self, xyz: Tensor, rgb: Tensor, batch_index: Tensor) -> Tensor: ...


BACKBONES: dict[str, Callable[[SparseUNetConfig], nn.Module]] = {
    "sparse-unet": SparseUNet,  # pure PyTorch, active-pairs convolutions (model.network.backbone)
}
"""Backbone name -> its class (called with the config). The first is the default."""

DEFAULT_BACKBONE = next(iter(BACKBONES))


def build_backbone(name: str, config: SparseUNetConfig) -> nn.Module:
    """The backbone `name` built from `config`; an unknown name is a one-line UserError."""
    if name not in BACKBONES:
        raise UserError(f"no backbone {name!r}: choose one of {', '.join(BACKBONES)} (--backbone)")
    return BACKBONES[name](config)
