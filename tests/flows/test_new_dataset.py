"""README's "a new dataset": one reader class and one registry line, and stage 1 finds, skips and
extracts that dataset's scenes as its reader reads them (not by ScanNet's folder layout)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.readers import SCENE_READERS
from pipeline.readers.base import Frame, Points, Scene, SceneError
from pipeline.readers.discovery import list_scenes, not_scenes
from pipeline.readers.synthetic import SyntheticScene
from storage import UserError, open_store
from tests.flows.test_extract_clip import run


class NpzScene(Scene):
    """A dataset of one `scan.npz` per scene folder: no color/, no mesh, no .sens."""

    def __init__(self, root: Path):
        self.root, self.scene_id = Path(root), Path(root).name
        if not (self.root / "scan.npz").is_file():
            raise SceneError(f"scene {self.scene_id}: no scan.npz in {self.root}")
        self.arrays = dict(np.load(self.root / "scan.npz"))

    frame_ids = property(lambda self: np.arange(len(self.arrays["pose"]), dtype=np.int64))
    intrinsic_color = property(lambda self: self.arrays["k_color"])
    intrinsic_depth = property(lambda self: self.arrays["k_depth"])
    color_size = property(lambda self: self.arrays["color"].shape[1:3])
    depth_size = property(lambda self: self.arrays["depth"].shape[1:3])

    def read_frame(self, frame_id, *, color=True, depth=True, color_min_size=None) -> Frame:
        a = self.arrays
        return Frame(int(frame_id), a["pose"][frame_id], a["color"][frame_id] if color else None,
                     a["depth"][frame_id] if depth else None)

    def read_points(self) -> Points:
        a = self.arrays
        return Points(a["xyz"], a["rgb"], a["semantic"], a["instance"], a["segment"])


def write_npz_dataset(synthetic_root: Path, out: Path) -> Path:
    """The synthetic scenes rewritten as `<scene>/scan.npz`, plus a folder of notes."""
    for folder in sorted(p for p in synthetic_root.iterdir() if p.is_dir()):
        scene = SyntheticScene.open(folder)
        frames = [scene.read_frame(i) for i in scene.frame_ids]
        points = scene.read_points()
        (out / folder.name).mkdir(parents=True)
        np.savez(out / folder.name / "scan.npz", pose=np.stack([f.pose for f in frames]),
                 color=np.stack([f.color for f in frames]),
                 depth=np.stack([f.depth_mm for f in frames]),
                 k_color=scene.intrinsic_color, k_depth=scene.intrinsic_depth, xyz=points.xyz,
                 rgb=points.rgb, semantic=points.semantic, instance=points.instance,
                 segment=points.segment)
    (out / "notes").mkdir()
    (out / "notes" / "todo.txt").write_text("re-scan the kitchen")
    return out


def test_a_new_datasets_scenes_are_found_by_its_reader(synthetic_root, tmp_path):
    root = write_npz_dataset(synthetic_root, tmp_path / "npz")
    assert [p.name for p in list_scenes(root, reader=NpzScene)] == ["scene0000_00",
                                                                    "scene0001_00"]
    assert not_scenes(root, reader=NpzScene) == {"notes": f"scene notes: no scan.npz in "
                                                          f"{root / 'notes'}"}
    assert list_scenes(root / "scene0001_00", reader=NpzScene) == [root / "scene0001_00"]
    assert list_scenes(root) == []  # ScanNet's reader finds none of them: the reader decides


def test_stage_1_extracts_a_registered_dataset(prefect_api, synthetic_root, tmp_path,
                                               monkeypatch):
    root = write_npz_dataset(synthetic_root, tmp_path / "npz")
    monkeypatch.setitem(SCENE_READERS, "npz", NpzScene)  # the registry line README shows
    summary = run(root, tmp_path / "store.zarr", dataset="npz")
    assert sorted(summary["scenes"]) == ["scene0000_00", "scene0001_00"]
    assert summary["skipped_folders"] == {"notes": f"scene notes: no scan.npz in {root / 'notes'}"}
    store = open_store(tmp_path / "store.zarr")
    (fid,) = store.featuresets()
    for scene_id in ("scene0000_00", "scene0001_00"):
        assert store.features(scene_id, fid).done.all()
    with pytest.raises(UserError, match="no scenes under"):  # ScanNet's rule finds none here
        run(root, tmp_path / "scannet.zarr", dataset="scannet")
