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

Readers never raise for one bad frame: `read_frame` returns a `Frame` whose `reason`
says what is wrong. A scene with no valid frame, or without its point cloud, raises
`SceneError` naming the scene and the file.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from storage.errors import UserError

IGNORE_INDEX = -100
"""Semantic label of points outside ScanNet's 20 benchmark classes (torch's CE default)."""

NO_INSTANCE = -1
"""Instance id of points that belong to no annotated object."""


class SceneError(UserError):
    """A scene cannot be read at all (no frames, no point cloud, inconsistent files)."""


@dataclass(frozen=True)
class Frame:
    """One RGB-D frame as read from disk. Never raises; `reason` is empty when valid.

    frame_id: the number in the file name (`color/<frame_id>.jpg`).
    pose: (4, 4) float64, camera-to-world, metres; NaN-filled when unreadable.
    color: (H, W, 3) uint8 RGB, or None when it could not be decoded (or was not asked for).
    depth_mm: (h, w) uint16 millimetres, 0 = no reading, or None.
    reason: why the frame is unusable, e.g. "pose is not finite (pose/12.txt)".
    """

    frame_id: int
    pose: np.ndarray
    color: np.ndarray | None
    depth_mm: np.ndarray | None
    reason: str = ""

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

    @abc.abstractmethod
    def read_frame(self, frame_id: int, *, color: bool = True, depth: bool = True) -> Frame:
        """Read one frame; a problem becomes `Frame.reason`, never an exception."""

    @abc.abstractmethod
    def read_points(self) -> Points:
        """Read the point cloud and its labels; raises SceneError naming the file."""
