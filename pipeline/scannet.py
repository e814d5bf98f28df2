"""Reader of ScanNet's SensReader export (the layout in `pipeline.scenes`).

Frames are listed from the union of color/, depth/ and pose/, so a frame that lacks one
of its files is reported as invalid with its reason instead of silently vanishing.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import logging
from pathlib import Path

import numpy as np
from PIL import Image
from plyfile import PlyData

from pipeline.labels import nyu40_to_scannet20
from pipeline.scenes import IGNORE_INDEX, NO_INSTANCE, Frame, Points, Scene, SceneError

log = logging.getLogger(__name__)

FRAME_FOLDERS = {"color": ".jpg", "depth": ".png", "pose": ".txt"}
"""Per-frame folders and the suffix of their files, named `<frame_id><suffix>`."""

_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
"""What PIL raises on a missing, truncated, empty or corrupt image."""


class ScanNetScene(Scene):
    """One scene folder of the SensReader export. Construction lists files; nothing is decoded.

    Raises SceneError when the folder holds no frame file at all.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.scene_id = self.root.name
        self._files = {folder: _numbered_files(self.root / folder, suffix)
                       for folder, suffix in FRAME_FOLDERS.items()}
        self._known = set().union(*self._files.values())
        if not self._known:
            raise SceneError(
                f"scene {self.scene_id} has no frames: no numbered color/*.jpg, depth/*.png or "
                f"pose/*.txt under {self.root}; export the .sens file with SensReader first"
            )
        self._frame_ids = np.array(sorted(self._known), dtype=np.int64)

    @classmethod
    def open(cls, root: Path) -> ScanNetScene:
        return cls(Path(root))

    @property
    def frame_ids(self) -> np.ndarray:
        return self._frame_ids

    @functools.cached_property
    def intrinsic_color(self) -> np.ndarray:
        return self._intrinsic("intrinsic_color.txt")

    @functools.cached_property
    def intrinsic_depth(self) -> np.ndarray:
        return self._intrinsic("intrinsic_depth.txt")

    @functools.cached_property
    def color_size(self) -> tuple[int, int]:
        return self._image_size("color")

    @functools.cached_property
    def depth_size(self) -> tuple[int, int]:
        return self._image_size("depth")

    @property
    def mesh_path(self) -> Path:
        return self.root / f"{self.scene_id}_vh_clean_2.ply"

    @property
    def labels_path(self) -> Path:
        return self.root / f"{self.scene_id}_vh_clean_2.labels.ply"

    @property
    def segs_path(self) -> Path:
        return self.root / f"{self.scene_id}_vh_clean_2.0.010000.segs.json"

    @property
    def aggregation_path(self) -> Path:
        return self.root / f"{self.scene_id}.aggregation.json"

    def scan_frames(self) -> dict[int, str]:
        """Frames known to be invalid without decoding an image: a missing or empty file, or a
        pose that is malformed or not finite. {frame_id: reason}; the rest may still fail to
        decode, which only `read_frame` finds out."""
        problems = {}
        for frame_id in self._frame_ids.tolist():
            reason = self._missing_file(frame_id)
            if not reason:
                reason = _read_pose(self.root, self._files["pose"][frame_id])[1]
            if reason:
                problems[frame_id] = reason
        return problems

    def read_frame(self, frame_id: int, *, color: bool = True, depth: bool = True) -> Frame:
        """Read one frame; the first problem found (pose, then depth, then colour) becomes
        `Frame.reason` and the images after it are not decoded (None)."""
        frame_id = int(frame_id)
        nan_pose = np.full((4, 4), np.nan)
        if frame_id not in self._known:
            return Frame(frame_id, nan_pose, None, None, f"frame {frame_id} is not in {self.root}")
        reason = self._missing_file(frame_id, color=color, depth=depth)
        if reason:
            return Frame(frame_id, nan_pose, None, None, reason)
        pose, reason = _read_pose(self.root, self._files["pose"][frame_id])
        if reason:
            return Frame(frame_id, pose, None, None, reason)
        depth_mm = color_rgb = None
        try:
            if depth:
                depth_mm, reason = _read_depth(self.root, self._files["depth"][frame_id],
                                               self.depth_size)
                if reason:
                    return Frame(frame_id, pose, None, None, reason)
            if color:
                color_rgb, reason = _read_color(self.root, self._files["color"][frame_id],
                                                self.color_size)
                if reason:
                    return Frame(frame_id, pose, None, depth_mm, reason)
        except SceneError as error:  # no image of the scene has a readable header
            return Frame(frame_id, pose, None, None, str(error))
        return Frame(frame_id, pose, color_rgb, depth_mm)

    def read_points(self) -> Points:
        """The mesh vertices with their labels.

        Raises SceneError when the mesh is missing or unreadable, or when the labels mesh or
        the over-segmentation has another vertex count. Missing label, segment or aggregation
        files only warn: their points get IGNORE_INDEX, segment -1, NO_INSTANCE.
        """
        vertex = _ply_vertices(self.mesh_path, ("x", "y", "z", "red", "green", "blue"))
        n_points = len(vertex)
        xyz = np.stack([vertex[axis] for axis in "xyz"], axis=1).astype(np.float32)
        rgb = np.stack([vertex[c] for c in ("red", "green", "blue")], axis=1).astype(np.uint8)
        return Points(xyz, rgb, self._semantic(n_points), *self._instances(n_points))

    def _semantic(self, n_points: int) -> np.ndarray:
        if not self.labels_path.is_file():
            log.warning("%s: no %s, every point is unlabelled", self.scene_id,
                        self.labels_path.name)
            return np.full(n_points, IGNORE_INDEX, dtype=np.int16)
        labels = _ply_vertices(self.labels_path, ("label",))["label"]
        self._check_count(self.labels_path, len(labels), n_points)
        return nyu40_to_scannet20(labels)

    def _instances(self, n_points: int) -> tuple[np.ndarray, np.ndarray]:
        """(instance, segment), both (N,) int32."""
        instance = np.full(n_points, NO_INSTANCE, dtype=np.int32)
        if not self.segs_path.is_file():
            log.warning("%s: no %s, points have no segments or instances", self.scene_id,
                        self.segs_path.name)
            return instance, np.full(n_points, -1, dtype=np.int32)
        segment = np.asarray(_read_json(self.segs_path, "segIndices"), dtype=np.int64)
        self._check_count(self.segs_path, len(segment), n_points)
        if not self.aggregation_path.is_file():
            log.warning("%s: no %s, points have no instances", self.scene_id,
                        self.aggregation_path.name)
            return instance, segment.astype(np.int32)
        try:
            groups = [np.asarray(group["segments"], dtype=np.int64)
                      for group in _read_json(self.aggregation_path, "segGroups")]
        except (KeyError, TypeError, ValueError):
            raise SceneError(f"scene {self.scene_id}: a segGroup of {self.aggregation_path} has no "
                             "list of segments") from None
        # Segment ids are ScanNet vertex numbers, so a lookup table of max+1 entries is small.
        instance_of_segment = np.full(segment.max(initial=0) + 1, NO_INSTANCE, dtype=np.int32)
        for instance_id, members in enumerate(groups):
            members = members[(members >= 0) & (members < len(instance_of_segment))]
            instance_of_segment[members] = instance_id
        known = segment >= 0
        instance[known] = instance_of_segment[segment[known]]
        return instance, segment.astype(np.int32)

    def _check_count(self, path: Path, count: int, n_points: int) -> None:
        if count != n_points:
            raise SceneError(
                f"scene {self.scene_id}: {path.name} has {count} vertices but "
                f"{self.mesh_path.name} has {n_points}; both must come from the same mesh"
            )

    def _intrinsic(self, name: str) -> np.ndarray:
        path = self.root / "intrinsic" / name
        try:
            matrix = np.loadtxt(path, dtype=np.float64, ndmin=2)
        except (OSError, ValueError) as error:
            raise SceneError(f"scene {self.scene_id}: cannot read {path} ({error}); "
                             "it must be a 4x4 (or 3x3) text matrix") from None
        if matrix.shape not in ((3, 3), (4, 4)) or not np.isfinite(matrix).all():
            raise SceneError(f"scene {self.scene_id}: {path} is not a finite 4x4 or 3x3 matrix")
        return matrix[:3, :3]

    def _image_size(self, folder: str) -> tuple[int, int]:
        """(height, width) from the first image whose header PIL can read."""
        for frame_id in sorted(self._files[folder]):
            try:
                with Image.open(self.root / self._files[folder][frame_id]) as image:
                    return image.height, image.width
            except _DECODE_ERRORS:
                continue
        raise SceneError(f"scene {self.scene_id}: no image in {folder}/ has a readable header")

    def _missing_file(self, frame_id: int, *, color: bool = True, depth: bool = True) -> str:
        wanted = ["pose"] + (["depth"] if depth else []) + (["color"] if color else [])
        for folder in wanted:
            if frame_id not in self._files[folder]:
                return f"{folder} file is missing ({folder}/{frame_id}{FRAME_FOLDERS[folder]})"
            if (self.root / self._files[folder][frame_id]).stat().st_size == 0:
                return f"{folder} file is empty ({self._files[folder][frame_id]})"
        return ""


