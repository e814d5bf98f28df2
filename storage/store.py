"""The feature store: one Zarr v3 group holding many scenes and many feature sets.

Layout (format_version 1)::

    <store>.zarr/
      attrs: format_version
      featuresets/<featureset_id>/   attrs: the feature set's full description
      scenes/<scene_id>/             attrs: color_size, depth_size, depth_scale, complete
        frames/frame_id (F,) int64         file number of each frame (color/<frame_id>.jpg)
               pose     (F, 4, 4) float64  camera-to-world, metres; NaN until written
               valid    (F,) bool          frame usable (decoded, finite pose, depth present)
               reason   (F,) str           why a frame is invalid, "" when valid
               intrinsic_color, intrinsic_depth (3, 3) float64, pixels
               depth    (F, h, w) uint16   depth in units of depth_scale metres, 0 = no reading
        points/xyz (N, 3) float32 metres world, rgb (N, 3) uint8, semantic (N,) int16,
               instance (N,) int32, segment (N,) int32
        features/<featureset_id>/spatial (F, gh, gw, C) float16, global (F, D) float16,
               done (F,) bool

Every per-frame array has one frame per chunk and no sharding: concurrent writers of
disjoint frames (threads of one run, or two runs on one store) never touch the same chunk
file, and Zarr's local store replaces each chunk file atomically, so a killed run leaves
whole chunks. (Sharded arrays lose frames under interleaved writers: see DESIGN.md.)
A frame's features are written before its `done` flag, so `done` never claims a frame
whose data is missing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from storage.errors import StoreError, UserError
from storage.featureset import describe_featureset, featureset_id

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
EXTRACT_COMMAND = "python -m flows.extract_clip --root DATASET --store {store}"
_COMPRESSORS = (ZstdCodec(level=3, checksum=True),)  # the checksum turns a corrupt chunk into an error


@dataclass(frozen=True)
class SceneArrays:
    """A scene's geometry as numpy arrays (see the module docstring for layout).

    frame_id: (F,) int64. pose: (F, 4, 4) float64 camera-to-world, metres.
    valid: (F,) bool. reason: (F,) str, "" for valid frames.
    intrinsic_color, intrinsic_depth: (3, 3) float64, pixels.
    color_size, depth_size: (height, width) in pixels.
    depth: (F, h, w) uint16, metres = depth * depth_scale, 0 = no reading.
    xyz: (N, 3) float32 metres world; rgb: (N, 3) uint8; semantic: (N,) int16 ScanNet-20
    (-100 ignored); instance: (N,) int32 (-1 none); segment: (N,) int32 superpoints (-1 unknown).
    """

    scene_id: str
    frame_id: np.ndarray
    pose: np.ndarray
    valid: np.ndarray
    reason: np.ndarray
    intrinsic_color: np.ndarray
    intrinsic_depth: np.ndarray
    color_size: tuple[int, int]
    depth_size: tuple[int, int]
    depth: np.ndarray
    depth_scale: float
    xyz: np.ndarray
    rgb: np.ndarray
    semantic: np.ndarray
    instance: np.ndarray
    segment: np.ndarray


@dataclass(frozen=True)
class FeatureArrays:
    """One feature set's arrays for one scene.

    spatial: (F, gh, gw, C) float16 per-patch features (rows top to bottom of the model input).
    global_: (F, D) float16 image embeddings (`global` is a Python keyword; `arrays["global"]`
    works too). done: (F,) bool, the frame was processed. Frames not done or not valid hold
    zeros and must not be used.
    """

    spatial: np.ndarray
    global_: np.ndarray
    done: np.ndarray
    description: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> np.ndarray:
        return {"spatial": self.spatial, "global": self.global_, "done": self.done}[name]


def open_store(path_or_url: str | os.PathLike, mode: str = "r",
               storage_options: dict[str, Any] | None = None) -> FeatureStore:
    """Open a store by local path or fsspec URL (s3://bucket/x.zarr, gs://..., file://...).

    mode "r": read only; the store must exist and be of this format version.
    mode "a": read and write, created if missing; fails at once if a local location is not
    writable, before any model is loaded.
    storage_options: fsspec options of a URL (endpoint_url, region_name, ...). Credentials do
    not belong here (they would land in logs and Prefect's run history): s3fs reads them from
    the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE), as does botocore
    AWS_ENDPOINT_URL.
    """
    url = os.fspath(path_or_url)
    if mode not in ("r", "a"):
        raise ValueError(f"mode must be 'r' or 'a', not {mode!r}")
    check_storage_options(storage_options)
    is_local = "://" not in url or url.startswith("file://")
    local_path = Path(url.removeprefix("file://")) if is_local else None
    if mode == "r" and local_path is not None and not (local_path / "zarr.json").exists():
        raise StoreError(
            f"no feature store at {url}: run `{EXTRACT_COMMAND.format(store=url)}` to make one"
        )
    if mode == "a" and local_path is not None:
        _check_writable(local_path)
    options = {"storage_options": storage_options} if storage_options and not is_local else {}
    try:
        root = zarr.open_group(url, mode="r" if mode == "r" else "a", **options)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as error:
        raise StoreError(
            f"no feature store at {url} ({error}): check the URL, that the bucket exists and the "
            f"credentials in the environment, or run `{EXTRACT_COMMAND.format(store=url)}`"
        ) from None
    except PermissionError as error:
        raise StoreError(f"cannot open {url}: permission denied ({error}); check the credentials "
                         "in the environment (AWS_ACCESS_KEY_ID, AWS_PROFILE, ...)") from None
    version = root.attrs.get("format_version")
    if version is None and mode == "a" and not list(root.keys()):
        root.attrs["format_version"] = FORMAT_VERSION
    elif version != FORMAT_VERSION:
        raise StoreError(
            f"{url} is a store of format version {version}, this code reads version "
            f"{FORMAT_VERSION}: write a new store with `{EXTRACT_COMMAND.format(store='NEW.zarr')}`"
        )
    return FeatureStore(root, url, mode)


_SECRET_WORDS = ("key", "secret", "token", "password", "credential", "connection_string")


def check_storage_options(storage_options: dict[str, Any] | None) -> None:
    """Refuse credentials in storage options, at any depth (s3fs takes them in client_kwargs
    too): options are logged and kept in Prefect's run history and in checkpoints;
    credentials come from the environment."""
    secret = sorted(_secret_names(storage_options or {}))
    if secret:
        raise UserError(
            f"storage options {', '.join(secret)} look like credentials, which must not be passed "
            "as options (they would be logged): set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(or AWS_PROFILE) in the environment of every process that opens the store")


def _secret_names(options: Any, prefix: str = "") -> list[str]:
    """Dotted names of the entries of a nested options object that look like credentials."""
    found: list[str] = []
    items = (options.items() if isinstance(options, dict)
             else enumerate(options) if isinstance(options, list) else ())
    for name, value in items:
        dotted = f"{prefix}{name}"
        if isinstance(name, str) and any(word in name.lower() for word in _SECRET_WORDS):
            found.append(dotted)
        found += _secret_names(value, dotted + ".")
    return found


STORAGE_OPTIONS_HELP = (
    "JSON fsspec options of a store URL, e.g. '{\"endpoint_url\": \"http://minio:9000\"}'; "
    "credentials are refused here: set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)")
"""The help of every command's --storage-options (model.train's comes from TrainConfig)."""


def add_storage_options_argument(parser: argparse.ArgumentParser) -> None:
    """`--storage-options JSON`, read with `parse_storage_options`."""
    parser.add_argument("--storage-options", default=None, help=STORAGE_OPTIONS_HELP)


def parse_storage_options(text: str | None) -> dict[str, Any] | None:
    """A --storage-options value: a JSON object without credentials, or None when not given."""
    if not text:
        return None
    try:
        options = json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(f"--storage-options is not JSON ({error}): pass an object such as "
                        '\'{"endpoint_url": "http://minio:9000"}\'') from None
    if not isinstance(options, dict):
        raise UserError("--storage-options must be a JSON object, such as "
                        '\'{"endpoint_url": "http://minio:9000"}\'')
    check_storage_options(options)
    return options


def _check_writable(path: Path) -> None:
    """Fail fast with a clear message when the store cannot be written."""
    probe_dir = path if path.exists() else _first_existing_parent(path)
    probe = probe_dir / f".write-probe-{uuid.uuid4().hex}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise StoreError(
            f"cannot write the store {path}: {error.strerror or error} "
            f"({probe_dir} is not writable); pass --store on a writable disk"
        ) from None


def _first_existing_parent(path: Path) -> Path:
    for parent in path.absolute().parents:
        if parent.exists():
            return parent
    return Path("/")


class FeatureStore:
    """A handle on one store: read scenes and features, and (mode "a") write them.

    Thread-safe for writers of disjoint frames; see the module docstring.
    """

    def __init__(self, root: zarr.Group, url: str, mode: str):
        self.root = root
        self.url = url
        self.mode = mode

    def __repr__(self) -> str:
        return f"FeatureStore({self.url!r}, mode={self.mode!r})"

    # ---------------------------------------------------------------- reading

    def scenes(self) -> list[str]:
        """Ids of the scenes whose geometry is completely written, sorted."""
        if "scenes" not in self.root:
            return []
        group = self.root["scenes"]
        return sorted(name for name in group.group_keys() if group[name].attrs.get("complete"))

    def featuresets(self) -> dict[str, dict[str, Any]]:
        """Feature-set id -> its full description (model, pretrained, image_size, dims, ...)."""
        if "featuresets" not in self.root:
            return {}
        group = self.root["featuresets"]
        return {name: dict(group[name].attrs) for name in sorted(group.group_keys())}

    def valid(self, scene_id: str) -> np.ndarray:
        """(F,) bool: which frames of a scene are usable (the frame table alone, no points)."""
        return self._scene_group(scene_id)["frames"]["valid"][:]

    def scene(self, scene_id: str, *, with_depth: bool = True) -> SceneArrays:
        """A scene's frames and points as numpy arrays (depth omitted when with_depth=False)."""
        group = self._scene_group(scene_id)
        frames, points = group["frames"], group["points"]
        depth_size = tuple(group.attrs["depth_size"])
        depth = frames["depth"][:] if with_depth else np.zeros((0, *depth_size), np.uint16)
        return SceneArrays(
            scene_id=scene_id,
            frame_id=frames["frame_id"][:],
            pose=frames["pose"][:],
            valid=frames["valid"][:],
            reason=np.asarray(frames["reason"][:], dtype=object),
            intrinsic_color=frames["intrinsic_color"][:],
            intrinsic_depth=frames["intrinsic_depth"][:],
            color_size=tuple(group.attrs["color_size"]),
            depth_size=depth_size,
            depth=depth,
            depth_scale=float(group.attrs["depth_scale"]),
            xyz=points["xyz"][:],
            rgb=points["rgb"][:],
            semantic=points["semantic"][:],
            instance=points["instance"][:],
            segment=points["segment"][:],
        )

    def features(
        self,
        scene_id: str,
        featureset: str,
        *,
        require_done: bool = True,
        check_finite: bool = True,
    ) -> FeatureArrays:
        """One feature set's spatial and global arrays for a scene.

        Raises StoreError when the store lacks the feature set, when some frames are not
        done (unless require_done=False), and when a done, valid frame holds a non-finite
        value (a corrupted chunk), naming the scene and frame.
        """
        description = self._featureset_description(featureset)
        group = self._scene_group(scene_id)
        if "features" not in group or featureset not in group["features"]:
            raise StoreError(
                f"scene {scene_id} has no features of feature set {featureset} in {self.url}: "
                f"run `{EXTRACT_COMMAND.format(store=self.url)}` with that feature set's model"
            )
        arrays = group["features"][featureset]
        done = arrays["done"][:]
        if require_done and not done.all():
            missing = np.flatnonzero(~done)
            raise StoreError(
                f"scene {scene_id}: {missing.size} of {done.size} frames of feature set "
                f"{featureset} are not done (first: frame {self._frame_ids(group)[missing[0]]}); "
                f"rerun `{EXTRACT_COMMAND.format(store=self.url)}` to finish them"
            )
        spatial = arrays["spatial"][:]
        global_ = arrays["global"][:]
        if check_finite:
            usable = done & group["frames"]["valid"][:]
            bad = usable & ~(
                np.isfinite(spatial).all(axis=(1, 2, 3)) & np.isfinite(global_).all(axis=1)
            )
            if bad.any():
                frame = self._frame_ids(group)[np.flatnonzero(bad)[0]]
                raise StoreError(
                    f"scene {scene_id} frame {frame}: feature set {featureset} holds non-finite "
                    f"values ({int(bad.sum())} frames); delete {self.url}/scenes/{scene_id}/features/"
                    f"{featureset} and rerun `{EXTRACT_COMMAND.format(store=self.url)}`"
                )
        return FeatureArrays(spatial=spatial, global_=global_, done=done, description=description)

    def done(self, scene_id: str, featureset: str,
             positions: Sequence[int] | None = None) -> np.ndarray:
        """(F,) bool: which frames of a (complete) scene this feature set has processed; with
        `positions`, (len(positions),) for those frames only (one chunk read per frame)."""
        group = self._scene_group(scene_id)
        if "features" not in group or featureset not in group["features"]:
            count = group["frames"]["frame_id"].shape[0] if positions is None else len(positions)
            return np.zeros(count, bool)
        done = group["features"][featureset]["done"]
        if positions is None:
            return done[:]
        return done.get_orthogonal_selection(np.asarray(positions, np.int64))

    def _frame_ids(self, group: zarr.Group) -> np.ndarray:
        return group["frames"]["frame_id"][:]

    def _scene_group(self, scene_id: str, *, require_complete: bool = True) -> zarr.Group:
        """The scene's group. Writers pass require_complete=False: while two runs create the same
        scene at once, one run's group creation can hide the other's `complete` flag for a moment
        (both end by setting it), and the arrays a writer needs are there either way."""
        if not require_complete and "scenes" in self.root and scene_id in self.root["scenes"]:
            return self.root["scenes"][scene_id]
        if scene_id not in self.scenes():
            known = ", ".join(self.scenes()) or "none"
            raise StoreError(
                f"scene {scene_id} is not (completely) in {self.url} (scenes: {known}); "
                f"run `{EXTRACT_COMMAND.format(store=self.url)}` over it"
            )
        return self.root["scenes"][scene_id]

    def _featureset_description(self, featureset: str) -> dict[str, Any]:
        available = self.featuresets()
        if featureset not in available:
            listing = "; ".join(describe_featureset(f, d) for f, d in available.items()) or "none"
            raise StoreError(
                f"{self.url} has no feature set {featureset} (it has: {listing}); "
                f"pick one with --featureset or run `{EXTRACT_COMMAND.format(store=self.url)}`"
            )
        return available[featureset]

    # ---------------------------------------------------------------- writing

    def register_featureset(self, description: dict[str, Any]) -> str:
        """Record a feature set's description; returns its id. Idempotent."""
        self._require_writable()
        fid = featureset_id(description)
        group = self.root.require_group("featuresets").require_group(fid)
        if dict(group.attrs) != description:
            group.attrs.update(description)
        return fid

    def create_scene(
        self,
        scene_id: str,
        *,
        frame_id: np.ndarray,
        intrinsic_color: np.ndarray,
        intrinsic_depth: np.ndarray,
        color_size: tuple[int, int],
        depth_size: tuple[int, int],
        depth_scale: float,
        points: Any,
    ) -> None:
        """Create a scene's arrays and write its points; no-op if the scene is complete.

        points: any object with xyz, rgb, semantic, instance, segment arrays
        (pipeline.scenes.Points), or a function returning one, called only when the scene is
        created (reading a mesh costs more than checking that the scene is there). Per-frame arrays start empty (pose NaN, valid False)
        and are filled by `write_frames`.
        """
        self._require_writable()
        if scene_id in self.scenes():
            stored = self.root["scenes"][scene_id]["frames"]["frame_id"][:]
            if not np.array_equal(stored, frame_id):
                raise StoreError(
                    f"scene {scene_id} in {self.url} has {stored.size} frames, the dataset now has "
                    f"{len(frame_id)}: write to a new store or delete {self.url}/scenes/{scene_id}"
                )
            return
        if callable(points):
            points = points()
        group = self.root.require_group("scenes").require_group(scene_id)
        n_frames = len(frame_id)
        frames = group.require_group("frames")
        _put(frames, "frame_id", np.asarray(frame_id, np.int64))
        _put(frames, "intrinsic_color", np.asarray(intrinsic_color, np.float64))
        _put(frames, "intrinsic_depth", np.asarray(intrinsic_depth, np.float64))
        _per_frame(frames, "pose", (n_frames, 4, 4), "float64", np.nan)
        _per_frame(frames, "valid", (n_frames,), "bool", False)
        _per_frame(frames, "reason", (n_frames,), str, "")
        _per_frame(frames, "depth", (n_frames, *depth_size), "uint16", 0)
        pts = group.require_group("points")
        _put(pts, "xyz", np.asarray(points.xyz, np.float32))
        _put(pts, "rgb", np.asarray(points.rgb, np.uint8))
        _put(pts, "semantic", np.asarray(points.semantic, np.int16))
        _put(pts, "instance", np.asarray(points.instance, np.int32))
        _put(pts, "segment", np.asarray(points.segment, np.int32))
        group.attrs.update(
            {
                "color_size": list(color_size),
                "depth_size": list(depth_size),
                "depth_scale": float(depth_scale),
                "complete": True,
            }
        )

    def create_features(
        self, scene_id: str, featureset: str, grid_size: tuple[int, int], spatial_dim: int,
        global_dim: int,
    ) -> None:
        """Create (or open) a scene's arrays for one feature set; existing data is kept."""
        self._require_writable()
        group = self._scene_group(scene_id, require_complete=False)
        n_frames = group["frames"]["frame_id"].shape[0]
        arrays = group.require_group("features").require_group(featureset)
        _per_frame(arrays, "spatial", (n_frames, *grid_size, spatial_dim), "float16", 0)
        _per_frame(arrays, "global", (n_frames, global_dim), "float16", 0)
        _per_frame(arrays, "done", (n_frames,), "bool", False)

    def write_frames(
        self,
        scene_id: str,
        positions: Sequence[int],
        *,
        pose: np.ndarray,
        valid: np.ndarray,
        reason: Sequence[str],
        depth: np.ndarray | None = None,
    ) -> None:
        """Write frame geometry for the frames at `positions` (indices into frame_id).

        pose: (B, 4, 4) camera-to-world; valid: (B,) bool; reason: B strings;
        depth: (B, h, w) uint16 or None (invalid frames keep zeros).
        """
        self._require_writable()
        frames = self.root["scenes"][scene_id]["frames"]
        reason = np.asarray(reason, dtype=object)
        for rows, where in _runs(positions):  # contiguous frames: one call, chunks in parallel
            frames["pose"][where] = np.asarray(pose)[rows]
            if depth is not None:
                frames["depth"][where] = np.asarray(depth)[rows]
            frames["reason"][where] = reason[rows]
            frames["valid"][where] = np.asarray(valid, bool)[rows]

    def write_features(
        self,
        scene_id: str,
        featureset: str,
        positions: Sequence[int],
        *,
        spatial: np.ndarray | None,
        global_: np.ndarray | None,
    ) -> None:
        """Write features of the frames at `positions`, then mark them done.

        spatial: (B, gh, gw, C), global_: (B, D), cast to float16; both None marks frames
        done with no features (invalid frames).
        """
        self._require_writable()
        arrays = self.root["scenes"][scene_id]["features"][featureset]
        runs = _runs(positions)
        if spatial is not None:
            for rows, where in runs:
                arrays["spatial"][where] = np.asarray(spatial)[rows].astype(np.float16)
                arrays["global"][where] = np.asarray(global_)[rows].astype(np.float16)
        for _, where in runs:  # only after every feature chunk of the batch is written
            arrays["done"][where] = True

    def _require_writable(self) -> None:
        if self.mode != "a":
            raise StoreError(f"{self.url} is open read-only; open it with mode='a' to write")


