"""Reader of ScanNet's SensReader export (the layout in `pipeline.readers.base`), and the files
beside the frames that it shares with the raw `.sens` reader (pipeline.readers.scannet_sens): the
mesh, its labels, segments and instances, and the axis alignment of `<scene>.txt`.

Frames are listed from the union of color/, depth/ and pose/, so a frame that lacks one
of its files is reported as invalid with its reason instead of silently vanishing. One bad
file never fails the scene: a file that cannot be read (a symlink loop, no permission) makes
its frame invalid; a file whose name is no frame number (`color/².jpg`, a number beyond 64
bits, `007.jpg` beside `7.jpg`) is ignored and listed in `ignored_files` with the reason.
"""

from __future__ import annotations

import functools
import logging
import re
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.preprocess import DECODE_ERRORS, decode_color_scaled
from pipeline.projection import pose_problem
from pipeline.readers.annotations import ScanNetAnnotations
from pipeline.readers.scannet_sens import SensScene
from pipeline.readers.base import Frame, Scene, SceneError

log = logging.getLogger(__name__)

FRAME_FOLDERS = {"color": ".jpg", "depth": ".png", "pose": ".txt"}
"""Per-frame folders and the suffix of their files, named `<frame_id><suffix>`."""

_FRAME_NUMBER = re.compile(r"[0-9]+")
"""A frame file's stem: ASCII digits only (str.isdigit also accepts '²' and other scripts)."""

MAX_FRAME_ID = np.iinfo(np.int64).max


