"""Fixtures of the fault tests: pristine stores, a trained run, moto's S3 server."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.flows.test_scale import s3_server  # noqa: F401 (moto's S3 server, a fixture)

REPO = Path(__file__).resolve().parents[2]
SMALL_RUN = {"voxel_size": 0.05, "channels": (16, 32), "width": 32, "plot": False,
             "device": "cpu", "warmup_steps": 0, "batch_scenes": 1, "val_fraction": 0.5}
"""A stage-2 run small enough for a CPU test: one training and one validation scene."""


@pytest.fixture(scope="session")
def tiny_encoder():
    from pipeline.encoders.base import EncoderConfig
    from pipeline.encoders.clip import FrozenClipEncoder

    return FrozenClipEncoder(EncoderConfig(model="test-ViT-tiny", pretrained="none"))


def extract(root: Path, store_path: Path, encoder, **options) -> str:
    """Extract every scene under `root` without Prefect, one frame per batch (so that a
    frame encoded again equals the first encoding bit for bit); returns the feature set."""
    from pipeline.extraction import extract_scene
    from pipeline.readers.synthetic import SyntheticScene
    from storage import open_store

    store = open_store(store_path, mode="a")
    featureset = store.register_featureset(encoder.describe())
    for scene_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        extract_scene(SyntheticScene.open(scene_dir), store, encoder, featureset,
                      **{"batch_size": 1, **options})
    return featureset


@pytest.fixture(scope="session")
def pristine_store(synthetic_root, tiny_encoder, tmp_path_factory) -> Path:
    """The two synthetic scenes extracted one frame per batch. Read-only: copy it."""
    path = tmp_path_factory.mktemp("pristine") / "store.zarr"
    extract(synthetic_root, path, tiny_encoder)
    return path


def copy_store(store: Path, to: Path) -> Path:
    shutil.copytree(store, to)
    return to


@pytest.fixture(scope="session")
def trained_run(tiny_store, tmp_path_factory) -> Path:
    """A one-epoch stage-2 run on the tiny store (checkpoints/last.pt). Read-only: copy it."""
    from model.config import TrainConfig
    from model.train import Trainer

    out = tmp_path_factory.mktemp("trained") / "run"
    Trainer(TrainConfig(cache=str(tiny_store), out=str(out), epochs=1, **SMALL_RUN)).fit()
    return out


def run_command(*args: str, env: dict[str, str] | None = None,
                timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m ...` as a user types it, from the repository root; `env` adds to this
    process's environment (a None value leaves that variable out)."""
    merged = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout,
                          env={name: value for name, value in merged.items() if value is not None})


def one_error_line(stderr: str) -> str:
    """The one `error: ...` line of a failed command's stderr, which holds no traceback (logs
    and progress bars before it are allowed; splitlines also splits a bar's carriage returns)."""
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return errors[0]
