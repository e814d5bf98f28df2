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


@pytest.fixture(scope="session")
def prefect_api():
    """One Prefect API for the whole test session: Prefect's own test harness (a real server
    on a temporary database)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def write_store(root: Path, store_path: Path, **encoder_options) -> str:
    """Extract every scene under `root` into `store_path` with the tiny random-weight ViT,
    without Prefect (pipeline.extraction directly); returns the feature set id."""
    from pipeline.encoders.base import EncoderConfig
    from pipeline.encoders.clip import FrozenClipEncoder
    from pipeline.extraction import extract_scene
    from pipeline.readers.synthetic import SyntheticScene
    from storage import open_store

    store = open_store(store_path, mode="a")
    encoder = FrozenClipEncoder(EncoderConfig(model="test-ViT-tiny", pretrained="none",
                                              **encoder_options))
    featureset = store.register_featureset(encoder.describe())
    for scene_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        extract_scene(SyntheticScene.open(scene_dir), store, encoder, featureset, batch_size=4)
    store.consolidate()  # as the flow does at the end of a run
    return featureset


@pytest.fixture(scope="session")
def tiny_store(synthetic_root, tmp_path_factory) -> Path:
    """A store of the two synthetic scenes with one feature set (test-ViT-tiny, random
    weights), written once per session. Read-only: copy it before changing it."""
    path = tmp_path_factory.mktemp("tiny-store") / "store.zarr"
    write_store(synthetic_root, path)
    return path


# ------------------------------------------------------------------ README's commands, as typed


@pytest.fixture(scope="session")
def cli_env(tmp_path_factory) -> dict[str, str]:
    """A user's shell after `. .venv/bin/activate` (tests.readme.user_env), one Prefect home
    for the session's commands (the ephemeral API's database is made once)."""
    from tests.readme import user_env

    return user_env(tmp_path_factory.mktemp("prefect-home"))


@pytest.fixture(scope="session")
def readme_scenes(tmp_path_factory, cli_env) -> Path:
    """Three small synthetic scenes of 6 frames, written by README's `python -m
    pipeline.synthetic` as printed (placeholders filled in)."""
    from tests.readme import command, output, run, typed

    out = tmp_path_factory.mktemp("readme") / "scans"
    result = run(typed(command("python -m pipeline.synthetic --frames --scenes --seed --small"),
                       {"OUT": str(out), "N": "3", "F": "6", "S": "0"}), cli_env)
    assert result.returncode == 0, output(result)[-3000:]
    return out


@pytest.fixture(scope="session")
def readme_store(readme_scenes, cli_env) -> Path:
    """`storage/scannet.zarr` (in a folder of its own) of the three scenes, by README's stage-1
    command as printed: the tiny model with random weights for ViT-B-16/openai, through
    Prefect's ephemeral API; what it printed is in `storage/extract.log` beside it.
    Read-only: copy it before changing it."""
    from tests.readme import command, output, run, typed

    store = readme_scenes.parent / "storage" / "scannet.zarr"
    result = run(typed(command("python -m flows.extract_clip --dataset --model --pretrained "
                               "--root --store --stride"),
                       {"--root": str(readme_scenes), "--store": str(store),
                        "--model": "test-ViT-tiny", "--pretrained": "none"}), cli_env)
    assert result.returncode == 0, output(result)[-3000:]
    (store.parent / "extract.log").write_text(output(result))  # what the user saw
    return store
