"""Fixtures shared by every test package."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.synthetic import SMALL_COLOR_SIZE, SMALL_DEPTH_SIZE, write_scenes

SYNTHETIC = {"n_scenes": 2, "n_frames": 8, "seed": 0, "color_size": SMALL_COLOR_SIZE,
             "depth_size": SMALL_DEPTH_SIZE, "n_points": 5000}
"""The shared synthetic set: colour 242x324, depth 240x320, at most 5000 points a scene."""


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """Two synthetic scenes (scene0000_00, scene0001_00) of 8 frames each, written once per
    session (about a second). Read-only: copy it before breaking files."""
    root = tmp_path_factory.mktemp("synthetic")
    write_scenes(root, **SYNTHETIC)
    return root



def write_store(root: Path, store_path: Path, **encoder_options) -> str:
    """Extract every scene under `root` into `store_path` with the tiny random-weight ViT,
    without Prefect (pipeline.extraction directly); returns the feature set id."""
    from pipeline.clip_encoder import EncoderConfig, FrozenClipEncoder
    from pipeline.extraction import extract_scene
    from pipeline.synthetic import SyntheticScene
    from storage import open_store

    store = open_store(store_path, mode="a")
    encoder = FrozenClipEncoder(EncoderConfig(model="test-ViT-tiny", pretrained="none",
                                              **encoder_options))
    featureset = store.register_featureset(encoder.describe())
    for scene_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        extract_scene(SyntheticScene.open(scene_dir), store, encoder, featureset, batch_size=4)
    return featureset


@pytest.fixture(scope="session")
def tiny_store(synthetic_root, tmp_path_factory) -> Path:
    """A store of the two synthetic scenes with one feature set (test-ViT-tiny, random
    weights), written once per session. Read-only: copy it before changing it."""
    path = tmp_path_factory.mktemp("tiny-store") / "store.zarr"
    write_store(synthetic_root, path)
    return path