def list_scenes(root: Path, pattern: str | list[str] | None = None) -> list[Path]:
    """Scene folders under `root`, sorted by name.

    A scene folder holds color/ or a `<name>_vh_clean_2.ply`; `root` itself counts when it is one.
    pattern: None for all; a glob on folder names ("scene00*"); or a list of names or globs,
    each of which must match a scene (SceneError otherwise). A missing root gives [].
    """
    root = Path(root)
    if _is_scene(root):
        candidates = [root]
    elif root.is_dir():
        candidates = sorted(path for path in root.iterdir() if _is_scene(path))
    else:
        return []
    if pattern is None:
        return candidates
    if isinstance(pattern, str):
        return [path for path in candidates if fnmatch.fnmatchcase(path.name, pattern)]
    unmatched = [p for p in pattern if not any(fnmatch.fnmatchcase(c.name, p) for c in candidates)]
    if unmatched:
        raise SceneError(f"no scene folder under {root} matches {', '.join(unmatched)}; "
                         "check the scene names")
    return [path for path in candidates if any(fnmatch.fnmatchcase(path.name, p) for p in pattern)]


def require_valid(scene: Scene, valid: np.ndarray) -> None:
    """Raise SceneError naming the scene when none of its frames is valid.

    valid: (F,) bool, one flag per frame read (e.g. `Frame.valid` of every frame).
    """
    if not np.asarray(valid, dtype=bool).any():
        raise SceneError(f"scene {scene.scene_id} has no valid frame among {len(valid)}: "
                         f"check the poses and images under {scene.root}")


