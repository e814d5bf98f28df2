"""Numbers that cannot work are one-line errors before any work (stride 0 or -1, batch size 0,
workers 0); a pose that is all zero, scaled, sheared or mirrored is an invalid frame with its
reason; folders under --root that are no scene are reported; `storage.inspect` tells frames
not processed yet from invalid ones."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from flows.extract_clip import extract_clip
from model.dataset import CachedScenes
from pipeline.readers.scannet import ScanNetScene
from storage import UserError, open_store
from storage.inspect import format_report, summarise
from tests.flows.test_extract_clip import TINY, run
from tests.reliability.conftest import copy_store, one_error_line, run_command


@pytest.mark.parametrize("name, value", [("stride", 0), ("stride", -1), ("batch_size", 0),
                                         ("workers", 0), ("workers", -2)])
def test_numbers_below_one_are_refused_in_one_line(prefect_api, synthetic_root, tmp_path,
                                                   name, value):
    with pytest.raises(UserError) as refused:
        extract_clip(root=str(synthetic_root), store=str(tmp_path / "store.zarr"),
                     **{**TINY, name: value})
    message = str(refused.value)
    assert message.startswith(f"{name} {value}: must be a whole number of at least 1")
    assert "\n" not in message
    assert not (tmp_path / "store.zarr").exists()  # refused before anything was written


def test_the_command_refuses_them_before_prefect_starts(synthetic_root, tmp_path):
    result = run_command("flows.extract_clip", "--root", str(synthetic_root), "--dataset",
                         "synthetic", "--store", str(tmp_path / "store.zarr"), "--model",
                         "test-ViT-tiny", "--pretrained", "none", "--stride", "-1")
    assert result.returncode == 1
    assert result.stderr.strip() == ("error: stride -1: must be a whole number of at least 1 "
                                     "(keep every N-th frame); e.g. --stride 1")


@pytest.mark.parametrize("size", ["7", "240x8"])
def test_an_image_size_below_one_patch_is_refused_before_prefect_starts(size, synthetic_root,
                                                                        tmp_path):
    """test-ViT-tiny has 16-pixel patches: a smaller input would have no token at all."""
    store = tmp_path / "store.zarr"
    result = run_command("flows.extract_clip", "--root", str(synthetic_root), "--dataset",
                         "synthetic", "--store", str(store), "--model", "test-ViT-tiny",
                         "--pretrained", "none", "--image-size", size)
    line = one_error_line(result.stderr)
    assert result.returncode == 1 and "smaller than one 16x16-pixel patch of test-ViT-tiny" in line
    assert "Starting temporary server" not in result.stderr and not store.exists()


def write_pose(scene, frame, matrix) -> None:
    np.savetxt(scene / "pose" / f"{frame}.txt", matrix)


def test_poses_that_are_not_rigid_transforms_are_invalid_frames(synthetic_root, tmp_path):
    scene = tmp_path / "scene0000_00"
    shutil.copytree(synthetic_root / "scene0000_00", scene)
    pose = np.loadtxt(scene / "pose" / "4.txt")
    write_pose(scene, 0, np.zeros((4, 4)))
    write_pose(scene, 1, pose * np.array([[2.0], [2.0], [2.0], [1.0]]))  # scaled by 2
    mirrored = pose.copy()
    mirrored[:3, 0] *= -1
    write_pose(scene, 2, mirrored)
    bottom = pose.copy()
    bottom[3] = (0.0, 0.0, 0.5, 1.0)
    write_pose(scene, 3, bottom)
    reader = ScanNetScene(scene)
    reasons = [reader.read_frame(f, color=False, depth=False).reason for f in range(5)]
    assert reasons[0] == "pose is all zero (pose/0.txt)"
    assert reasons[1].startswith("pose is not a rigid transform (rotation part off orthonormal")
    assert reasons[2] == "pose is not a rigid transform (a reflection) (pose/2.txt)"
    assert reasons[3] == "pose is not a rigid transform (last row is not 0 0 0 1) (pose/3.txt)"
    assert reasons[4] == ""


def test_stage_2_leaves_out_a_non_rigid_pose_stored_as_valid(tiny_store, tmp_path, caplog):
    """A store written before poses were checked may hold one marked valid."""
    path = copy_store(tiny_store, tmp_path / "store.zarr")
    store = open_store(path, mode="a")
    (fid,) = store.featuresets()
    store.root["scenes/scene0000_00/frames/pose"][2] = np.zeros((4, 4))
    sample = CachedScenes({"scene0000_00": store}, fid, torch.device("cpu")).load("scene0000_00")
    assert sample.view_global.shape[0] == 7
    assert "leaving out 1 frames whose pose is not a rigid transform (e.g. frame 2)" in caplog.text


def test_folders_that_are_no_scene_are_reported(prefect_api, synthetic_root, tmp_path):
    root = tmp_path / "scenes"
    shutil.copytree(synthetic_root, root)
    (root / "scene0002_00").mkdir()  # an empty scene folder (a failed download)
    (root / "notes").mkdir()
    (root / "notes" / "todo.txt").write_text("x")
    summary = run(root, tmp_path / "store.zarr")
    assert summary["skipped_folders"] == {
        "notes": "no color/ folder, no notes_vh_clean_2.ply and no notes.sens",
        "scene0002_00": "an empty folder"}
    assert sorted(summary["scenes"]) == ["scene0000_00", "scene0001_00"]
    empty_root = tmp_path / "only-empty"
    (empty_root / "scene0000_00").mkdir(parents=True)
    with pytest.raises(UserError, match="no scenes under .* \\(folders that are no scene: "
                                        "scene0000_00: an empty folder\\)"):
        run(empty_root, tmp_path / "other.zarr")


def test_inspect_tells_frames_not_processed_from_invalid_ones(tiny_store, tmp_path):
    path = copy_store(tiny_store, tmp_path / "store.zarr")
    store = open_store(path, mode="a")
    (fid,) = store.featuresets()
    frames = store.root["scenes/scene0000_00/frames"]
    frames["valid"][5:] = False  # as if stage 1 had stopped before frames 5, 6, 7
    store.root[f"scenes/scene0000_00/features/{fid}/done"][5:] = False
    frames["valid"][0] = False
    frames["reason"][0] = "colour image does not decode (color/0.jpg)"
    report = summarise(store)
    scene = report["scenes"]["scene0000_00"]
    assert scene["not_processed"] == 3
    assert scene["invalid"] == {"0": "colour image does not decode (color/0.jpg)"}
    text = format_report(report)
    assert "3 frames not processed yet" in text
    assert "invalid frame 0: colour image does not decode" in text
    assert "invalid frame 5" not in text
