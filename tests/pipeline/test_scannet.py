"""The ScanNet export reader and the label mapping, on small hand-written scenes."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from plyfile import PlyData, PlyElement

from storage.labels import CLASS_NAMES, THING_CLASSES, VALID_CLASS_IDS, nyu40_to_scannet20
from pipeline.readers.discovery import list_scenes
from pipeline.readers.scannet import ScanNetScene, require_valid
from pipeline.readers.base import IGNORE_INDEX, NO_INSTANCE, SceneError

COLOR = (12, 16)
DEPTH = (6, 8)
INTRINSIC_COLOR = np.array([[14.0, 0, 7.5, 0], [0, 14.0, 5.5, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
INTRINSIC_DEPTH = np.array([[7.0, 0, 3.5, 0], [0, 7.0, 2.5, 0], [0, 0, 1, 0], [0, 0, 0, 1]])


def color_image(frame_id: int, size=COLOR) -> np.ndarray:
    return np.full((*size, 3), (10 * frame_id, 100, 200), dtype=np.uint8)


def depth_image(frame_id: int, size=DEPTH) -> np.ndarray:
    depth = (np.arange(size[0] * size[1]).reshape(size) + 1000 * frame_id).astype(np.uint16)
    depth[0, 0] = 65535  # the full 16-bit range survives
    return depth


def pose(frame_id: int) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, 3] = (frame_id, 0.5, 1.25)
    return matrix


def write_frame(scene: Path, frame_id: int, *, color=True, depth=True, pose_matrix=True) -> None:
    for folder in ("color", "depth", "pose"):
        (scene / folder).mkdir(parents=True, exist_ok=True)
    if color:
        Image.fromarray(color_image(frame_id)).save(scene / "color" / f"{frame_id}.jpg", quality=95)
    if depth:
        Image.fromarray(depth_image(frame_id)).save(scene / "depth" / f"{frame_id}.png")
    if pose_matrix:
        np.savetxt(scene / "pose" / f"{frame_id}.txt", pose(frame_id))


def make_scene(root: Path, name: str = "scene0007_00", frame_ids=(0, 1, 2)) -> Path:
    scene = root / name
    (scene / "intrinsic").mkdir(parents=True)
    np.savetxt(scene / "intrinsic" / "intrinsic_color.txt", INTRINSIC_COLOR)
    np.savetxt(scene / "intrinsic" / "intrinsic_depth.txt", INTRINSIC_DEPTH)
    for frame_id in frame_ids:
        write_frame(scene, frame_id)
    return scene


def write_ply(path: Path, n_vertices: int, *, label: np.ndarray | None = None,
              faces: bool = False) -> None:
    fields = [("x", "f4"), ("y", "f4"), ("z", "f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")]
    if label is not None:
        fields.append(("label", "u2"))
    vertex = np.zeros(n_vertices, dtype=fields)
    vertex["x"] = np.arange(n_vertices) * 0.5
    vertex["y"], vertex["z"] = 1.0, 2.0
    vertex["red"], vertex["green"], vertex["blue"] = 7, 8, 9
    if label is not None:
        vertex["label"] = label
    elements = [PlyElement.describe(vertex, "vertex")]
    if faces:
        face = np.empty(n_vertices - 2, dtype=[("vertex_indices", "i4", (3,))])
        face["vertex_indices"] = np.stack([np.arange(n_vertices - 2) + k for k in range(3)], axis=1)
        elements.append(PlyElement.describe(face, "face"))
    PlyData(elements).write(path)


def write_annotations(scene: Path, seg_indices, seg_groups) -> None:
    (scene / f"{scene.name}_vh_clean_2.0.010000.segs.json").write_text(
        json.dumps({"sceneId": scene.name, "segIndices": list(seg_indices)}))
    (scene / f"{scene.name}.aggregation.json").write_text(json.dumps({"segGroups": seg_groups}))


# --- labels ---------------------------------------------------------------------------------

def test_nyu40_maps_to_the_20_benchmark_classes():
    nyu40 = np.array([[0, 1, 2, 3], [13, 14, 24, 28], [39, 40, 41, -1]])
    expected = np.array([[IGNORE_INDEX, 0, 1, 2], [IGNORE_INDEX, 12, 14, 15],
                         [19, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]])
    mapped = nyu40_to_scannet20(nyu40)
    assert mapped.dtype == np.int16
    np.testing.assert_array_equal(mapped, expected)
    np.testing.assert_array_equal(nyu40_to_scannet20(np.array(VALID_CLASS_IDS)), np.arange(20))
    assert (nyu40_to_scannet20(np.arange(41)) != IGNORE_INDEX).sum() == 20


def test_class_names_and_thing_classes():
    assert len(CLASS_NAMES) == 20
    assert (CLASS_NAMES[0], CLASS_NAMES[1], CLASS_NAMES[12], CLASS_NAMES[14], CLASS_NAMES[19]) == (
        "wall", "floor", "desk", "refrigerator", "otherfurniture")
    assert THING_CLASSES == tuple(range(2, 20))


# --- frames -----------------------------------------------------------------------------------

def test_frames_sort_numerically_with_gaps(tmp_path):
    scene = ScanNetScene.open(make_scene(tmp_path, frame_ids=(10, 2, 1, 100)))
    assert scene.frame_ids.dtype == np.int64
    np.testing.assert_array_equal(scene.frame_ids, [1, 2, 10, 100])
    assert scene.scene_id == "scene0007_00"


def test_valid_frame_reads_exact_values(tmp_path):
    scene = ScanNetScene(make_scene(tmp_path))
    assert scene.color_size == COLOR and scene.depth_size == DEPTH
    np.testing.assert_array_equal(scene.intrinsic_color, INTRINSIC_COLOR[:3, :3])
    np.testing.assert_array_equal(scene.intrinsic_depth, INTRINSIC_DEPTH[:3, :3])
    frame = scene.read_frame(2)
    assert frame.valid and frame.reason == "" and frame.frame_id == 2
    np.testing.assert_array_equal(frame.pose, pose(2))
    assert frame.depth_mm.dtype == np.uint16
    np.testing.assert_array_equal(frame.depth_mm, depth_image(2))
    assert frame.color.dtype == np.uint8 and frame.color.shape == (*COLOR, 3)
    assert np.abs(frame.color.astype(int) - color_image(2)).max() <= 3  # JPEG
    without_color = scene.read_frame(2, color=False)
    assert without_color.valid and without_color.color is None
    np.testing.assert_array_equal(without_color.depth_mm, depth_image(2))


def test_every_bad_frame_is_reported_with_its_reason(tmp_path):
    root = make_scene(tmp_path, frame_ids=range(12))
    jpeg = (root / "color/1.jpg").read_bytes()
    (root / "color/1.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "depth/2.png").write_bytes(b"")
    np.savetxt(root / "pose/3.txt", np.full((4, 4), -np.inf))
    nan_pose = pose(4)
    nan_pose[1, 2] = np.nan
    np.savetxt(root / "pose/4.txt", nan_pose)
    (root / "pose/5.txt").unlink()
    (root / "depth/6.png").unlink()
    Image.fromarray(depth_image(7, size=(5, 8))).save(root / "depth/7.png")
    Image.fromarray(color_image(8, size=(12, 15))).save(root / "color/8.jpg")
    (root / "pose/9.txt").write_text("1 0 0\n0 1 0\n")
    (root / "color/10.jpg").unlink()
    (root / "depth/11.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    write_frame(root, 12, color=False, depth=False)  # a pose alone still lists the frame
    expected = {
        1: "colour image does not decode (color/1.jpg)",
        2: "depth file is empty (depth/2.png)",
        3: "pose is not finite (pose/3.txt)",
        4: "pose is not finite (pose/4.txt)",
        5: "pose file is missing (pose/5.txt)",
        6: "depth file is missing (depth/6.png)",
        7: "depth is 5x8, expected 6x8 (depth/7.png)",
        8: "colour image is 12x15, expected 12x16 (color/8.jpg)",
        9: "pose is malformed, (2, 3) not 4x4 (pose/9.txt)",
        10: "color file is missing (color/10.jpg)",
        11: "depth does not decode (depth/11.png)",
        12: "depth file is missing (depth/12.png)",
    }
    scene = ScanNetScene(root)
    np.testing.assert_array_equal(scene.frame_ids, np.arange(13))
    frames = {int(i): scene.read_frame(int(i)) for i in scene.frame_ids}
    assert {i: f.reason for i, f in frames.items() if not f.valid} == expected
    assert frames[0].valid
    assert np.isnan(frames[5].pose).all() and np.isnan(frames[9].pose).all()
    assert np.isneginf(frames[3].pose).all()  # a parsed pose is kept as written
    assert frames[1].color is None and frames[7].depth_mm is None
    # A frame id the scene does not have is a reason too, not an exception.
    assert "frame 99 is not in" in scene.read_frame(99).reason


def test_scan_frames_finds_file_and_pose_problems_without_decoding(tmp_path):
    root = make_scene(tmp_path, frame_ids=range(6))
    jpeg = (root / "color/1.jpg").read_bytes()
    (root / "color/1.jpg").write_bytes(jpeg[: len(jpeg) // 2])  # found only by decoding
    (root / "depth/2.png").write_bytes(b"")
    np.savetxt(root / "pose/3.txt", np.full((4, 4), -np.inf))
    (root / "pose/4.txt").write_text("not a pose")
    (root / "color/5.jpg").unlink()
    assert ScanNetScene(root).scan_frames() == {
        2: "depth file is empty (depth/2.png)",
        3: "pose is not finite (pose/3.txt)",
        4: "pose is malformed (pose/4.txt)",
        5: "color file is missing (color/5.jpg)",
    }


def test_image_sizes_come_from_the_first_readable_header(tmp_path):
    root = make_scene(tmp_path, frame_ids=(0, 1))
    (root / "color/0.jpg").write_bytes(b"")
    (root / "depth/0.png").write_bytes(b"")
    scene = ScanNetScene(root)
    assert scene.color_size == COLOR and scene.depth_size == DEPTH
    (root / "depth/1.png").write_bytes(b"")
    scene = ScanNetScene(root)
    assert scene.read_frame(1).reason == "depth file is empty (depth/1.png)"
    (root / "depth/1.png").write_bytes(b"not a png")
    assert scene.read_frame(1).reason == (
        "scene scene0007_00: no image in depth/ has a readable header")
    with pytest.raises(SceneError, match="no image in depth/"):
        scene.depth_size


def test_a_scene_without_frames_is_an_error_naming_it(tmp_path):
    root = tmp_path / "scene0003_00"
    (root / "color").mkdir(parents=True)
    (root / "color" / "notes.txt").write_text("not a frame")
    with pytest.raises(SceneError, match="scene0003_00 has no frames"):
        ScanNetScene(root)


def test_missing_or_bad_intrinsics_name_the_file(tmp_path):
    root = make_scene(tmp_path)
    (root / "intrinsic/intrinsic_depth.txt").unlink()
    scene = ScanNetScene(root)
    np.testing.assert_array_equal(scene.intrinsic_color, INTRINSIC_COLOR[:3, :3])
    with pytest.raises(SceneError, match="scene0007_00.*intrinsic_depth.txt"):
        scene.intrinsic_depth
    (root / "intrinsic/intrinsic_depth.txt").write_text("1 2\n3 4\n")
    with pytest.raises(SceneError, match="intrinsic_depth.txt is not a finite 4x4"):
        ScanNetScene(root).intrinsic_depth


def test_require_valid(tmp_path):
    scene = ScanNetScene(make_scene(tmp_path))
    require_valid(scene, np.array([False, True, False]))
    with pytest.raises(SceneError, match="scene0007_00 has no valid frame among 3"):
        require_valid(scene, np.zeros(3, dtype=bool))


# --- points -----------------------------------------------------------------------------------

def test_points_labels_instances_and_segments(tmp_path):
    root = make_scene(tmp_path)
    write_ply(root / "scene0007_00_vh_clean_2.ply", 6, faces=True)
    write_ply(root / "scene0007_00_vh_clean_2.labels.ply", 6, label=np.array([1, 2, 5, 5, 22, 39]))
    # ScanNet segment ids are vertex numbers, not 0..S-1; group order gives the instance ids.
    write_annotations(root, [40, 40, 7, 7, 900, 3], [
        {"id": 0, "objectId": 0, "label": "chair", "segments": [7]},
        {"id": 1, "objectId": 1, "label": "wall", "segments": [40]},
        {"id": 2, "objectId": 2, "label": "cabinet", "segments": [3]},
    ])
    points = ScanNetScene(root).read_points()
    assert points.xyz.dtype == np.float32 and points.xyz.shape == (6, 3)
    np.testing.assert_allclose(points.xyz[:, 0], np.arange(6) * 0.5)
    assert points.rgb.dtype == np.uint8 and (points.rgb == (7, 8, 9)).all()
    assert points.semantic.dtype == np.int16
    np.testing.assert_array_equal(points.semantic, [0, 1, 4, 4, IGNORE_INDEX, 19])
    assert points.instance.dtype == np.int32 and points.segment.dtype == np.int32
    np.testing.assert_array_equal(points.instance, [1, 1, 0, 0, NO_INSTANCE, 2])
    np.testing.assert_array_equal(points.segment, [40, 40, 7, 7, 900, 3])


def test_missing_annotations_warn_and_leave_points_unlabelled(tmp_path, caplog):
    root = make_scene(tmp_path)
    write_ply(root / "scene0007_00_vh_clean_2.ply", 4)
    with caplog.at_level(logging.WARNING, logger="pipeline.readers.scannet"):
        points = ScanNetScene(root).read_points()
    assert (points.semantic == IGNORE_INDEX).all() and (points.instance == NO_INSTANCE).all()
    assert (points.segment == -1).all()
    assert "labels.ply" in caplog.text and "segs.json" in caplog.text
    (root / "scene0007_00_vh_clean_2.0.010000.segs.json").write_text(
        json.dumps({"segIndices": [5, 5, 6, 6]}))
    points = ScanNetScene(root).read_points()
    np.testing.assert_array_equal(points.segment, [5, 5, 6, 6])
    assert (points.instance == NO_INSTANCE).all()


def test_missing_mesh_is_an_error_naming_scene_and_file(tmp_path):
    scene = ScanNetScene(make_scene(tmp_path))
    with pytest.raises(SceneError, match="scene0007_00.*scene0007_00_vh_clean_2.ply is missing"):
        scene.read_points()


def test_vertex_count_mismatch_names_both_files(tmp_path):
    root = make_scene(tmp_path)
    write_ply(root / "scene0007_00_vh_clean_2.ply", 5)
    write_ply(root / "scene0007_00_vh_clean_2.labels.ply", 4, label=np.ones(4))
    with pytest.raises(SceneError,
                       match=r"labels.ply has 4 vertices but scene0007_00_vh_clean_2.ply has 5"):
        ScanNetScene(root).read_points()
    write_ply(root / "scene0007_00_vh_clean_2.labels.ply", 5, label=np.ones(5))
    write_annotations(root, [0, 0, 1], [])
    with pytest.raises(SceneError, match=r"segs.json has 3 vertices but .*_vh_clean_2.ply has 5"):
        ScanNetScene(root).read_points()


# --- scene listing ----------------------------------------------------------------------------

def test_list_scenes(tmp_path):
    for name in ("scene0002_00", "scene0000_01", "scene0010_00"):
        make_scene(tmp_path, name, frame_ids=(0,))
    mesh_only = tmp_path / "scene0100_00"
    mesh_only.mkdir()
    write_ply(mesh_only / "scene0100_00_vh_clean_2.ply", 3)
    (tmp_path / "not_a_scene").mkdir()
    (tmp_path / "file.txt").write_text("")
    names = lambda paths: [p.name for p in paths]  # noqa: E731
    assert names(list_scenes(tmp_path)) == [
        "scene0000_01", "scene0002_00", "scene0010_00", "scene0100_00"]
    assert names(list_scenes(tmp_path, "scene000*")) == ["scene0000_01", "scene0002_00"]
    assert names(list_scenes(tmp_path, ["scene0010_00", "scene0000_01"])) == [
        "scene0000_01", "scene0010_00"]
    with pytest.raises(SceneError, match="scene0999_00"):
        list_scenes(tmp_path, ["scene0002_00", "scene0999_00"])
    assert names(list_scenes(tmp_path / "scene0002_00")) == ["scene0002_00"]
    assert list_scenes(tmp_path / "missing") == []