def _is_scene(path: Path) -> bool:
    return path.is_dir() and ((path / "color").is_dir()
                              or (path / f"{path.name}_vh_clean_2.ply").is_file())


def _numbered_files(folder: Path, suffix: str) -> dict[int, str]:
    """{frame_id: path relative to the scene root} for the `<int><suffix>` files of `folder`."""
    if not folder.is_dir():
        return {}
    files = {}
    for path in folder.iterdir():
        if path.suffix == suffix and path.stem.isdigit():
            files[int(path.stem)] = f"{folder.name}/{path.name}"
    return files


def _read_pose(root: Path, relative: str) -> tuple[np.ndarray, str]:
    """((4, 4) float64 camera-to-world, reason); NaN-filled when the file does not parse."""
    try:
        pose = np.loadtxt(root / relative, dtype=np.float64, ndmin=2)
    except (OSError, ValueError):
        return np.full((4, 4), np.nan), f"pose is malformed ({relative})"
    if pose.shape != (4, 4):
        return np.full((4, 4), np.nan), f"pose is malformed, {pose.shape} not 4x4 ({relative})"
    if not np.isfinite(pose).all():
        return pose, f"pose is not finite ({relative})"
    return pose, ""


def _read_depth(root: Path, relative: str, size: tuple[int, int]) -> tuple[np.ndarray | None, str]:
    """((h, w) uint16 millimetres, reason)."""
    try:
        with Image.open(root / relative) as image:
            if image.mode not in ("I;16", "I"):
                return None, f"depth is not 16-bit (mode {image.mode}) ({relative})"
            depth = np.asarray(image)
    except _DECODE_ERRORS:
        return None, f"depth does not decode ({relative})"
    if depth.shape != size:
        return None, f"depth is {_size(depth.shape)}, expected {_size(size)} ({relative})"
    if depth.dtype != np.uint16 and (depth.min() < 0 or depth.max() > np.iinfo(np.uint16).max):
        return None, f"depth is out of the 16-bit range ({relative})"
    return depth.astype(np.uint16), ""


def _read_color(root: Path, relative: str, size: tuple[int, int]) -> tuple[np.ndarray | None, str]:
    """((H, W, 3) uint8 RGB, reason); the full decode finds truncated JPEGs."""
    try:
        with Image.open(root / relative) as image:
            color = np.asarray(image.convert("RGB"))
    except _DECODE_ERRORS:
        return None, f"colour image does not decode ({relative})"
    if color.shape[:2] != size:
        return None, f"colour image is {_size(color.shape)}, expected {_size(size)} ({relative})"
    return color, ""


def _size(shape: tuple[int, ...]) -> str:
    return f"{shape[0]}x{shape[1]}"


def _ply_vertices(path: Path, fields: tuple[str, ...]) -> np.ndarray:
    """The vertex element of a PLY file as a structured array holding at least `fields`."""
    if not path.is_file():
        raise SceneError(f"scene {path.parent.name}: {path} is missing; copy it from the ScanNet "
                         "release into the scene folder")
    try:
        vertex = PlyData.read(path, known_list_len={"face": {"vertex_indices": 3}})["vertex"].data
    except Exception as error:  # plyfile raises many types on corrupt files
        raise SceneError(f"scene {path.parent.name}: cannot read {path} ({error})") from None
    missing = [field for field in fields if field not in (vertex.dtype.names or ())]
    if missing:
        raise SceneError(f"scene {path.parent.name}: {path} has no vertex {', '.join(missing)}")
    return vertex


def _read_json(path: Path, key: str) -> list:
    try:
        return json.loads(path.read_text())[key]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise SceneError(
            f"scene {path.parent.name}: cannot read {key} from {path} ({error!r})") from None
