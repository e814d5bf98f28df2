"""Checked access to a store's groups, arrays and chunks: nothing missing or corrupt passes.

Every read here names what it could not use, in one line: a zarr.json that does not parse (and
the folder to delete), a chunk that does not decode or is missing (its scene, frame and file),
features that are not finite, a server that cannot be reached (its endpoint), with the command
that repairs it. `FeatureStore` reads through these; `storage.integrity` walks whole scenes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import collect_aiterator, sync

from cli.commands import repair_command
from storage.errors import StoreError, StoreUnreachable

MISSING_DEPTH = np.iinfo(np.uint16).max
"""Fill value of `depth`: what a missing depth chunk reads as (65.535 m, a reading no RGB-D
sensor of ScanNet's kind returns; 0 means "no reading" and is data)."""

FEATURES = ("spatial", "global")
"""The per-frame feature arrays of a feature set."""


_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError)


def _connection_errors() -> tuple[type[BaseException], ...]:
    """Connection failures of the object-storage clients that may be installed."""
    errors = list(_CONNECTION_ERRORS)
    try:
        import botocore.exceptions

        errors += [botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError]
    except ImportError:
        pass
    try:
        import aiohttp

        errors.append(aiohttp.ClientConnectionError)
    except ImportError:
        pass
    return tuple(errors)


def _client_setup_errors() -> tuple[type[BaseException], ...]:
    """Errors of an S3 client that cannot even send a request: no or half credentials, a
    profile that does not exist, an endpoint that is no URL."""
    try:
        import botocore.exceptions as boto
    except ImportError:
        return ()
    return (boto.NoCredentialsError, boto.PartialCredentialsError, boto.ProfileNotFound)


@contextmanager
def reaching(url: str, storage_options: dict[str, Any] | None = None) -> Iterator[None]:
    """Turn a failure to reach a store's server, or to set up its client (credentials, profile,
    endpoint), into one StoreError naming the endpoint and what to do."""
    endpoint = ((storage_options or {}).get("endpoint_url")
                or (storage_options or {}).get("client_kwargs", {}).get("endpoint_url")
                or os.environ.get("AWS_ENDPOINT_URL") or "the default endpoint")
    try:
        yield
    except _connection_errors() as error:
        raise StoreUnreachable(
            f"cannot reach the server of {url} at {endpoint} ({one_line(error)}): check that it "
            "is up and the endpoint_url in --storage-options (or AWS_ENDPOINT_URL)") from None
    except _client_setup_errors() as error:
        raise StoreUnreachable(
            f"cannot sign in to the server of {url} at {endpoint} ({one_line(error)}): set "
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE naming a profile of "
            "~/.aws/config, in the environment (--storage-options takes no secrets)") from None
    except ValueError as error:
        if "endpoint" not in str(error).lower():
            raise
        raise StoreUnreachable(
            f"cannot use the server of {url} ({one_line(error)}): endpoint_url must be a URL "
            "such as http://127.0.0.1:9000") from None


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:300] or type(error).__name__


