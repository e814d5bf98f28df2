"""A missing chunk never reads as data: stage 2 refuses the frame in one line naming it and the
repair; `storage.inspect --verify` lists missing and corrupt chunks by scene, frame and file;
a stage-1 rerun redoes those frames (with --verify also the corrupt ones) bit for bit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from flows.extract_clip import extract_clip
from model.dataset import CachedScenes
from storage import StoreError, open_store
from storage.chunks import MISSING_DEPTH
from tests.flows.test_extract_clip import assert_same_features
from tests.reliability.conftest import copy_store, one_error_line, run_command

SCENE = "scene0000_00"


def featureset_of(store_path) -> str:
    (fid,) = open_store(store_path).featuresets()
    return fid


def load(store_path, scene_id=SCENE):
    store = open_store(store_path)
    return CachedScenes({scene_id: store}, featureset_of(store_path),
                        torch.device("cpu")).load(scene_id)


def chunk(store_path, scene_id, array, frame) -> object:
    """The chunk file of `frame` (position) of a per-frame array, e.g. "frames/depth"."""
    node = open_store(store_path).node(f"scenes/{scene_id}/{array}")
    coords = (frame,) + (0,) * (node.ndim - 1)
    return store_path / node.path / node.metadata.encode_chunk_key(coords)


def test_a_deleted_frame_stops_training_with_one_line(pristine_store, tmp_path):
    store = copy_store(pristine_store, tmp_path / "store.zarr")
    fid = featureset_of(store)
    for name in ("spatial", "global"):  # what the issue did: the frame stays done and valid
        chunk(store, SCENE, f"features/{fid}/{name}", 3).unlink()
    result = run_command("model.train", "--cache", str(store), "--epochs", "1", "--device",
                         "cpu", "--voxel-size", "0.05", "--channels", "16,32", "--width", "32",
                         "--no-plot", "--out", str(tmp_path / "run"))
    line = one_error_line(result.stderr)
    assert result.returncode == 1
    assert f"scene {SCENE} frame 3:" in line and "is missing" in line
    assert str(store / "scenes" / SCENE / "features" / fid) in line  # the chunk file
    assert f"--store {store} --dataset KIND --model MODEL --pretrained WEIGHTS --verify" in line
    assert f"python -m storage.inspect {store}` lists" in line  # where the placeholders come from


def test_a_deleted_label_chunk_is_not_class_zero(pristine_store, tmp_path):
    store = copy_store(pristine_store, tmp_path / "store.zarr")
    semantic = store / "scenes" / SCENE / "points" / "semantic" / "c" / "0"
    semantic.unlink()
    with pytest.raises(StoreError, match=f"scene {SCENE}: points/semantic is missing its chunk "
                                         f"\\({semantic}\\).*--verify"):
        load(store)


def test_fill_values_are_never_data(pristine_store):
    store = open_store(pristine_store)
    fid = featureset_of(pristine_store)
    node = lambda path: store.node(f"scenes/{SCENE}/{path}")  # noqa: E731
    for path in (f"features/{fid}/spatial", f"features/{fid}/global", "frames/pose",
                 "points/xyz", "frames/intrinsic_color", "frames/intrinsic_depth"):
        assert np.isnan(node(path).fill_value), path
    assert node("frames/depth").fill_value == MISSING_DEPTH
    assert node("points/semantic").fill_value == np.iinfo(np.int16).min
    for path in ("points/instance", "points/segment"):
        assert node(path).fill_value == np.iinfo(np.int32).min
    assert node("frames/frame_id").fill_value == np.iinfo(np.int64).min


def test_a_store_filled_with_zeros_by_earlier_code_is_checked_too(pristine_store, tmp_path):
    """Stores written before NaN fill values read a missing feature chunk as zeros."""
    store = copy_store(pristine_store, tmp_path / "store.zarr")
    fid = featureset_of(store)
    for name in ("spatial", "global"):
        metadata = store / "scenes" / SCENE / "features" / fid / name / "zarr.json"
        meta = json.loads(metadata.read_text())
        meta["fill_value"] = 0.0
        metadata.write_text(json.dumps(meta))
        chunk(store, SCENE, f"features/{fid}/{name}", 5).unlink()
    with pytest.raises(StoreError, match=f"scene {SCENE} frame 5: the features/{fid}/global "
                                         "chunk is missing"):
        load(store)


def test_verify_lists_then_a_rerun_repairs(prefect_api, pristine_store, synthetic_root,
                                           tmp_path):
    store = copy_store(pristine_store, tmp_path / "store.zarr")
    fid = featureset_of(store)
    deleted = chunk(store, SCENE, f"features/{fid}/spatial", 3)
    deleted.unlink()
    truncated = chunk(store, "scene0001_00", "frames/depth", 6)
    truncated.write_bytes(truncated.read_bytes()[:40])
    lost_valid = chunk(store, SCENE, "frames/valid", 2)
    lost_valid.unlink()
    labels = store / "scenes" / "scene0001_00" / "points" / "semantic" / "c" / "0"
    labels.unlink()

    result = run_command("storage.inspect", str(store), "--verify")
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    expected = {f"scene {SCENE} frame 3: features/{fid}/spatial is missing ({deleted})",
                f"scene {SCENE} frame 2: frames/valid is missing ({lost_valid})",
                f"scene scene0001_00: points/semantic is missing ({labels})"}
    assert expected <= {line.strip() for line in lines}, result.stdout
    assert any(line.strip().startswith("scene scene0001_00 frame 6: frames/depth is corrupt (Zstd")
               and str(truncated) in line for line in lines), result.stdout
    assert f"--store {store} --dataset KIND --model MODEL --pretrained WEIGHTS --verify" in lines[-1]
    with pytest.raises(StoreError, match="scene0001_00 frame 6: the frames/depth chunk is "
                                         "corrupt \\(Zstd"):
        open_store(store).frame_array("scene0001_00", "frames/depth", np.arange(8))[0:8]

    run = lambda **options: extract_clip(  # noqa: E731
        root=str(synthetic_root), store=str(store), dataset="synthetic", model="test-ViT-tiny",
        pretrained="none", batch_size=1, **options)
    plain = run()  # listing finds the missing chunks; the truncated one needs --verify
    assert plain["frames_repaired"] == 2 and plain["frames_encoded"] == 2
    assert run_command("storage.inspect", str(store), "--verify").returncode == 1
    verified = run(verify=True)
    assert verified["frames_repaired"] == 1
    assert verified["scenes"]["scene0001_00"]["repaired"] == 1
    result = run_command("storage.inspect", str(store), "--verify")
    assert result.returncode == 0, result.stdout
    assert_same_features(store, pristine_store)  # redone frames equal the first encoding
    np.testing.assert_array_equal(open_store(store).scene("scene0001_00").semantic,
                                  open_store(pristine_store).scene("scene0001_00").semantic)
    assert load(store, "scene0001_00").view_global.shape[0] == 8
