"""The scene interface: what stage 1 and the store need of an RGB-D scan.

A scene is a folder in ScanNet's SensReader export layout::

    <scene>/color/<i>.jpg           RGB frames (1296x968 in ScanNet)
    <scene>/depth/<i>.png           uint16 depth, millimetres (640x480 in ScanNet)
    <scene>/pose/<i>.txt            4x4 camera-to-world, metres (real scans contain -inf)
    <scene>/intrinsic/intrinsic_color.txt, intrinsic_depth.txt   4x4 (top-left 3x3 used)
    <scene>/<scene>_vh_clean_2.ply  mesh vertices: the point cloud (xyz, rgb)
    <scene>/<scene>_vh_clean_2.labels.ply          NYU40 `label` per vertex
    <scene>/<scene>_vh_clean_2.0.010000.segs.json  over-segmentation (segIndices per vertex)
    <scene>/<scene>.aggregation.json               instances: segGroups of segments
    <scene>/<scene>.txt             ScanNet's meta data: axisAlignment (optional)

or a raw ScanNet scan, as ScanNet distributes it: `<scene>/<scene>.sens` (colour JPEGs,
compressed depth, poses and intrinsics in one file) instead of color/, depth/, pose/ and
intrinsic/, beside the same mesh and annotation files (pipeline.readers.scannet_sens).

Readers never raise for one bad frame: `read_frame` returns a `Frame` whose `reason`
says what is wrong. A scene with no valid frame, or without its point cloud, raises
`SceneError` naming the scene and the file.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from cli.errors import UserError
# what Points hold where there is no label, instance or segment
from storage.labels import IGNORE_INDEX, NO_INSTANCE, NO_SEGMENT  # noqa: F401


class SceneError(UserError):
    """A scene cannot be read at all (no frames, no point cloud, inconsistent files)."""


@dataclass(frozen=True)
class Frame:
    """One RGB-D frame as read from disk. Never raises; `reason` is empty when valid.

    frame_id: the number in the file name (`color/<frame_id>.jpg`).
    pose: (4, 4) float64, camera-to-world, metres; NaN-filled when unreadable.
    color: (H, W, 3) uint8 RGB, or None when it could not be decoded (or was not asked for);
        (ceil(H / r), ceil(W / r), 3) when read at 1/r of its size (`color_reduction`).
    depth_mm: (h, w) uint16 millimetres, 0 = no reading, or None.
    reason: why the frame is unusable, e.g. "pose is not finite (pose/12.txt)".
    color_reduction: r, 1 unless `read_frame` was given a `color_min_size` (a JPEG decoded with
        DCT scaling: pipeline.preprocess.decode_color_scaled).
    """

    frame_id: int
    pose: np.ndarray
    color: np.ndarray | None
    depth_mm: np.ndarray | None
    reason: str = ""
    color_reduction: int = 1

    @property
    def valid(self) -> bool:
        return not self.reason


@dataclass(frozen=True)
class Points:
    """A scene's point cloud (the mesh vertices) with its ground truth.

    xyz: (N, 3) float32, metres, world frame.
    rgb: (N, 3) uint8.
    semantic: (N,) int16, ScanNet-20 benchmark class 0..19, IGNORE_INDEX elsewhere.
    instance: (N,) int32, 0..K-1 per annotated object, NO_INSTANCE elsewhere.
    segment: (N,) int32, over-segmentation id (superpoints), -1 if unknown.
    """

    xyz: np.ndarray
    rgb: np.ndarray
    semantic: np.ndarray
    instance: np.ndarray
    segment: np.ndarray


class Scene(abc.ABC):
    """A readable RGB-D scan. Cheap to construct: files are read on demand."""

    scene_id: str
    root: Path

    @classmethod
    def open(cls, root: Path) -> Scene:
        """The scene in folder `root` (a reader may open another class, e.g. the raw .sens)."""
        return cls(root)

    @classmethod
    def why_not_scene(cls, path: Path) -> str:
        """Why folder `path` is no scene of this dataset; "" when it is one. Stage 1 asks this of
        --root and of every folder under it. By default a scene is a folder this reader opens
        with at least one frame, and the reason is the reader's SceneError; a reader whose
        layout tells at a glance (ScanNet: color/, the mesh or the .sens) overrides it."""
        try:
            frames = len(cls.open(Path(path)).frame_ids)
        except (SceneError, OSError, ValueError) as error:
            return str(error)
        return "" if frames else "no frames"

    @property
    @abc.abstractmethod
    def frame_ids(self) -> np.ndarray:
        """(F,) int64 frame numbers, sorted numerically (2 before 10)."""

    @property
    @abc.abstractmethod
    def intrinsic_color(self) -> np.ndarray:
        """(3, 3) float64 pinhole intrinsics of the colour camera, pixels."""

    @property
    @abc.abstractmethod
    def intrinsic_depth(self) -> np.ndarray:
        """(3, 3) float64 pinhole intrinsics of the depth camera, pixels."""

    @property
    @abc.abstractmethod
    def color_size(self) -> tuple[int, int]:
        """(height, width) of the colour frames, pixels."""

    @property
    @abc.abstractmethod
    def depth_size(self) -> tuple[int, int]:
        """(height, width) of the depth maps, pixels."""

    @property
    def ignored_files(self) -> dict[str, str]:
        """{path relative to the scene: why} of files the reader passed over (e.g. a colour
        file whose name is no frame number); reported with the scene."""
        return {}

    @abc.abstractmethod
    def read_frame(self, frame_id: int, *, color: bool = True, depth: bool = True,
                   color_min_size: tuple[int, int] | None = None) -> Frame:
        """Read one frame; a problem becomes `Frame.reason`, never an exception.
        color_min_size: (H, W): decode a JPEG colour frame at the smallest DCT scale at least
        this size (`Frame.color_reduction`); None: whole."""

    @abc.abstractmethod
    def read_points(self) -> Points:
        """Read the point cloud and its labels; raises SceneError naming the file."""

    @property
    def axis_alignment(self) -> np.ndarray | None:
        """(4, 4) float64 map from the world frame to the scan's axis-aligned frame (ScanNet's
        `axisAlignment`: aligned = M @ [x, y, z, 1]), or None when the scan has none."""
        return None


class SceneReader(Protocol):
    """What stage 1 needs of a dataset's reader: `open(root)` -> the `Scene` in that folder,
    raising SceneError (one line naming the scene and file) when it cannot be read at all, and
    `why_not_scene(folder)` -> "" for a scene folder, else why not (how --root is searched).
    A `Scene` subclass is one (`Scene.open`, `Scene.why_not_scene`)."""

    def open(self, root: Path) -> Scene: ...

    def why_not_scene(self, path: Path) -> str: ...
