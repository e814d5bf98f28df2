"""DINOv2 through timm: a second encoder family, registered in one line (pipeline.encoders).

Random weights throughout (nothing is downloaded): the tests check the arithmetic (which tokens,
which grid, which pixels land in which cell), the store (its own feature set beside CLIP's),
training on it, and the refusals of the text commands.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.encoders import ENCODERS, build_encoder
from pipeline.encoders.base import EncoderConfig, EncoderError
from pipeline.encoders.dinov2 import TimmViTEncoder
from pipeline.projection import GridMapping
from storage import open_store
from tests.readme import command, typed

REPO = Path(__file__).resolve().parents[2]
DINO = {"encoder": "timm", "model": "vit_small_patch14_dinov2", "pretrained": "none",
        "image_size": (224, 224), "device": "cpu"}


@pytest.fixture(scope="module")
def dino() -> TimmViTEncoder:
    with pytest.warns(UserWarning, match="random weights"):
        return build_encoder(EncoderConfig(**DINO))


def frames(count: int, size=(242, 324), seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(count)]


def test_the_registry_builds_it_and_the_spec_says_what_it_is(dino):
    assert ENCODERS["timm"] is TimmViTEncoder
    spec = dino.describe()
    assert (spec.encoder, spec.model, spec.pretrained) == ("timm", "vit_small_patch14_dinov2",
                                                          "none")
    assert spec.image_size == (224, 224) and spec.patch_size == (14, 14)
    assert spec.grid_size == (16, 16) and spec.spatial_dim == spec.global_dim == 384
    assert not spec.text_aligned and not spec.has_text_tower and spec.random_weights
    assert spec.mean == pytest.approx((0.485, 0.456, 0.406))  # timm's config, not CLIP's
    assert dict(spec.library_versions)["timm"]


def test_patch_tokens_and_class_token_are_the_models_own(dino):
    x = torch.stack([dino.preprocess(color) for color in frames(2)])
    spatial, global_ = dino.encode(x)
    assert spatial.shape == (2, 16, 16, 384) and global_.shape == (2, 384)
    with torch.inference_mode():
        tokens = dino.model.forward_features(x)  # (B, 1 + 256, 384), normalised
    prefix = dino.model.num_prefix_tokens
    torch.testing.assert_close(spatial, tokens[:, prefix:].reshape(2, 16, 16, 384))
    torch.testing.assert_close(global_, tokens[:, 0])
    with pytest.warns(UserWarning, match="random weights"):
        again = build_encoder(EncoderConfig(**DINO))  # seeded: the same weights
    torch.testing.assert_close(again.encode(x), (spatial, global_))


@pytest.mark.parametrize("color_size", [(224, 224), (448, 448)])
def test_the_patch_14_grid_is_mapped_exactly(dino, color_size):
    """Every colour pixel lands in the cell of the patch it was resized into: column u of a
    224-wide frame is in cell u // 14 (of a 448-wide frame, u // 28), no pixel off."""
    mapping = GridMapping.for_featureset(dino.describe(), color_size)
    scale = color_size[1] // 224
    u = torch.arange(color_size[1], dtype=torch.float32)
    uv = torch.stack([u, torch.full_like(u, 5.0)], dim=1)
    grid_uv, inside = mapping.color_to_grid(uv)
    assert inside.all()
    cell = torch.floor((grid_uv[:, 0] + 1) / 2 * 16).long()
    assert torch.equal(cell, (u.long() // (14 * scale)))


def test_sizes_that_are_not_whole_patches_and_maskclip_are_refused():
    with pytest.raises(EncoderError, match="240x320 is not a whole number of .* 14-pixel patches"):
        build_encoder(EncoderConfig(**{**DINO, "image_size": (240, 320)}))
    with pytest.raises(EncoderError, match="patch tokens only"):
        build_encoder(EncoderConfig(**{**DINO, "spatial_kind": "maskclip"}))
    with pytest.raises(EncoderError, match="no encoder family 'nope'"):
        build_encoder(EncoderConfig(**{**DINO, "encoder": "nope"}))


def run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *command], cwd=REPO, capture_output=True,
                          text=True, timeout=600)


def test_extracted_beside_clip_trained_on_and_refused_by_text_queries(
        synthetic_root, tiny_store, tmp_path):
    """README's Extending commands, as typed: DINOv2 into a store that holds CLIP's features,
    a model trained on it with --featureset, and one clear line from each text command."""
    store = tmp_path / "store.zarr"
    shutil.copytree(tiny_store, store)
    (clip_id,) = open_store(store).featuresets()
    extracted = subprocess.run(typed(command(
        "python -m flows.extract_clip --dataset --encoder --image-size --model --pretrained "
        "--root --store"), replace={"--root": str(synthetic_root), "--store": str(store)},
        append=["--batch-size", "4", "--device", "cpu"]), cwd=REPO, capture_output=True,
        text=True, timeout=600)
    assert extracted.returncode == 0, extracted.stderr[-2000:]
    specs = open_store(store).featuresets()
    (dino_id,) = set(specs) - {clip_id}
    assert specs[dino_id].encoder == "timm" and specs[clip_id].encoder == "open_clip"
    features = open_store(store).features("scene0000_00", dino_id)
    assert features.spatial.shape[1:] == (16, 16, 384) and features.done.all()

    trained = subprocess.run(typed(
        command("python -m model.train --cache --epochs --featureset"),
        replace={"--cache": str(store), "--featureset": dino_id},
        append=["--out", str(tmp_path / "run"), "--voxel-size", "0.05", "--channels", "16,32",
                "--width", "32", "--no-plot", "--device", "cpu"]),
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0, trained.stderr[-2000:]
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert checkpoint["featureset"] == dino_id
    assert checkpoint["model"]["proj_2d.0.weight"].shape[1] == 384  # DINOv2's width

    scene = ("--scene", "scene0000_00", "--out", str(tmp_path / "query"))
    checkpoint_path = str(tmp_path / "run" / "checkpoints" / "last.pt")
    refusals = (
        ("model.query", "--cache", str(store), "--featureset", dino_id, "--text", "chair", *scene),
        ("model.query", "--cache", str(store), "--checkpoint", checkpoint_path, "--text", "chair",
         *scene),
        ("pipeline.text_embeddings", "--store", str(store), "--featureset", dino_id, "--prompts",
         "chair"))
    for refused_command in refusals:
        refused = run(*refused_command)
        assert refused.returncode == 1, refused.stderr[-2000:]
        lines = refused.stderr.strip().splitlines()
        assert lines[-1].startswith("error: ") and "not text-aligned" in lines[-1], lines
        assert "Traceback" not in refused.stderr


def test_an_unknown_timm_name_gets_the_close_ones():
    with pytest.raises(EncoderError, match=r"did you mean vit_small_patch14_dinov2") as caught:
        TimmViTEncoder.check_model_name("vit_smal_patch14_dinov2")
    assert "convit" not in str(caught.value)  # close by spelling, not by a shared first word
    TimmViTEncoder.check_model_name("vit_small_patch14_dinov2")  # a known name passes
