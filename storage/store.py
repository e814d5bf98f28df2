"""The feature store: one Zarr v3 group holding many scenes and many feature sets.

Layout (format_version 1)::

    <store>.zarr/
      attrs: format_version, conventions (storage.conventions: axes, units, label values, ...);
             consolidated metadata of the whole tree once a run has finished
      featuresets/<featureset_id>/   attrs: the feature set's spec (storage.featureset)
      scenes/<scene_id>/             attrs: color_size, depth_size, depth_scale, complete,
                                     axis_alignment, has_axis_alignment
        frames/frame_id (F,) int64         file number of each frame (color/<frame_id>.jpg)
               pose     (F, 4, 4) float64  camera-to-world, metres; NaN until written
               valid    (F,) bool          frame usable (decoded, rigid finite pose, depth present)
               reason   (F,) str           why a frame is invalid, "" when valid or not yet read
               intrinsic_color, intrinsic_depth (3, 3) float64, pixels
               depth    (F, h, w) uint16   depth in units of depth_scale metres, 0 = no reading
        points/xyz (N, 3) float32 metres world, rgb (N, 3) uint8, semantic (N,) int16,
               instance (N,) int32, segment (N,) int32
        features/<featureset_id>/spatial (F, gh, gw, C) float16, global (F, D) float16,
               done (F,) bool, clamped (F,) int32 values clamped to the float16 range

axis_alignment is ScanNet's `axisAlignment` from the scan's `<scene>.txt`: a 4x4 matrix, row by
row, from the world frame (that of `pose` and `xyz`) to ScanNet's axis-aligned frame,
aligned = axis_alignment @ [x, y, z, 1]. has_axis_alignment is false when the scan has none
(ScanNet's test scans; scenes stored before it was recorded): axis_alignment is then identity.

Every per-frame array has one frame per chunk and no sharding: concurrent writers of
disjoint frames (threads of one run, or two runs on one store) never touch the same chunk
file, and Zarr's local store replaces each chunk file atomically, so a killed run leaves
whole chunks. (Sharded arrays lose frames silently under interleaved writers: four writers of
interleaved frames into 50-frame shards lost 80 to 112 of 200 frames with zarr 3.1.)
A frame's features are written before its `done` flag, so `done` never claims a frame
whose data is missing.

Every array carries dimension names and CF-style attributes (`storage.conventions`), so xarray
and dask open the store without this project. At the end of a run the flow consolidates the
metadata into the root's zarr.json (`FeatureStore.consolidate`): a reader of a remote store
(S3, GCS, ...) takes them on open, one request for thousands of arrays. A snapshot goes stale while a later run writes, so it is
trusted for what it lists, never for what it lacks: a node it does not hold, and a scene it
holds as incomplete, are read from the store itself; scenes and feature sets are listed from
the store (one request each), never from the snapshot.

A missing chunk never reads as data. An absent chunk reads as the array's fill value, so the
fill values are values real data never takes: NaN for features, poses, intrinsics and xyz,
MISSING_DEPTH for depth, the type's minimum for labels and frame ids; the arrays written
whole (frame table, points) are written even where they equal it. Stores written before
these fill values (features and depth filled with 0) are checked too: a done, valid frame
whose features are all zero is a missing chunk. Every read names the chunk file of a missing
or corrupt chunk and the frame it belongs to (`storage.chunks`); `storage.integrity` walks a
whole store.
"""

from __future__ import annotations

import logging
import os
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from cli.commands import EXTRACT_COMMAND
from storage.chunks import (FEATURES, MISSING_DEPTH, ChunkAccess, one_line,
                            reaching)
from storage.conventions import DIMENSIONS, array_attributes, root_attributes
from storage.errors import StoreError
from storage.featureset import FeatureSetSpec, featureset_id
from storage.options import check_storage_options, parse_storage_options  # noqa: F401

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_COMPRESSORS = (ZstdCodec(level=3, checksum=True),)  # the checksum turns a corrupt chunk into an error

FLOAT16_MAX = float(np.finfo(np.float16).max)
"""65504: features beyond it are clamped to it when stored, and counted in `clamped`."""

