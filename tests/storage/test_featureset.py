"""The feature-set spec: the one hand-off from stage 1 to stage 2."""

from __future__ import annotations

import dataclasses

import pytest

from cli.errors import UserError
from storage import StoreError, open_store
from storage.featureset import OPEN_CLIP, FeatureSetSpec, featureset_id
from storage.selection import choose_featureset

OLD_ATTRS = {  # what a store written before the spec recorded for a maskclip feature set
    "model": "ViT-B-16", "pretrained": "openai", "pretrained_sha256": None, "seed": None,
    "random_weights": False, "quick_gelu": True, "image_size": [240, 320],
    "patch_size": [16, 16], "grid_size": [15, 20], "resize": "squash",
    "interpolation": "bicubic", "mean": [0.48145466, 0.4578275, 0.40821073],
    "std": [0.26862954, 0.26130258, 0.27577711], "spatial_kind": "maskclip",
    "spatial_dim": 512, "global_dim": 512, "dtype": "float16", "compute": "fp32 (CPU)",
    "open_clip_version": "3.3.0", "planted": {"noise": 0.5},
}

DINO = FeatureSetSpec(
    encoder="timm", model="vit_small_patch14_dinov2", pretrained="none", seed=0,
    random_weights=True, image_size=(224, 224), patch_size=(14, 14), grid_size=(16, 16),
    resize="squash", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
    spatial_kind="tokens", spatial_dim=384, global_dim=384, text_aligned=False,
    has_text_tower=False, library_versions=(("timm", "1.0.31"),))


def test_a_store_of_before_the_spec_opens_with_what_it_recorded():
    spec = FeatureSetSpec.from_attrs(OLD_ATTRS)
    assert spec.encoder == OPEN_CLIP and spec.versions == {"open_clip": "3.3.0"}
    assert spec.text_aligned and spec.has_text_tower  # maskclip of CLIP's embedding width
    assert spec.grid_size == (15, 20) and spec.image_size == (240, 320)
    assert spec.notes == {"planted": {"noise": 0.5}}
    assert spec.id == featureset_id(OLD_ATTRS)  # its id does not change
    tokens = FeatureSetSpec.from_attrs({**OLD_ATTRS, "spatial_kind": "tokens", "spatial_dim": 768})
    assert not tokens.text_aligned and tokens.has_text_tower


def test_attributes_round_trip_and_the_id_follows_what_changes_the_numbers():
    spec = FeatureSetSpec.from_attrs(OLD_ATTRS)
    assert FeatureSetSpec.from_attrs(spec.to_attrs()) == spec
    assert FeatureSetSpec.from_attrs(DINO.to_attrs()) == DINO
    assert dataclasses.replace(spec, compute="fp16 autocast (CUDA)").id == spec.id
    assert spec.with_notes(storage={"bytes": 1}).id == spec.id
    for change in ({"resize": "crop"}, {"image_size": (224, 224)}, {"pretrained": "laion2b"},
                   {"spatial_kind": "tokens"}, {"library_versions": (("open_clip", "3.4"),)}):
        assert dataclasses.replace(spec, **change).id != spec.id, change
    # another family: the family and its library versions are part of the id
    assert dataclasses.replace(DINO, library_versions=(("timm", "1.1"),)).id != DINO.id
    assert DINO.to_attrs()["open_clip_version"] is None


def test_the_store_keeps_two_families_side_by_side(tmp_path):
    store = open_store(tmp_path / "s.zarr", mode="a")
    clip = FeatureSetSpec.from_attrs(OLD_ATTRS)
    ids = {store.register_featureset(clip), store.register_featureset(DINO)}
    assert ids == {clip.id, DINO.id}
    assert store.register_featureset(DINO) == DINO.id  # idempotent
    reopened = open_store(tmp_path / "s.zarr").featuresets()
    assert reopened == {clip.id: clip, DINO.id: DINO}
    assert "vit_small_patch14_dinov2 (timm) / none, tokens 384-d, input 224x224" in DINO.describe()
    with pytest.raises(StoreError, match="lack pretrained"):  # never written unreadable
        store.register_featureset({"model": "x"})


def test_a_text_command_takes_the_only_feature_set_with_a_text_tower(tmp_path):
    store = open_store(tmp_path / "s.zarr", mode="a")
    clip = FeatureSetSpec.from_attrs(OLD_ATTRS)
    store.register_featureset(clip)
    store.register_featureset(DINO)
    store = open_store(tmp_path / "s.zarr")
    with_tower = lambda spec: spec.has_text_tower  # noqa: E731
    assert choose_featureset([store], None, "query", usable=with_tower) == (clip.id, clip)
    with pytest.raises(UserError, match="several feature sets .*pick one with --featureset"):
        choose_featureset([store], None)  # training may use either: the user says which
    assert choose_featureset([store], DINO.id, usable=with_tower) == (DINO.id, DINO)
