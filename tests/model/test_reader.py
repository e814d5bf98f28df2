"""The reader API (model.reader) and README's "Use the cache from your own training code"
example, run as a user runs it: a script in a folder holding `storage/features.zarr`."""

from __future__ import annotations

import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from model.dataset import CachedScenes
from storage import StoreError, open_store
from model.reader import SAMPLE_KEYS, SceneDataset, open_cache

REPO = Path(__file__).resolve().parents[2]


def readme_example(name: str) -> str:
    """The code block of README.md between <!-- example:NAME --> and its closing marker."""
    text = (REPO / "README.md").read_text()
    match = re.search(rf"<!-- example:{name} -->\s*```python\n(.*?)```\s*<!-- /example:{name} -->",
                      text, re.S)
    assert match, f"README.md has no example {name}"
    return match.group(1)


@pytest.fixture(scope="module")
def user_folder(tiny_store, tmp_path_factory) -> Path:
    """A folder with the tiny store where README's examples expect it."""
    folder = tmp_path_factory.mktemp("user")
    shutil.copytree(tiny_store, folder / "storage" / "features.zarr")
    return folder


def test_readme_example_trains_a_plain_pytorch_loop(user_folder):
    script = user_folder / "train_probe.py"
    script.write_text(readme_example("reader"))
    result = subprocess.run([sys.executable, script.name], cwd=user_folder, capture_output=True,
                            text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("['scene0000_00', 'scene0001_00'] ['")
    assert re.fullmatch(r"torch.Size\(\[5000, 96\]\) \d+ points seen", lines[1]), lines[1]
    assert int(lines[1].split()[2]) > 0
    assert [line.split(":")[0] for line in lines[2:]] == ["epoch 0", "epoch 1"]
    assert "open_clip" not in result.stderr


def test_point_features_are_stage_2s(tiny_store):
    cache = open_cache(tiny_store)
    (featureset,) = cache.featuresets()
    scene_id = cache.scenes()[0]
    points = cache.point_features(scene_id)
    stage_2 = CachedScenes({scene_id: open_store(tiny_store)}, featureset,
                           torch.device("cpu")).load(scene_id)
    geometry = cache.geometry(scene_id)
    n_points = geometry.xyz.shape[0]
    assert points.features.shape == (n_points, cache.featuresets()[featureset].spatial_dim)
    assert points.features.dtype == torch.float32 and points.seen.dtype == torch.bool
    assert torch.equal(points.features, stage_2.feat2d) and torch.equal(points.seen, stage_2.seen)
    assert 0 < int(points.seen.sum()) < n_points  # the synthetic cameras miss some points
    assert not points.features[~points.seen].any()
    assert points.features[points.seen].abs().sum(dim=1).min() > 0
    assert points.view_global.shape == (int((geometry.valid).sum()),
                                        cache.featuresets()[featureset].global_dim)


def test_dataset_items_and_workers(tiny_store):
    dataset = open_cache(tiny_store).dataset()
    assert isinstance(dataset, torch.utils.data.Dataset) and len(dataset) == 2
    item = dataset[1]
    assert tuple(item) == SAMPLE_KEYS and item["scene_id"] == "scene0001_00"
    assert item["features"].shape == (item["xyz"].shape[0], dataset.feature_dim)
    assert item["semantic"].dtype == torch.int64
    assert set(item["semantic"].unique().tolist()) <= set(range(20)) | {-100}
    # DataLoader workers each open the store: the dataset pickles without its handle (README's
    # example runs two workers)
    copy = pickle.loads(pickle.dumps(dataset))
    assert copy._cache is None and torch.equal(copy[1]["features"], item["features"])


def test_featureset_choice_errors(tiny_store, tmp_path):
    cache = open_cache(tiny_store)
    with pytest.raises(StoreError, match=r"no feature set abc.*it has: 6ec|no feature set abc"):
        cache.point_features("scene0000_00", "abc")
    with pytest.raises(StoreError, match="no feature store"):
        open_cache(tmp_path / "nothing.zarr")
    with pytest.raises(StoreError, match="scene0009_00 is not"):
        cache.geometry("scene0009_00")
    assert isinstance(SceneDataset(str(tiny_store), "x", []), torch.utils.data.Dataset)
    assert np.array_equal(cache.frame_features("scene0000_00").done, np.ones(8, bool))


def test_the_reader_imports_no_network_training_loop_or_clip():
    code = ("import sys, model.reader; print(sorted(m for m in sys.modules if m.split('.')[0] "
            "in ('open_clip', 'timm', 'prefect') or m in ('model.train', 'model.network.fusion', "
            "'model.network.backbone', 'model.network.losses', 'pipeline.encoders')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
