"""The files of a ScanNet scan beside its frames, shared by the export reader
(pipeline.readers.scannet) and the raw `.sens` reader (pipeline.readers.scannet_sens): the mesh
(the point cloud), its NYU40 labels, segments and instances, and the axis alignment of
`<scene>.txt`."""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

import numpy as np
from plyfile import PlyData

from storage.labels import nyu40_to_scannet20
from pipeline.readers.base import IGNORE_INDEX, NO_INSTANCE, Points, SceneError

log = logging.getLogger(__name__)

META_MAX_CHARS = 1 << 20
"""Characters of `<scene>.txt` read at most (ScanNet's are about 1 KB)."""


class ScanNetAnnotations:
    """The files of a ScanNet scan beside its frames, for readers with `root` and `scene_id`:
    the mesh (the point cloud), its NYU40 labels, segments and instances, and `<scene>.txt`."""

    root: Path
    scene_id: str

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

    @property
    def meta_path(self) -> Path:
        return self.root / f"{self.scene_id}.txt"

    @functools.cached_property
    def axis_alignment(self) -> np.ndarray | None:
        """(4, 4) float64 `axisAlignment` of `<scene>.txt`, or None when the scan has none
        (ScanNet's test scans); see `read_axis_alignment`."""
        return read_axis_alignment(self.meta_path)

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



def read_axis_alignment(path: Path) -> np.ndarray | None:
    """The `axisAlignment` of a ScanNet meta file (`<scene>.txt`, lines `key = value`).

    Returns (4, 4) float64, the 16 numbers row by row: it maps world points (metres) to
    ScanNet's axis-aligned frame, `aligned = M @ [x, y, z, 1]` (walls along x and y), as
    ScanNet's and most codebases' scripts apply it. None when the file or the line is absent
    (ScanNet's test scans have none). Raises SceneError naming the file when the line does not
    hold 16 finite numbers.
    """
    if not path.is_file():
        return None
    try:
        with open(path, encoding="utf-8", errors="replace") as meta:
            lines = meta.read(META_MAX_CHARS).splitlines()
    except OSError as error:
        raise SceneError(f"scene {path.parent.name}: cannot read {path} ({error})") from None
    line = next((line for line in lines if line.split("=", 1)[0].strip() == "axisAlignment"), None)
    if line is None:
        return None
    try:
        values = np.array([float(v) for v in line.split("=", 1)[1].split()], dtype=np.float64)
    except ValueError:
        values = np.array([np.nan])
    if values.size != 16 or not np.isfinite(values).all():
        raise SceneError(f"scene {path.parent.name}: the axisAlignment of {path} is not 16 finite "
                         "numbers (a 4x4 matrix, row by row); fix or remove that line")
    return values.reshape(4, 4)


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