class ScanNetScene(ScanNetAnnotations, Scene):
    """One scene folder of the SensReader export. Construction lists files; nothing is decoded.

    Raises SceneError when the folder holds no frame file at all.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.scene_id = self.root.name
        self._files, self._ignored = {}, {}
        for folder, suffix in FRAME_FOLDERS.items():
            self._files[folder], ignored = _numbered_files(self.root / folder, suffix)
            self._ignored.update(ignored)
        for name, why in sorted(self._ignored.items()):
            log.warning("%s: ignoring %s: %s", self.scene_id, name, why)
        self._known = set().union(*self._files.values())
        if not self._known:
            raise SceneError(
                f"scene {self.scene_id} has no frames: no numbered color/*.jpg, depth/*.png or "
                f"pose/*.txt under {self.root}; export the .sens file with SensReader first"
            )
        self._frame_ids = np.array(sorted(self._known), dtype=np.int64)

    @classmethod
    def open(cls, root: Path) -> Scene:
        """The scene at `root`. A raw ScanNet folder, with `<scene>.sens` and no exported
        color/, opens as pipeline.readers.scannet_sens.SensScene: the frames come from the .sens."""
        root = Path(root)
        if cls is ScanNetScene and not (root / "color").is_dir() \
                and (root / f"{root.name}.sens").is_file():
            log.info("%s: no color/ export, reading the frames from %s.sens", root.name, root.name)
            return SensScene(root)
        return cls(root)

    @classmethod
    def why_not_scene(cls, path: Path) -> str:
        """A ScanNet scene folder holds color/ (SensReader's export), its mesh
        `<scene>_vh_clean_2.ply` or the raw `<scene>.sens`."""
        path = Path(path)
        if ((path / "color").is_dir() or (path / f"{path.name}_vh_clean_2.ply").is_file()
                or (path / f"{path.name}.sens").is_file()):
            return ""
        return f"no color/ folder, no {path.name}_vh_clean_2.ply and no {path.name}.sens"

    @property
    def frame_ids(self) -> np.ndarray:
        return self._frame_ids

    @property
    def ignored_files(self) -> dict[str, str]:
        return dict(self._ignored)

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

    def read_frame(self, frame_id: int, *, color: bool = True, depth: bool = True,
                   color_min_size: tuple[int, int] | None = None) -> Frame:
        """Read one frame; the first problem found (pose, then depth, then colour) becomes
        `Frame.reason` and the images after it are not decoded (None). color_min_size: see
        `Scene.read_frame`."""
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
        reduction = 1
        try:
            if depth:
                depth_mm, reason = _read_depth(self.root, self._files["depth"][frame_id],
                                               self.depth_size)
                if reason:
                    return Frame(frame_id, pose, None, None, reason)
            if color:
                color_rgb, reduction, reason = _read_color(
                    self.root, self._files["color"][frame_id], self.color_size, color_min_size)
                if reason:
                    return Frame(frame_id, pose, None, depth_mm, reason)
        except SceneError as error:  # no image of the scene has a readable header
            return Frame(frame_id, pose, None, None, str(error))
        return Frame(frame_id, pose, color_rgb, depth_mm, color_reduction=reduction)

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
            except DECODE_ERRORS:
                continue
        raise SceneError(f"scene {self.scene_id}: no image in {folder}/ has a readable header")

    def _missing_file(self, frame_id: int, *, color: bool = True, depth: bool = True) -> str:
        wanted = ["pose"] + (["depth"] if depth else []) + (["color"] if color else [])
        for folder in wanted:
            if frame_id not in self._files[folder]:
                return f"{folder} file is missing ({folder}/{frame_id}{FRAME_FOLDERS[folder]})"
            relative = self._files[folder][frame_id]
            try:
                size = (self.root / relative).stat().st_size
            except OSError as error:  # a symlink loop or to nowhere, no permission, I/O
                return f"{folder} file cannot be read ({relative}: {error.strerror or error})"
            if size == 0:
                return f"{folder} file is empty ({relative})"
        return ""


def require_valid(scene: Scene, valid: np.ndarray) -> None:
    """Raise SceneError naming the scene when none of its frames is valid.

    valid: (F,) bool, one flag per frame read (e.g. `Frame.valid` of every frame).
    """
    if not np.asarray(valid, dtype=bool).any():
        raise SceneError(f"scene {scene.scene_id} has no valid frame among {len(valid)}: "
                         f"check the poses and images under {scene.root}")


def _numbered_files(folder: Path, suffix: str) -> tuple[dict[int, str], dict[str, str]]:
    """({frame_id: path relative to the scene root} for the `<int><suffix>` files of `folder`,
    {relative path: why it is ignored} for the `*<suffix>` files whose name is no frame number).
    Files of other suffixes are not the reader's business and are passed over silently."""
    if not folder.is_dir():
        return {}, {}
    files: dict[int, str] = {}
    ignored: dict[str, str] = {}
    for path in sorted(folder.iterdir(), key=lambda p: (len(p.name), p.name)):
        if path.suffix != suffix:
            continue
        relative = f"{folder.name}/{path.name}"
        if not _FRAME_NUMBER.fullmatch(path.stem):
            ignored[relative] = f"{path.stem!r} is not a frame number (digits 0-9 only)"
        elif int(path.stem) > MAX_FRAME_ID:
            ignored[relative] = "its frame number does not fit in 64 bits"
        elif int(path.stem) in files:  # 7.jpg sorts before 007.jpg and wins
            ignored[relative] = f"frame {int(path.stem)} is already {files[int(path.stem)]}"
        else:
            files[int(path.stem)] = relative
    return files, ignored


def _read_pose(root: Path, relative: str) -> tuple[np.ndarray, str]:
    """((4, 4) float64 camera-to-world, reason); NaN-filled when the file does not parse."""
    try:
        pose = np.loadtxt(root / relative, dtype=np.float64, ndmin=2)
    except (OSError, ValueError):
        return np.full((4, 4), np.nan), f"pose is malformed ({relative})"
    if pose.shape != (4, 4):
        return np.full((4, 4), np.nan), f"pose is malformed, {pose.shape} not 4x4 ({relative})"
    problem = pose_problem(pose)
    if problem:
        return pose, f"pose is {problem} ({relative})"
    return pose, ""


def _read_depth(root: Path, relative: str, size: tuple[int, int]) -> tuple[np.ndarray | None, str]:
    """((h, w) uint16 millimetres, reason)."""
    try:
        with Image.open(root / relative) as image:
            if image.mode not in ("I;16", "I"):
                return None, f"depth is not 16-bit (mode {image.mode}) ({relative})"
            depth = np.asarray(image)
    except DECODE_ERRORS:
        return None, f"depth does not decode ({relative})"
    if depth.shape != size:
        return None, f"depth is {_size(depth.shape)}, expected {_size(size)} ({relative})"
    if depth.dtype != np.uint16 and (depth.min() < 0 or depth.max() > np.iinfo(np.uint16).max):
        return None, f"depth is out of the 16-bit range ({relative})"
    return depth.astype(np.uint16), ""


def _read_color(root: Path, relative: str, size: tuple[int, int],
                min_size: tuple[int, int] | None = None) -> tuple[np.ndarray | None, int, str]:
    """((H, W, 3) uint8 RGB at 1/r of its size, r, reason), r > 1 only with `min_size`
    (decode_color_scaled); every coefficient is decoded, which finds truncated JPEGs."""
    try:
        color, encoded, reduction = decode_color_scaled(root / relative, min_size)
    except DECODE_ERRORS:
        return None, 1, f"colour image does not decode ({relative})"
    if encoded != size:
        return None, 1, f"colour image is {_size(encoded)}, expected {_size(size)} ({relative})"
    return color, reduction, ""


def _size(shape: tuple[int, ...]) -> str:
    return f"{shape[0]}x{shape[1]}"