_S3_DEFAULTS = {"max_concurrency": 1}
"""Defaults of s3fs changed for stores (options a user passes win): with max_concurrency above 1
(s3fs's default is 10) s3fs asks each object's size (a HEAD request) before reading it, to split
objects over its block size (50 MB) into concurrent ranged reads. A chunk here is at most a few
hundred KB, so the HEAD would only double the requests of every read."""

_FILL = {"pose": np.nan, "valid": False, "reason": "", "depth": MISSING_DEPTH,
         "spatial": np.nan, "global": np.nan, "done": False, "clamped": 0}
"""Fill values of the per-frame arrays (see the module docstring)."""


@dataclass(frozen=True)
class SceneArrays:
    """A scene's geometry as numpy arrays (see the module docstring for layout).

    frame_id: (F,) int64. pose: (F, 4, 4) float64 camera-to-world, metres.
    valid: (F,) bool. reason: (F,) str, "" for valid frames (and frames not yet processed).
    intrinsic_color, intrinsic_depth: (3, 3) float64, pixels.
    color_size, depth_size: (height, width) in pixels.
    depth: (F, h, w) uint16, metres = depth * depth_scale, 0 = no reading (empty (0, h, w)
    when read with with_depth=False).
    xyz: (N, 3) float32 metres world; rgb: (N, 3) uint8; semantic: (N,) int16 ScanNet-20
    (-100 ignored); instance: (N,) int32 (-1 none); segment: (N,) int32 superpoints (-1 unknown).
    axis_alignment: (4, 4) float64 world -> ScanNet's axis-aligned frame (identity when
    has_axis_alignment is False: the scan had none).
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
    axis_alignment: np.ndarray = field(default_factory=lambda: np.eye(4))
    has_axis_alignment: bool = False


@dataclass(frozen=True)
class FeatureArrays:
    """One feature set's arrays for one scene.

    spatial: (F, gh, gw, C) float16 per-patch features (rows top to bottom of the model input).
    global_: (F, D) float16 image embeddings (`global` is a Python keyword; `arrays["global"]`
    works too). done: (F,) bool, the frame was processed. Frames not done or not valid hold
    the fill value (NaN; zeros in stores written before it) and must not be used.
    """

    spatial: np.ndarray
    global_: np.ndarray
    done: np.ndarray
    spec: FeatureSetSpec | None = None

    def __getitem__(self, name: str) -> np.ndarray:
        return {"spatial": self.spatial, "global": self.global_, "done": self.done}[name]


def open_store(path_or_url: str | os.PathLike, mode: str = "r",
               storage_options: dict[str, Any] | None = None, *,
               consolidated: bool | None = None) -> FeatureStore:
    """Open a store by local path or fsspec URL (s3://bucket/x.zarr, gs://..., file://...).

    mode "r": read only; the store must exist and be of this format version.
    mode "a": read and write, created if missing (safely when several processes create it at
    once); fails at once if a local location is not writable, before any model is loaded.
    storage_options: non-secret fsspec options of a URL (storage.options.ALLOWED_OPTIONS:
    endpoint_url, client_kwargs.region_name, ...). Credentials are refused (they would land in
    logs and Prefect's run history): s3fs reads them from the environment (AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY, AWS_PROFILE), as does botocore AWS_ENDPOINT_URL.
    consolidated: in mode "r", whether to take the metadata from the root's consolidated
    snapshot when it has one (writers never do). None (default): for a remote store, where
    every zarr.json is a request; a local store reads its zarr.json files, which is faster than
    parsing the snapshot (100 scenes: 0.2 s against 0.6 s). False: every zarr.json as it is now
    (--verify).
    Raises StoreError (one line, naming the store or its endpoint) when the store is missing,
    unreachable, corrupt or of another format.
    """
    url = os.fspath(path_or_url)
    if mode not in ("r", "a"):
        raise ValueError(f"mode must be 'r' or 'a', not {mode!r}")
    check_storage_options(storage_options)
    is_local = "://" not in url or url.startswith("file://")
    local_path = Path(url.removeprefix("file://")) if is_local else None
    if mode == "a" and local_path is not None:
        _check_writable(local_path)
    zarr_options = ({**_S3_DEFAULTS, **(storage_options or {})}
                    if url.split("://")[0] in ("s3", "s3a") else storage_options)
    options = {"storage_options": zarr_options} if zarr_options and not is_local else {}
    with reaching(url, storage_options):
        exists = (local_path / "zarr.json").exists() if local_path is not None else \
            _remote_exists(url, storage_options, "zarr.json")
        if not exists and mode == "r":
            raise StoreError(
                f"no feature store at {url}: check the path or URL, or run "
                f"`{EXTRACT_COMMAND.format(store=url)}` to make one")
        try:
            root = _open_or_create_root(url, mode, options,
                                        not is_local if consolidated is None else consolidated)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as error:
            raise StoreError(
                f"no feature store at {url} ({error}): check the URL, that the bucket exists and "
                f"the credentials in the environment, or run `{EXTRACT_COMMAND.format(store=url)}`"
            ) from None
        except PermissionError as error:
            raise StoreError(f"cannot open {url}: permission denied ({error}); check the "
                             "credentials in the environment (AWS_ACCESS_KEY_ID, AWS_PROFILE, ...)"
                             ) from None
        except (ValueError, TypeError, KeyError) as error:  # zarr.json that does not parse
            raise StoreError(f"{url}/zarr.json is corrupt ({one_line(error)}): restore it from a "
                             "copy or write a new store") from None
    version = root.attrs.get("format_version")
    if version is None and mode == "a" and not list(root.keys()):
        root.attrs.update(_root_attributes())  # an empty group of an older version
    elif version != FORMAT_VERSION:
        raise StoreError(
            f"{url} is a store of format version {version}, this code reads version "
            f"{FORMAT_VERSION}: write a new store with `{EXTRACT_COMMAND.format(store='NEW.zarr')}`"
        )
    return FeatureStore(root, url, mode, storage_options)


def _open_or_create_root(url: str, mode: str, options: dict[str, Any],
                         consolidated: bool = True) -> zarr.Group:
    """The root group; in mode "a" created with its format version in one metadata write, so
    a peer process never sees a store without it. Tolerates a peer creating it meanwhile."""
    if mode == "r":  # the consolidated snapshot when there is one (see the module docstring)
        return zarr.open_group(url, mode="r", use_consolidated=None if consolidated else False,
                               zarr_format=3, **options)  # no probing for Zarr v2 files
    for _ in range(10):
        try:
            return zarr.open_group(url, mode="r+", use_consolidated=False, zarr_format=3,
                                   **options)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError):
            pass
        try:
            return zarr.create_group(url, attributes=_root_attributes(), **options)
        except (zarr.errors.ContainsGroupError, FileExistsError):
            continue  # a peer created it between the two calls: open it
    raise StoreError(f"cannot create the store {url}: another process keeps replacing it")


def _remote_exists(url: str, storage_options: dict[str, Any] | None, name: str) -> bool:
    """Whether `url/name` exists, by one fsspec request (zarr's own open fans out several,
    whose failures each print a traceback when the server is unreachable)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return bool(fs.exists(f"{path.rstrip('/')}/{name}"))


def check_store_location(path_or_url: str | os.PathLike) -> None:
    """Raise StoreError, creating nothing, unless a store can be written at this local path:
    its folder (or the first existing parent) is writable, and what is there already is a
    store of this format or an empty folder. URLs are checked when the store is opened."""
    url = os.fspath(path_or_url)
    if "://" in url and not url.startswith("file://"):
        return
    path = Path(url.removeprefix("file://"))
    if path.exists() and not path.is_dir():
        raise StoreError(f"{url} is a file, not a feature store: give a new path such as "
                         "features.zarr")
    if (path / "zarr.json").exists():
        open_store(url)  # its format version
    elif path.is_dir() and any(path.iterdir()):
        raise StoreError(f"{url} is a folder with other files in it, not a feature store: give a "
                         f"new path such as {path / 'features.zarr'}")
    _check_writable(path)


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
            f"({probe_dir} is not writable); choose a location on a writable disk"
        ) from None


def _first_existing_parent(path: Path) -> Path:
    for parent in path.absolute().parents:
        if parent.exists():
            return parent
    return Path("/")


class FeatureStore(ChunkAccess):
    """A handle on one store: read scenes and features, and (mode "a") write them.

    Thread-safe for writers of disjoint frames; see the module docstring. Reads raise
    StoreError naming the scene, frame and chunk file of anything missing or corrupt.
    """

    def __init__(self, root: zarr.Group, url: str, mode: str,
                 storage_options: dict[str, Any] | None = None):
        self.root = root
        self.url = url
        self.mode = mode
        self.storage_options = storage_options

    def __repr__(self) -> str:
        return f"FeatureStore({self.url!r}, mode={self.mode!r})"

    # ---------------------------------------------------------------- reading

    def scenes(self) -> list[str]:
        """Ids of the scenes whose geometry is completely written, sorted."""
        return [name for name in self.children("scenes") if self.has_scene(name)]

    def featuresets(self) -> dict[str, FeatureSetSpec]:
        """Feature-set id -> its spec (encoder, weights, input policy, widths, ...). A feature
        set another writer is registering (its folder there, its metadata not yet) is not
        listed."""
        found = {}
        for name in sorted(self.children("featuresets")):
            try:
                attrs = self.node(f"featuresets/{name}").attrs
            except KeyError:
                continue
            found[name] = FeatureSetSpec.from_attrs(attrs)
        return found

    def has_scene(self, scene_id: str) -> bool:
        """Whether the scene is completely in the store (one metadata read)."""
        try:
            if self.node(f"scenes/{scene_id}").attrs.get("complete"):
                return True
            if self.root.metadata.consolidated_metadata is None:
                return False
            # incomplete in a snapshot taken while a run wrote it: the store may know better
            return bool(self.node(f"scenes/{scene_id}", direct=True).attrs.get("complete"))
        except KeyError:  # a folder without metadata yet: a peer is creating the scene
            return False

    def valid(self, scene_id: str) -> np.ndarray:
        """(F,) bool: which frames of a scene are usable (the frame table alone, no points)."""
        self._scene_group(scene_id)
        return self._read_all(scene_id, "frames/valid")

    def scene(self, scene_id: str, *, with_depth: bool = True) -> SceneArrays:
        """A scene's frames and points as numpy arrays (depth omitted when with_depth=False).

        Raises StoreError when a chunk of the frame table or points is missing or corrupt,
        or when a valid frame's pose or depth chunk is missing."""
        group = self._scene_group(scene_id)
        whole = {name: self._read_whole(scene_id, name) for name in _WHOLE_ARRAYS}
        valid = self._read_all(scene_id, "frames/valid")
        pose = self._read_all(scene_id, "frames/pose")
        missing_pose = valid & np.isnan(pose).all(axis=(1, 2))
        if missing_pose.any():
            raise self._missing(scene_id, "frames/pose", int(np.flatnonzero(missing_pose)[0]),
                                whole["frames/frame_id"])
        depth_size = tuple(group.attrs["depth_size"])
        if with_depth:
            depth = self.frame_array(scene_id, "frames/depth", np.flatnonzero(valid))[:]
            full = np.zeros((valid.size, *depth_size), np.uint16)
            full[valid] = depth
        else:
            full = np.zeros((0, *depth_size), np.uint16)
        return SceneArrays(
            scene_id=scene_id,
            frame_id=whole["frames/frame_id"],
            pose=pose,
            valid=valid,
            reason=np.asarray(self._read_all(scene_id, "frames/reason"), dtype=object),
            intrinsic_color=whole["frames/intrinsic_color"],
            intrinsic_depth=whole["frames/intrinsic_depth"],
            color_size=tuple(group.attrs["color_size"]),
            depth_size=depth_size,
            depth=full,
            depth_scale=float(group.attrs["depth_scale"]),
            xyz=whole["points/xyz"],
            rgb=whole["points/rgb"],
            semantic=whole["points/semantic"],
            instance=whole["points/instance"],
            segment=whole["points/segment"],
            axis_alignment=np.asarray(group.attrs.get("axis_alignment", np.eye(4).tolist()),
                                      dtype=np.float64),
            has_axis_alignment=bool(group.attrs.get("has_axis_alignment", False)),
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
        done (unless require_done=False), and when a done, valid frame's chunk is missing,
        corrupt or (check_finite) holds a non-finite value, naming the scene, frame and file.
        """
        spec = self.featureset_spec(featureset)
        self._scene_group(scene_id)
        try:
            self.node(f"scenes/{scene_id}/features/{featureset}/done")
        except KeyError:
            raise StoreError(
                f"scene {scene_id} has no features of feature set {featureset} in {self.url}: "
                f"run `{EXTRACT_COMMAND.format(store=self.url)}` with that feature set's model"
            ) from None
        done = self.done(scene_id, featureset)
        if require_done and not done.all():
            missing = np.flatnonzero(~done)
            raise StoreError(
                f"scene {scene_id}: {missing.size} of {done.size} frames of feature set "
                f"{featureset} are not done (first: frame "
                f"{self._frame_ids(scene_id)[missing[0]]}); "
                f"rerun `{EXTRACT_COMMAND.format(store=self.url)}` to finish them"
            )
        valid = self.valid(scene_id)
        self.check_frame_state(scene_id, done, valid)
        usable = done & valid
        arrays = {}
        for name in FEATURES:
            path = f"features/{featureset}/{name}"
            values = self._read_all(scene_id, path)  # every frame, done or not
            checked = self.frame_array(scene_id, path, np.flatnonzero(usable),
                                       check_finite=check_finite)
            checked.check(values[usable])
            arrays[name] = values
        return FeatureArrays(spatial=arrays["spatial"], global_=arrays["global"], done=done,
                             spec=spec)

    def done(self, scene_id: str, featureset: str,
             positions: Sequence[int] | None = None) -> np.ndarray:
        """(F,) bool: which frames of a (complete) scene this feature set has processed; with
        `positions`, (len(positions),) for those frames only (one chunk read per frame)."""
        self._scene_group(scene_id, require_complete=False)
        path = f"features/{featureset}/done"
        try:
            self.node(f"scenes/{scene_id}/{path}")
        except KeyError:
            count = (self.node(f"scenes/{scene_id}/frames/frame_id").shape[0]
                     if positions is None else len(positions))
            return np.zeros(count, bool)
        if positions is None:
            return self._read_all(scene_id, path)
        return self.frame_array(scene_id, path, positions)[:]

    def clamped(self, scene_id: str, featureset: str) -> np.ndarray:
        """(F,) int: per frame, how many feature values were clamped to the float16 range."""
        try:
            return self._read_all(scene_id, f"features/{featureset}/clamped")
        except KeyError:  # a store written before the count: nothing was clamped then
            return np.zeros(self.node(f"scenes/{scene_id}/frames/frame_id").shape[0], np.int32)

    def _scene_group(self, scene_id: str, *, require_complete: bool = True) -> zarr.Group:
        """The scene's group. Writers pass require_complete=False: while two runs create the same
        scene at once, one run's group creation can hide the other's `complete` flag for a moment
        (both end by setting it), and the arrays a writer needs are there either way."""
        try:
            group = self.node(f"scenes/{scene_id}")
        except KeyError:
            group = None
        if group is None or (require_complete and not group.attrs.get("complete")):
            known = ", ".join(self.scenes()) or "none"
            raise StoreError(
                f"scene {scene_id} is not (completely) in {self.url} (scenes: {known}); "
                f"run `{EXTRACT_COMMAND.format(store=self.url)}` over it"
            )
        return group

    def featureset_spec(self, featureset: str) -> FeatureSetSpec:
        """The spec of one feature set; StoreError listing the others when the store lacks it."""
        available = self.featuresets()
        if featureset not in available:
            listing = "; ".join(spec.describe(f) for f, spec in available.items()) or "none"
            raise StoreError(
                f"{self.url} has no feature set {featureset} (it has: {listing}); "
                f"pick one with --featureset or run `{EXTRACT_COMMAND.format(store=self.url)}`"
            )
        return available[featureset]

    # ---------------------------------------------------------------- writing

    def consolidate(self) -> None:
        """Write the metadata of every group and array into the root's zarr.json (zarr's
        consolidated metadata), so that readers open the store with one request. Call it when
        a run has finished; a snapshot that later writes make stale stays correct for readers
        (see the module docstring)."""
        self._require_writable()
        with reaching(self.url, self.storage_options), warnings.catch_warnings():
            # zarr-python warns that consolidated metadata are its extension of Zarr v3:
            # readers that do not know them read the zarr.json files as before
            warnings.filterwarnings("ignore", "Consolidated metadata", UserWarning)
            zarr.consolidate_metadata(self.root.store, path=self.root.path or None)

    def register_featureset(self, spec: FeatureSetSpec | dict[str, Any]) -> str:
        """Record a feature set's spec (or its attributes); returns its id. Idempotent, also
        when several processes register it at once (the spec is written with the group)."""
        self._require_writable()
        if isinstance(spec, FeatureSetSpec):
            attrs = spec.to_attrs()
        else:
            attrs = dict(spec)
            FeatureSetSpec.from_attrs(attrs)  # attributes a reader can open
        fid = featureset_id(attrs)
        group = _require_group(_require_group(self.root, "featuresets"), fid,
                               attributes=attrs)
        if dict(group.attrs) != attrs:
            group.attrs.update(attrs)
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
        axis_alignment: np.ndarray | None = None,
        rewrite: Sequence[str] = (),
    ) -> None:
        """Create a scene's arrays and write its points; no-op if the scene is complete.

        points: any object with xyz, rgb, semantic, instance, segment arrays
        (pipeline.readers.base.Points), or a function returning one, called only when the scene is
        created or repaired (reading a mesh costs more than checking that the scene is there).
        Per-frame arrays start empty (pose NaN, valid False) and are filled by `write_frames`.
        axis_alignment: (4, 4) world -> axis-aligned frame, None when the scan has none (stored
        as identity, has_axis_alignment false).
        rewrite: arrays written whole ("points/xyz", "frames/frame_id", ...) to write again in
        a complete scene, because their chunk is missing or corrupt.
        """
        self._require_writable()
        whole = {
            "frames/frame_id": lambda: np.asarray(frame_id, np.int64),
            "frames/intrinsic_color": lambda: np.asarray(intrinsic_color, np.float64),
            "frames/intrinsic_depth": lambda: np.asarray(intrinsic_depth, np.float64),
        }
        if self.has_scene(scene_id):
            stored = self.node(f"scenes/{scene_id}/frames/frame_id")
            if "frames/frame_id" not in rewrite:
                stored_ids = self._read_whole(scene_id, "frames/frame_id")
            else:  # its chunk is lost: only its length can be compared with the dataset's
                stored_ids = np.asarray(frame_id) if stored.shape[0] == len(frame_id) else \
                    np.zeros(stored.shape[0])
            if not np.array_equal(stored_ids, frame_id):
                raise StoreError(
                    f"scene {scene_id} in {self.url} has {stored_ids.size} frames, the dataset now "
                    f"has {len(frame_id)}: write to a new store or delete "
                    f"{self.url}/scenes/{scene_id}"
                )
            if rewrite:
                if callable(points) and any(name.startswith("points/") for name in rewrite):
                    points = points()
                group = self.node(f"scenes/{scene_id}")
                for name in rewrite:
                    parent, leaf = name.split("/")
                    data = whole[name]() if name in whole else _points_array(points, leaf)
                    _put(group[parent], leaf, data, overwrite=True)
                log.warning("%s: rewrote %s (missing or corrupt)", scene_id, ", ".join(rewrite))
            return
        if callable(points):
            points = points()
        group = _require_group(_require_group(self.root, "scenes"), scene_id)
        n_frames = len(frame_id)
        frames = _require_group(group, "frames")
        for name, make in whole.items():
            _put(frames, name.split("/")[1], make())
        _per_frame(frames, "pose", (n_frames, 4, 4), "float64")
        _per_frame(frames, "valid", (n_frames,), "bool")
        _per_frame(frames, "reason", (n_frames,), str)
        _per_frame(frames, "depth", (n_frames, *depth_size), "uint16",
                   array_attributes("depth", depth_scale=float(depth_scale)))
        pts = _require_group(group, "points")
        for name in _POINTS:
            _put(pts, name, _points_array(points, name))
        group.attrs.update(
            {
                "color_size": list(color_size),
                "depth_size": list(depth_size),
                "depth_scale": float(depth_scale),
                "axis_alignment": np.asarray(
                    np.eye(4) if axis_alignment is None else axis_alignment, np.float64
                ).reshape(4, 4).tolist(),
                "has_axis_alignment": axis_alignment is not None,
                "complete": True,
            }
        )

    def create_features(
        self, scene_id: str, featureset: str, grid_size: tuple[int, int], spatial_dim: int,
        global_dim: int,
    ) -> None:
        """Create (or open) a scene's arrays for one feature set; existing data is kept."""
        self._require_writable()
        self._scene_group(scene_id, require_complete=False)
        n_frames = self.node(f"scenes/{scene_id}/frames/frame_id").shape[0]
        group = self.node(f"scenes/{scene_id}")
        arrays = _require_group(_require_group(group, "features"), featureset)
        context = {"featureset": featureset,
                   "spec": self.featureset_spec(featureset),
                   "color_size": group.attrs.get("color_size")}
        for name, shape, dtype in (("spatial", (*grid_size, spatial_dim), "float16"),
                                   ("global", (global_dim,), "float16"),
                                   ("done", (), "bool"), ("clamped", (), "int32")):
            _per_frame(arrays, name, (n_frames, *shape), dtype, array_attributes(name, **context))

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
        depth: (B, h, w) uint16 or None (a frame's depth keeps the fill value).
        """
        self._require_writable()
        frames = self.node(f"scenes/{scene_id}/frames")
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
    ) -> int:
        """Write features of the frames at `positions`, then mark them done.

        spatial: (B, gh, gw, C), global_: (B, D), finite, stored as float16: values beyond
        +-65504 (FLOAT16_MAX) are clamped to it and counted per frame in `clamped`, never
        stored as inf. Both None marks frames done with no features (invalid frames).
        Returns how many values were clamped.
        """
        self._require_writable()
        arrays = self.node(f"scenes/{scene_id}/features/{featureset}")
        runs = _runs(positions)
        clamped_total = 0
        if spatial is not None:
            spatial, clamped_spatial = to_float16(spatial)
            global_, clamped_global = to_float16(global_)
            clamped = (clamped_spatial + clamped_global).astype(np.int32)
            clamped_total = int(clamped.sum())
            for rows, where in runs:
                arrays["spatial"][where] = spatial[rows]
                arrays["global"][where] = global_[rows]
                if clamped[rows].any():
                    arrays["clamped"][where] = clamped[rows]
        for _, where in runs:  # only after every feature chunk of the batch is written
            arrays["done"][where] = True
        return clamped_total

    def scene_featuresets(self, scene_id: str) -> list[str]:
        """Ids of the feature sets that have features (a done array) for this scene."""
        return [fid for fid in self.children(f"scenes/{scene_id}/features")
                if "done" in self.children(f"scenes/{scene_id}/features/{fid}")]

    def clear_done(self, scene_id: str, featureset: str, positions: Sequence[int]) -> None:
        """Unmark frames as done (their chunks were found missing or corrupt): the next
        stage-1 run redoes them."""
        self._require_writable()
        done = self.node(f"scenes/{scene_id}/features/{featureset}/done")
        for _, where in _runs(sorted(positions)):
            done[where] = False

    def _require_writable(self) -> None:
        if self.mode != "a":
            raise StoreError(f"{self.url} is open read-only; open it with mode='a' to write")


def to_float16(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(B, ...) floats -> (float16 values clamped to +-FLOAT16_MAX, (B,) int64 counts of the
    values clamped per row). Non-finite values are not counted (callers reject them)."""
    values = np.asarray(values, np.float32)
    over = np.abs(values) > FLOAT16_MAX
    counts = over.reshape(len(values), -1).sum(axis=1)
    return np.clip(values, -FLOAT16_MAX, FLOAT16_MAX).astype(np.float16), counts


_POINTS = ("xyz", "rgb", "semantic", "instance", "segment")
_WHOLE_ARRAYS = ("frames/frame_id", "frames/intrinsic_color", "frames/intrinsic_depth",
                 *(f"points/{name}" for name in _POINTS))
"""Arrays written whole, one chunk each."""

_POINT_DTYPES = {"xyz": np.float32, "rgb": np.uint8, "semantic": np.int16, "instance": np.int32,
                 "segment": np.int32}


def _points_array(points: Any, name: str) -> np.ndarray:
    return np.asarray(getattr(points, name), _POINT_DTYPES[name])


def _runs(positions: Sequence[int]) -> list[tuple[slice, slice]]:
    """Split `positions` into runs of consecutive frames: (rows of the batch, frames) slices."""
    positions = [int(p) for p in positions]
    runs, start = [], 0
    for i in range(1, len(positions) + 1):
        if i == len(positions) or positions[i] != positions[i - 1] + 1:
            runs.append((slice(start, i), slice(positions[start], positions[i - 1] + 1)))
            start = i
    return runs


def _require_group(parent: zarr.Group, name: str,
                   attributes: dict[str, Any] | None = None) -> zarr.Group:
    """The group `name` of `parent`, created (with `attributes`, in one metadata write) if
    missing; a peer process creating it at the same moment is not an error."""
    for _ in range(10):
        try:
            return parent[name]
        except KeyError:
            pass
        try:
            return parent.create_group(name, attributes=attributes)
        except zarr.errors.ContainsGroupError:
            continue  # created by a peer between the two calls: open it
    raise StoreError(f"cannot create {parent.path}/{name}: another process keeps replacing it")


def _per_frame(group: zarr.Group, name: str, shape: tuple, dtype: Any,
               attributes: dict[str, Any] | None = None) -> zarr.Array:
    """A per-frame array: one frame per chunk, unsharded (see the module docstring), whose
    fill value (what a missing chunk reads as) is in _FILL; its dimension names and
    attributes (default: those of `name` in storage.conventions) in its metadata."""
    if name in group:
        return group[name]
    try:
        return group.create_array(
            name, shape=shape, chunks=(1, *shape[1:]), dtype=dtype, fill_value=_FILL[name],
            compressors=_COMPRESSORS, dimension_names=DIMENSIONS[name],
            attributes=array_attributes(name) if attributes is None else attributes,
        )
    except zarr.errors.ContainsArrayError:  # another writer created it first
        return group[name]


def _put(group: zarr.Group, name: str, data: np.ndarray, *, overwrite: bool = False) -> None:
    """Write a whole small array as one chunk, even when it equals the fill value (so an absent
    chunk is always a missing one); two writers racing write identical data."""
    if name in group and not overwrite:
        array = group[name]
    else:
        try:
            array = group.create_array(
                name, shape=data.shape, chunks=tuple(max(1, n) for n in data.shape),
                dtype=data.dtype, fill_value=_whole_fill(data.dtype), compressors=_COMPRESSORS,
                dimension_names=DIMENSIONS[name], attributes=array_attributes(name),
                overwrite=overwrite,
            )
        except zarr.errors.ContainsArrayError:
            array = group[name]
    array.with_config({"write_empty_chunks": True})[...] = data


def _root_attributes() -> dict[str, Any]:
    return {"format_version": FORMAT_VERSION, "conventions": root_attributes()}


def _whole_fill(dtype: np.dtype) -> Any:
    """The fill value of an array written whole: NaN, or the type's minimum (0 for unsigned)."""
    if np.issubdtype(dtype, np.floating):
        return np.nan
    return np.iinfo(dtype).min
