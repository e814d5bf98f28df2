"""Reader of raw ScanNet scans: frames straight from `<scene>.sens`, no export step.

A scan folder as ScanNet distributes it (`scans/<scene>/`)::

    <scene>.sens                                   colour JPEGs, zlib depth, poses, intrinsics
    <scene>_vh_clean_2.ply, <scene>_vh_clean_2.labels.ply,
    <scene>_vh_clean_2.0.010000.segs.json, <scene>.aggregation.json    as in the export
    <scene>.txt                                    meta data, among it axisAlignment

Opening a scene reads the .sens header and seeks over the frames' heads (pipeline.readers.sens_format);
`read_frame` reads that frame's bytes alone, decodes its colour from the JPEG bytes ScanNet
recorded (the export writes re-encoded JPEGs) through the same decode as the export reader, and
its depth from the zlib stream. Memory holds one frame's bytes per decoding thread, whatever
the size of the file. Frames are numbered 0..n-1 in file order, as the export names them.

Colour and depth extrinsics (identity in ScanNet) are not applied: the frame's pose is the
camera-to-world of both cameras, as in the export.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from pipeline.projection import pose_problem
from pipeline.readers.annotations import ScanNetAnnotations
from pipeline.readers.base import Frame, Scene, SceneError
from pipeline.readers.sens_format import (decode_color_payload, decode_depth, index_sens,
                                  read_payload)

log = logging.getLogger(__name__)

MILLIMETRES_PER_METRE = 1000.0
"""Frame.depth_mm is in millimetres; a .sens file's depth is in 1 / depth_shift metres."""


class SensScene(ScanNetAnnotations, Scene):
    """One raw ScanNet scan folder. Construction reads the `.sens` header and indexes the
    frames (about 100 bytes read per frame); frames are decoded on demand, thread-safe.

    Raises SceneError, one line naming the file, when `<scene>.sens` is missing, or is of
    another version or an unknown compression. A file cut short keeps its whole frames: the
    others are invalid frames whose reason says how many were lost (logged once too).
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.scene_id = self.root.name
        self.sens_path = self.root / f"{self.scene_id}.sens"
        if not self.sens_path.is_file():
            raise SceneError(f"scene {self.scene_id}: {self.sens_path} is missing; download it "
                             "from ScanNet into the scene folder (or read the export with "
                             "--dataset scannet)")
        self.header, self.index = index_sens(self.sens_path)
        if self.header.n_frames == 0:
            raise SceneError(f"scene {self.scene_id}: {self.sens_path} holds no frames")
        if self.index.damage:
            log.warning("%s: %s", self.scene_id, self.index.damage)

    @classmethod
    def open(cls, root: Path) -> SensScene:
        return cls(Path(root))

    @classmethod
    def why_not_scene(cls, path: Path) -> str:
        """A raw ScanNet scan is a folder holding `<scene>.sens`."""
        path = Path(path)
        return "" if (path / f"{path.name}.sens").is_file() else f"no {path.name}.sens"

    @property
    def frame_ids(self) -> np.ndarray:
        return np.arange(self.header.n_frames, dtype=np.int64)

    @property
    def intrinsic_color(self) -> np.ndarray:
        return self.header.intrinsic_color[:3, :3].copy()

    @property
    def intrinsic_depth(self) -> np.ndarray:
        return self.header.intrinsic_depth[:3, :3].copy()

    @property
    def color_size(self) -> tuple[int, int]:
        return self.header.color_size

    @property
    def depth_size(self) -> tuple[int, int]:
        return self.header.depth_size

    def scan_frames(self) -> dict[int, str]:
        """Frames known to be invalid from the index alone (a pose that is not finite, a frame
        the file does not hold whole): {frame_id: reason}; the rest may still fail to decode,
        which only `read_frame` finds out."""
        problems = {}
        for frame_id in range(self.header.n_frames):
            if frame_id >= self.index.readable:
                problems[frame_id] = self._lost(frame_id)
            elif problem := pose_problem(self.index.pose[frame_id]):
                problems[frame_id] = f"pose is {problem} ({self._where(frame_id)})"
        return problems

    def read_frame(self, frame_id: int, *, color: bool = True, depth: bool = True,
                   color_min_size: tuple[int, int] | None = None) -> Frame:
        """Read one frame; the first problem found (pose, then depth, then colour) becomes
        `Frame.reason` and the images after it are not decoded (None). Reads only the bytes of
        the images asked for."""
        frame_id = int(frame_id)
        nan_pose = np.full((4, 4), np.nan)
        if not 0 <= frame_id < self.header.n_frames:
            return Frame(frame_id, nan_pose, None, None,
                         f"frame {frame_id} is not in {self.sens_path}")
        if frame_id >= self.index.readable:
            return Frame(frame_id, nan_pose, None, None, self._lost(frame_id))
        pose = self.index.pose[frame_id].astype(np.float64)
        where = self._where(frame_id)
        if problem := pose_problem(pose):
            return Frame(frame_id, pose, None, None, f"pose is {problem} ({where})")
        offset = int(self.index.color_offset[frame_id])
        color_bytes, depth_bytes = (int(self.index.color_bytes[frame_id]),
                                    int(self.index.depth_bytes[frame_id]))
        # The colour bytes and then the depth bytes: one read covers the images asked for.
        first = offset if color else offset + color_bytes
        last = offset + color_bytes + (depth_bytes if depth else 0)
        try:
            payload = read_payload(self.sens_path, first, last - first)
        except OSError as error:
            return Frame(frame_id, pose, None, None, f"frame bytes cannot be read: {error} ({where})")
        depth_mm = color_rgb = None
        reduction = 1
        if depth:
            depth_units, reason = decode_depth(payload[len(payload) - depth_bytes:],
                                               self.header.depth_compression, self.depth_size)
            if reason:
                return Frame(frame_id, pose, None, None, f"{reason} ({where})")
            depth_mm = to_millimetres(depth_units, self.header.depth_shift)
        if color:
            color_rgb, reduction, reason = decode_color_payload(
                payload[:color_bytes], self.header.color_compression, self.color_size,
                color_min_size)
            if reason:
                return Frame(frame_id, pose, None, depth_mm, f"{reason} ({where})")
        return Frame(frame_id, pose, color_rgb, depth_mm, color_reduction=reduction)

    def _where(self, frame_id: int) -> str:
        return f"{self.sens_path.name} frame {frame_id}"

    def _lost(self, frame_id: int) -> str:
        return f"frame {frame_id} is not readable: {self.index.damage}"


def to_millimetres(depth: np.ndarray, depth_shift: float) -> np.ndarray:
    """(h, w) uint16 depth in 1 / depth_shift metres -> (h, w) uint16 millimetres, 0 = no
    reading. Unchanged when depth_shift is 1000 (ScanNet); otherwise rounded to the millimetre,
    and readings beyond 65535 mm become 0."""
    if depth_shift == MILLIMETRES_PER_METRE:
        return depth
    millimetres = np.rint(depth * (MILLIMETRES_PER_METRE / depth_shift))
    return np.where(millimetres <= np.iinfo(np.uint16).max, millimetres, 0).astype(np.uint16)