class ChunkAccess:
    """The checked reads of `FeatureStore` (which provides root, url, storage_options and
    _scene_group): every failure is a StoreError naming the scene, frame and file."""

    root: zarr.Group
    url: str
    storage_options: dict[str, Any] | None

    def children(self, path: str) -> list[str]:
        """Names of the groups and arrays directly under `path` ([] when there is none),
        listed without parsing their metadata (a corrupt one is named when opened)."""
        with reaching(self.url, self.storage_options):
            names = collect_aiterator(self.root.store.list_dir(join_key(self.root.path, path)))
        return sorted(name for name in names if name != "zarr.json"
                      and not name.startswith(".") and not name.endswith(".partial"))

    def node(self, path: str, *, direct: bool = False) -> zarr.Group | zarr.Array:
        """The group or array at `path` under the root. Raises KeyError when there is none and
        StoreError naming the file when its metadata (zarr.json) is corrupt.

        From the root's consolidated metadata when it has them (no request), and from the store
        itself when they lack `path` (written after they were) or when `direct`."""
        with reaching(self.url, self.storage_options):
            try:
                if not path:
                    return self.root
                if direct or self.root.metadata.consolidated_metadata is None:
                    return self._direct(path)
                try:
                    return self.root[path]
                except KeyError:  # not in the snapshot: written since, or not there at all
                    return self._direct(path)
            except KeyError:
                raise
            except (ValueError, TypeError, zarr.errors.BaseZarrError) as error:
                raise self._metadata_error(path, error) from None

    def _direct(self, path: str) -> zarr.Group | zarr.Array:
        """The node at `path` read from the store, whatever the consolidated metadata say."""
        if self.root.metadata.consolidated_metadata is None:
            return self.root[path]
        if getattr(self, "_unconsolidated_root", None) is None:
            self._unconsolidated_root = zarr.open_group(
                store=self.root.store, path=self.root.path, mode="r", use_consolidated=False)
        return self._unconsolidated_root[path]

    def chunk_file(self, array: zarr.Array, position: int = 0) -> str:
        """Where the chunk of frame `position` (or a whole small array's chunk) is stored."""
        coords = (position,) + (0,) * (array.ndim - 1)
        key = join_key(array.path, array.metadata.encode_chunk_key(coords))
        return f"{self.url.rstrip('/')}/{key}"

    def frame_array(self, scene_id: str, path: str, positions: Sequence[int], *,
                    check_finite: bool = True) -> FrameArray:
        """Frames `positions` of the per-frame array `path` (e.g. "frames/depth",
        "features/<id>/spatial") of a scene, read lazily a slice at a time and checked."""
        self._scene_group(scene_id, require_complete=False)
        array = self.node(f"scenes/{scene_id}/{path}")
        return FrameArray(self, scene_id, path, array, np.asarray(positions, np.int64),
                          check_finite)

    def check_frame_state(self, scene_id: str, done: np.ndarray, valid: np.ndarray) -> None:
        """Raise StoreError for a done frame that is neither valid nor has a reason: an invalid
        frame always has one, so its frames/valid chunk is missing."""
        suspect = np.flatnonzero(done & ~valid)
        if suspect.size == 0:
            return
        reason = self.frame_array(scene_id, "frames/reason", suspect)[:]
        lost = suspect[reason == ""]
        if lost.size:
            raise self._missing(scene_id, "frames/valid", int(lost[0]))

    def _frame_ids(self, scene_id: str) -> np.ndarray:
        return self._read_whole(scene_id, "frames/frame_id")

    def _read_whole(self, scene_id: str, path: str) -> np.ndarray:
        """A small array written whole (frame table, intrinsics, points), its chunk checked."""
        array = self.node(f"scenes/{scene_id}/{path}")
        key = join_key(array.path, array.metadata.encode_chunk_key((0,) * array.ndim))
        with reaching(self.url, self.storage_options):
            present = sync(array.store.exists(key))
        if not present:
            raise StoreError(f"scene {scene_id}: {path} is missing its chunk "
                             f"({self.chunk_file(array)}): rerun "
                             f"{repair_command(self.url)} to rewrite it")
        try:
            with reaching(self.url, self.storage_options):
                return array[...]
        except StoreError:
            raise
        except Exception as error:
            raise StoreError(f"scene {scene_id}: {path} is corrupt ({one_line(error)} in "
                             f"{self.chunk_file(array)}): rerun "
                             f"{repair_command(self.url)} to rewrite it") from None

    def _read_all(self, scene_id: str, path: str) -> np.ndarray:
        """Every frame of a per-frame array; a corrupt chunk is named."""
        array = self.node(f"scenes/{scene_id}/{path}")
        return self.read_frames(scene_id, path, array, np.arange(array.shape[0]))

    def read_frames(self, scene_id: str, path: str, array: zarr.Array,
                    positions: np.ndarray) -> np.ndarray:
        """(len(positions), ...) values of the per-frame `array`; a chunk that fails to
        decode becomes a StoreError naming the scene, frame and file."""
        if positions.size == 0:
            return np.empty((0, *array.shape[1:]), dtype=array.dtype)
        try:
            with reaching(self.url, self.storage_options):
                if positions.size == positions[-1] - positions[0] + 1:  # contiguous: one slice
                    return array[int(positions[0]):int(positions[-1]) + 1]
                return array.get_orthogonal_selection((positions,))
        except StoreError:
            raise
        except Exception as error:
            for position in positions.tolist():  # which chunk: read them one by one
                try:
                    array[position]
                except Exception as single:
                    raise self._corrupt(scene_id, path, array, position, single) from None
            raise StoreError(f"scene {scene_id}: cannot read {path} ({one_line(error)})"
                             ) from None

    def _missing(self, scene_id: str, path: str, position: int,
                 frame_ids: np.ndarray | None = None) -> StoreError:
        array = self.node(f"scenes/{scene_id}/{path}")
        frame = (frame_ids if frame_ids is not None else self._frame_ids(scene_id))[position]
        return StoreError(
            f"scene {scene_id} frame {frame}: the {path} chunk is missing "
            f"({self.chunk_file(array, position)}): rerun "
            f"{repair_command(self.url)} to redo the frame")

    def _corrupt(self, scene_id: str, path: str, array: zarr.Array, position: int,
                 error: BaseException | str) -> StoreError:
        """error: what failed to decode it, or a phrase saying what is wrong with it."""
        frame = self._frame_ids(scene_id)[position]
        what = error if isinstance(error, str) else f"is corrupt ({one_line(error)})"
        return StoreError(
            f"scene {scene_id} frame {frame}: the {path} chunk {what} "
            f"({self.chunk_file(array, position)}): rerun "
            f"{repair_command(self.url)} to redo the frame")

    def _metadata_error(self, path: str, error: BaseException) -> StoreError:
        """A StoreError naming the first zarr.json on the way to `path` that does not parse."""
        parts = [part for part in path.split("/") if part]
        for depth in range(len(parts) + 1):
            prefix = "/".join(parts[:depth])
            key = join_key(self.root.path, join_key(prefix, "zarr.json"))
            try:
                raw = sync(self.root.store.get(key, default_buffer_prototype()))
                if raw is not None:
                    json.loads(raw.to_bytes())
            except (ValueError, UnicodeDecodeError) as bad:
                where = f"{self.url.rstrip('/')}/{key}"
                if not prefix:
                    return StoreError(f"{where} is corrupt ({one_line(bad)}): restore it from a "
                                      "copy or write a new store")
                folder = where.removesuffix("/zarr.json")
                return StoreError(
                    f"{where} is corrupt ({one_line(bad)}): delete {folder} and rerun "
                    f"{repair_command(self.url)} to rebuild it")
        return StoreError(f"cannot read {self.url.rstrip('/')}/{path} ({one_line(error)})")


