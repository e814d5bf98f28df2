"""The extract-clip flow through a real Prefect API, on synthetic ScanNet-layout scenes."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest

from flows.extract_clip import ExtractionFailed, extract_clip, main
from storage import open_store

TINY = {"model": "test-ViT-tiny", "pretrained": "none", "dataset": "synthetic", "batch_size": 4}


def run(root, store, **overrides):
    return extract_clip(root=str(root), store=str(store), **{**TINY, **overrides})


def assert_same_features(store_a, store_b):
    a, b = open_store(store_a), open_store(store_b)
    assert a.scenes() == b.scenes() and a.featuresets() == b.featuresets()
    for scene_id in a.scenes():
        for fid in a.featuresets():
            fa, fb = a.features(scene_id, fid), b.features(scene_id, fid)
            np.testing.assert_array_equal(fa.spatial, fb.spatial)
            np.testing.assert_array_equal(fa.global_, fb.global_)
            np.testing.assert_array_equal(fa.done, fb.done)
        np.testing.assert_array_equal(a.scene(scene_id).pose, b.scene(scene_id).pose)
        np.testing.assert_array_equal(a.scene(scene_id).depth, b.scene(scene_id).depth)


@pytest.fixture(scope="module")
def reference_store(prefect_api, synthetic_root, tmp_path_factory):
    """An uninterrupted run, the yardstick of the resume and Dask tests."""
    store = tmp_path_factory.mktemp("reference") / "store.zarr"
    summary = run(synthetic_root, store)
    return store, summary


def test_flow_writes_every_frame(reference_store, synthetic_root):
    store_path, summary = reference_store
    store = open_store(store_path)
    scene_ids = sorted(p.name for p in synthetic_root.iterdir() if p.is_dir())
    assert store.scenes() == scene_ids
    (fid, spec), = store.featuresets().items()
    assert summary["featureset"] == fid == spec.id
    assert spec.model == "test-ViT-tiny" and spec.random_weights is True
    assert spec.decode == "scaled"  # the default decode path, recorded
    gh, gw = spec.grid_size
    for scene_id in scene_ids:
        scene = store.scene(scene_id)
        features = store.features(scene_id, fid)
        n_frames = scene.frame_id.size
        assert features.spatial.shape == (n_frames, gh, gw, spec.spatial_dim)
        assert features.global_.shape == (n_frames, spec.global_dim)
        assert features.spatial.dtype == np.float16 and features.global_.dtype == np.float16
        assert features.done.all() and scene.valid.all()
        assert np.isfinite(scene.pose).all() and (scene.depth > 0).mean() > 0.5
        assert np.abs(features.spatial).sum(axis=(1, 2, 3)).min() > 0  # no frame left empty
        assert summary["scenes"][scene_id]["encoded"] == n_frames
    assert summary["frames_encoded"] == sum(store.scene(s).frame_id.size for s in scene_ids)
    assert summary["frames_invalid"] == 0 and summary["failed"] == []


def test_rerun_encodes_nothing(reference_store, synthetic_root):
    store_path, _ = reference_store
    summary = run(synthetic_root, store_path)
    assert summary["frames_encoded"] == 0
    assert all(s["already_done"] == s["frames"] for s in summary["scenes"].values())


def test_resume_after_some_scenes_computes_only_the_rest(reference_store, synthetic_root, tmp_path):
    store = tmp_path / "store.zarr"
    first, *rest = sorted(p.name for p in synthetic_root.iterdir() if p.is_dir())
    partial = run(synthetic_root, store, scenes=[first])
    snapshot = open_store(store, consolidated=True).root.metadata.consolidated_metadata\
        .flattened_metadata
    assert f"scenes/{first}/points/xyz" in snapshot and f"scenes/{rest[0]}" not in snapshot
    resumed = run(synthetic_root, store)
    snapshot = open_store(store, consolidated=True).root.metadata.consolidated_metadata\
        .flattened_metadata
    assert all(f"scenes/{scene_id}/frames/pose" in snapshot for scene_id in [first, *rest])
    reference_summary = reference_store[1]
    assert resumed["scenes"][first]["encoded"] == 0
    assert partial["frames_encoded"] + resumed["frames_encoded"] == reference_summary["frames_encoded"]
    assert_same_features(store, reference_store[0])


def test_dask_local_cluster_gives_the_same_store(reference_store, synthetic_root, tmp_path):
    store = tmp_path / "store.zarr"
    summary = run(synthetic_root, store, task_runner="dask", workers=2)
    assert summary["frames_encoded"] == reference_store[1]["frames_encoded"]
    assert_same_features(store, reference_store[0])
    # Dask's logs were quiet for the run only: the process (a notebook, say) gets them back
    assert "DASK_LOGGING__DISTRIBUTED" not in os.environ
    assert logging.getLogger("distributed").level != logging.WARNING


def _no_mesh(scene):
    (scene / f"{scene.name}_vh_clean_2.ply").unlink()
    return "_vh_clean_2.ply"


def _no_frames(scene):
    import shutil

    for folder in ("color", "depth", "pose"):
        shutil.rmtree(scene / folder)
        (scene / folder).mkdir()
    return "no frames"


def _labels_of_another_mesh(scene):
    from plyfile import PlyData, PlyElement

    labels = scene / f"{scene.name}_vh_clean_2.labels.ply"
    vertices = PlyData.read(str(labels))["vertex"].data[:-10].copy()  # 10 vertices fewer
    PlyData([PlyElement.describe(vertices, "vertex")]).write(str(labels))
    return "labels.ply has"


@pytest.mark.parametrize("break_scene", [_no_mesh, _no_frames, _labels_of_another_mesh])
def test_a_broken_scene_fails_alone(prefect_api, synthetic_root, tmp_path, break_scene):
    import shutil

    root = tmp_path / "scenes"
    shutil.copytree(synthetic_root, root)
    broken = sorted(p for p in root.iterdir() if p.is_dir())[0]
    expected = break_scene(broken)
    with pytest.raises(ExtractionFailed, match=f"1 of 2 scenes failed.*{broken.name}.*{expected}"):
        run(root, tmp_path / "store.zarr")
    store = open_store(tmp_path / "store.zarr")
    assert broken.name not in store.scenes() and len(store.scenes()) == 1
    (fid,) = store.featuresets()
    assert store.done(store.scenes()[0], fid).all()  # the other scene is complete


def test_invalid_frames_are_recorded_and_the_run_succeeds(prefect_api, synthetic_root, tmp_path):
    import shutil

    root = tmp_path / "scenes"
    shutil.copytree(synthetic_root, root)
    scene = sorted(p for p in root.iterdir() if p.is_dir())[0]
    (scene / "color" / "0.jpg").write_bytes(b"not a jpeg")
    (scene / "pose" / "1.txt").write_text("-inf -inf -inf -inf\n" * 4)
    (scene / "depth" / "2.png").unlink()
    summary = run(root, tmp_path / "store.zarr")
    assert summary["frames_invalid"] == 3 and summary["failed"] == []
    invalid = summary["scenes"][scene.name]["invalid"]
    assert sorted(invalid) == [0, 1, 2]
    assert "0.jpg" in invalid[0] and "1.txt" in invalid[1] and "2.png" in invalid[2]
    store = open_store(tmp_path / "store.zarr")
    (fid,) = store.featuresets()
    stored = store.scene(scene.name)
    features = store.features(scene.name, fid)
    assert not stored.valid[:3].any() and stored.valid[3:].all()
    assert features.done.all()  # invalid frames are done: a rerun does not retry them
    assert [r for r in stored.reason[:3]] == [invalid[0], invalid[1], invalid[2]]
    assert np.abs(features.spatial[3:]).sum(axis=(1, 2, 3)).min() > 0


def test_cli_reports_user_errors_in_one_line(prefect_api, tmp_path, capsys):
    code = main(["--root", str(tmp_path / "empty"), "--store", str(tmp_path / "s.zarr"),
                 "--model", "test-ViT-tiny", "--pretrained", "none"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith(f"error: --root: no folder {tmp_path / 'empty'}") and err.count("\n") == 1
    assert not (tmp_path / "s.zarr").exists()