def _runs(positions: Sequence[int]) -> list[tuple[slice, slice]]:
    """Split `positions` into runs of consecutive frames: (rows of the batch, frames) slices."""
    positions = [int(p) for p in positions]
    runs, start = [], 0
    for i in range(1, len(positions) + 1):
        if i == len(positions) or positions[i] != positions[i - 1] + 1:
            runs.append((slice(start, i), slice(positions[start], positions[i - 1] + 1)))
            start = i
    return runs


def _per_frame(group: zarr.Group, name: str, shape: tuple, dtype: Any, fill: Any) -> zarr.Array:
    """A per-frame array: one frame per chunk, unsharded (see the module docstring)."""
    if name in group:
        return group[name]
    try:
        return group.create_array(
            name, shape=shape, chunks=(1, *shape[1:]), dtype=dtype, fill_value=fill,
            compressors=_COMPRESSORS,
        )
    except zarr.errors.ContainsArrayError:  # another writer created it first
        return group[name]


def _put(group: zarr.Group, name: str, data: np.ndarray) -> None:
    """Write a whole small array as one chunk (two writers racing write identical data)."""
    if name in group:
        array = group[name]
    else:
        try:
            array = group.create_array(
                name, shape=data.shape, chunks=tuple(max(1, n) for n in data.shape),
                dtype=data.dtype, compressors=_COMPRESSORS,
            )
        except zarr.errors.ContainsArrayError:
            array = group[name]
    array[...] = data