class FrameArray:
    """Some frames of one per-frame array of a scene, read lazily: `[a:b]` reads those frames'
    chunks only, and checks them (a chunk that fails to decode, a missing chunk, non-finite
    features), raising StoreError naming the scene, frame and chunk file.

    Behaves as the (V, ...) numpy array it stands for where `pipeline.projection` needs it:
    len(), .shape, .dtype, slicing along frames, np.asarray (reads everything).
    """

    def __init__(self, store: ChunkAccess, scene_id: str, path: str, array: zarr.Array,
                 positions: np.ndarray, check_finite: bool = True):
        self.store, self.scene_id, self.path = store, scene_id, path
        self.array, self.positions, self.check_finite = array, positions, check_finite
        self.shape = (len(positions), *array.shape[1:])
        self.dtype = array.dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: slice) -> np.ndarray:
        if not isinstance(index, slice):
            raise TypeError("FrameArray reads slices of frames, e.g. frames[0:16]")
        positions = self.positions[index]
        values = self.store.read_frames(self.scene_id, self.path, self.array, positions)
        self.check(values, positions)
        return values

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        values = self[:]
        return values if dtype is None else values.astype(dtype)

    def check(self, values: np.ndarray, positions: np.ndarray | None = None) -> None:
        """Raise StoreError for the first of `values` (rows of `positions`, default all of
        this array's) that is a missing chunk or, for features, not finite."""
        positions = self.positions if positions is None else positions
        name = self.path.rsplit("/", 1)[-1]
        if values.shape[0] == 0 or name not in ("spatial", "global", "depth", "pose"):
            return
        rows = values.reshape(values.shape[0], -1)
        fill = self.array.fill_value
        if name in FEATURES:  # all fill, or all zero in older stores: never an encoder's output
            missing = np.isnan(rows).all(axis=1) | (rows == 0).all(axis=1)
        elif name == "depth" and fill != MISSING_DEPTH:  # 0-filled (older store): 0 is data
            missing = np.zeros(values.shape[0], bool)
        elif np.issubdtype(values.dtype, np.floating) and np.isnan(fill):
            missing = np.isnan(rows).all(axis=1)
        else:
            missing = (rows == fill).all(axis=1)
        if missing.any():
            raise self.store._missing(self.scene_id, self.path,
                                      int(positions[np.flatnonzero(missing)[0]]))
        if name in FEATURES and self.check_finite:
            bad = ~np.isfinite(rows).all(axis=1)
            if bad.any():
                raise self.store._corrupt(
                    self.scene_id, self.path, self.array, int(positions[np.flatnonzero(bad)[0]]),
                    f"holds non-finite values ({int(bad.sum())} of {len(bad)} frames)")


def join_key(prefix: str, name: str) -> str:
    return f"{prefix.rstrip('/')}/{name}" if prefix else name
