"""The backbone registry: the fusion model builds whichever backbone TrainConfig names, and a
new one is a class and one line in model.network.backbones.BACKBONES."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from cli.errors import UserError
from model.checkpoint import build_model, restore_config
from model.config import TrainConfig, build_parser
from model.network import backbones
from model.network.backbone import SparseUNet, SparseUNetConfig
from model.network.fusion import FusionModel
from storage.featureset import FeatureSetSpec
from tests.model.test_fusion import TINY, make_batch

SPEC = FeatureSetSpec(model="test-ViT-tiny", pretrained="none", image_size=(32, 32),
                      patch_size=(16, 16), grid_size=(2, 2), resize="squash", mean=(0.5,) * 3,
                      std=(0.5,) * 3, spatial_kind="tokens", spatial_dim=12, global_dim=10)


class PointMLP(nn.Module):
    """A backbone without voxels, as small as the Protocol allows: an MLP per point."""

    def __init__(self, config: SparseUNetConfig):
        super().__init__()
        self.config = config
        self.mlp = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, config.out_channels))

    def forward(self, xyz: torch.Tensor, rgb: torch.Tensor, batch_index: torch.Tensor):
        return self.mlp(torch.cat([xyz, rgb], dim=1))


def test_the_default_is_todays_sparse_unet_and_the_flag_lists_the_registry():
    assert backbones.BACKBONES[backbones.DEFAULT_BACKBONE] is SparseUNet
    assert TrainConfig().backbone == "sparse-unet"
    assert isinstance(FusionModel(TINY).backbone, SparseUNet)
    assert "sparse-unet" in build_parser().format_help()
    # checkpoints written before the field train and load with the default
    assert restore_config({"channels": [16, 32], "clip_schedule": [[0, 0.0]]}).backbone == \
        "sparse-unet"


def test_a_new_backbone_is_one_registry_line(monkeypatch):
    monkeypatch.setitem(backbones.BACKBONES, "point-mlp", PointMLP)
    model = FusionModel(dataclasses.replace(TINY, backbone_name="point-mlp"))
    assert isinstance(model.backbone, PointMLP)
    output = model(make_batch())
    assert output.semantic_logits.shape == (500, TINY.num_classes)
    output.semantic_logits.sum().backward()
    assert model.backbone.mlp[0].weight.grad is not None
    trained = build_model(TrainConfig(backbone="point-mlp", channels=(8, 16), width=32), SPEC)
    assert isinstance(trained.backbone, PointMLP)


def test_an_unknown_backbone_is_one_line():
    with pytest.raises(UserError, match="no backbone 'spconv': choose one of sparse-unet"):
        build_model(TrainConfig(backbone="spconv"), SPEC)
