"""Walk a store for missing and corrupt chunks: `storage.inspect --verify` and stage 1's repair.

What a frame must have on disk follows from its state, which the store itself records:

- a valid frame: its `pose` chunk, its `depth` chunk (in stores whose depth fill value is
  MISSING_DEPTH; older stores left an all-zero map unwritten, so there 0 is data) and, for
  every feature set that marked it done, its `spatial` and `global` chunks;
- a processed invalid frame: its `reason` chunk (an invalid frame always has a reason, so a
  done frame with neither `valid` nor `reason` lost its `valid` chunk);
- every scene: the one chunk of each array written whole (frame table, intrinsics, points).

Absent chunks are found by listing (a few requests per array, cheap even on object storage);
corrupt ones only by reading them (`read=True`: every chunk of the scene is decoded, a block
of frames at a time, and features must be finite).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import zarr
from zarr.core.sync import collect_aiterator

from storage.errors import StoreError
from storage.chunks import MISSING_DEPTH, reaching
from storage.store import _WHOLE_ARRAYS, FeatureStore

_BLOCK = 32
"""Frames decoded at once while reading a scene back: memory stays a few chunks' worth."""


@dataclass(frozen=True)
class Problem:
    """One missing or corrupt file of a store.

    scene_id: "" for the store's own metadata. frame: the frame id (None for arrays of the
    whole scene). position: its index in the scene's frame table. path: the array, e.g.
    "features/<id>/spatial". file: the chunk or metadata file. what: "is missing",
    "is corrupt (...)", "holds non-finite values". featuresets: the feature sets whose done
    frame it spoils (all of them for a frame's geometry): the frames stage 1 redoes.
    """

    scene_id: str
    path: str
    file: str
    what: str
    frame: int | None = None
    position: int | None = None
    featuresets: tuple[str, ...] = ()

    def line(self) -> str:
        where = f"scene {self.scene_id}" if self.scene_id else "store"
        if self.frame is not None:
            where += f" frame {self.frame}"
        return f"{where}: {self.path} {self.what} ({self.file})"


def store_problems(store: FeatureStore, *, read: bool = True) -> list[Problem]:
    """Problems of every complete scene and of the feature sets' metadata, in scene order."""
    problems = []
    for fid in store.children("featuresets"):
        try:
            store.node(f"featuresets/{fid}")
        except StoreError as error:
            problems.append(Problem("", f"featuresets/{fid}", _file_of(error), "is corrupt"))
    for scene_id in store.scenes():
        problems += scene_problems(store, scene_id, read=read)
    return problems


def scene_problems(store: FeatureStore, scene_id: str, *, read: bool = True,
                   featuresets: Iterable[str] | None = None) -> list[Problem]:
    """Missing (and with `read`, corrupt) files of one scene; `featuresets` limits which
    feature sets' arrays are checked (default all of the scene's)."""
    try:
        with reaching(store.url, store.storage_options):
            return _Scene(store, scene_id, read, featuresets).problems()
    except StoreError as error:  # metadata that does not parse: nothing below it can be read
        return [Problem(scene_id, "metadata", _file_of(error), "is corrupt")]
    except KeyError as error:  # an array's metadata is gone
        return [Problem(scene_id, str(error).strip("'\""), f"{store.url}/scenes/{scene_id}",
                        "is missing")]


def damaged_positions(problems: Iterable[Problem], featureset: str) -> list[int]:
    """Positions of the frames whose done flag of `featureset` must be cleared to redo them."""
    return sorted({p.position for p in problems
                   if p.position is not None and featureset in p.featuresets})


def damaged_whole_arrays(problems: Iterable[Problem]) -> list[str]:
    """Arrays written whole ("points/xyz", "frames/frame_id", ...) to write again."""
    return sorted({p.path for p in problems if p.path in _WHOLE_ARRAYS})


class _Scene:
    def __init__(self, store: FeatureStore, scene_id: str, read: bool,
                 featuresets: Iterable[str] | None):
        self.store, self.scene_id, self.read = store, scene_id, read
        self.found: list[Problem] = []
        available = store.children(f"scenes/{scene_id}/features")
        self.featuresets = [f for f in available if featuresets is None or f in set(featuresets)]

    def problems(self) -> list[Problem]:
        for path in _WHOLE_ARRAYS:
            self._check_whole(path)
        frame_table = self.store.node(f"scenes/{self.scene_id}/frames/frame_id")
        self.n_frames = frame_table.shape[0]
        try:
            self.frame_ids = self.store._read_whole(self.scene_id, "frames/frame_id")
        except StoreError:  # reported above; name frames by position
            self.frame_ids = np.arange(self.n_frames)
        # done first: a peer run writes a frame's data before its done flag, so every frame
        # listed as done here has all its chunks listed below (no false alarm mid-write)
        done = {fid: self._flags(f"features/{fid}/done", (fid,)) for fid in self.featuresets}
        valid = self._flags("frames/valid", ())
        has_reason = self._flags("frames/reason", (), truthy=lambda v: v != "")
        any_done = np.any([done[f] for f in self.featuresets], axis=0) if done else \
            np.zeros(self.n_frames, bool)
        lost = any_done & ~valid & ~has_reason
        self._report_absent("frames/valid", lost, self._done_at(done))
        depth = self.store.node(f"scenes/{self.scene_id}/frames/depth")
        self._check_frames("frames/pose", valid, self._done_at(done))
        self._check_frames("frames/depth", valid, self._done_at(done),
                           must_exist=depth.fill_value == MISSING_DEPTH)
        for fid in self.featuresets:
            for name in ("spatial", "global"):
                self._check_frames(f"features/{fid}/{name}", valid & done[fid],
                                   lambda position, fid=fid: (fid,))
        return sorted(self.found, key=lambda p: (p.position is not None, p.position or 0, p.path))

    def _done_at(self, done: dict[str, np.ndarray]):
        """position -> the feature sets that marked that frame done."""
        return lambda position: tuple(f for f, flags in done.items() if flags[position])

    def _array(self, path: str) -> zarr.Array:
        return self.store.node(f"scenes/{self.scene_id}/{path}")

    def _present(self, array: zarr.Array) -> np.ndarray:
        """(F,) bool: which frames of a per-frame array have a chunk, by one listing."""
        prefix = f"{array.path}/c/"
        keys = collect_aiterator(array.store.list_prefix(prefix))
        present = np.zeros(array.shape[0], bool)
        for key in keys:
            head = key.removeprefix(prefix).split("/", 1)[0]
            if head.isdecimal() and int(head) < present.size:
                present[int(head)] = True
        return present

    def _check_whole(self, path: str) -> None:
        try:
            self._array(path)
            self.store._read_whole(self.scene_id, path) if self.read else self._whole_exists(path)
        except KeyError:
            folder = f"{self.store.url.rstrip('/')}/scenes/{self.scene_id}/{path}/zarr.json"
            self.found.append(Problem(self.scene_id, path, folder, "is missing"))
        except StoreError as error:
            what = "is missing" if "is missing" in str(error) else "is corrupt"
            self.found.append(Problem(self.scene_id, path, _file_of(error), what))

    def _whole_exists(self, path: str) -> None:
        array = self._array(path)
        key = f"{array.path}/{array.metadata.encode_chunk_key((0,) * array.ndim)}"
        if not zarr.core.sync.sync(array.store.exists(key)):
            raise StoreError(f"{path} is missing its chunk ({self.store.chunk_file(array)})")

    def _flags(self, path: str, featuresets: tuple[str, ...], truthy=bool) -> np.ndarray:
        """(F,) bool of a flag array (valid, done, reason != ""): a chunk is stored only where
        the flag is set (the fill value is unset), so listing tells them; reading also finds
        chunks that do not decode, whose frames are then redone."""
        array = self._array(path)
        present = self._present(array)
        if not self.read:
            return present
        flags = np.zeros(self.n_frames, bool)
        for position, values, error in self._blocks(array, np.flatnonzero(present)):
            if error is None:
                flags[position] = truthy(values)
            else:
                self._add(path, array, position, f"is corrupt ({error})",
                          featuresets or tuple(self.featuresets))
        return flags

    def _report_absent(self, path: str, expected: np.ndarray, spoils) -> None:
        array = self._array(path)
        for position in np.flatnonzero(expected).tolist():
            self._add(path, array, position, "is missing", spoils(position))

    def _check_frames(self, path: str, expected: np.ndarray, spoils,
                      must_exist: bool = True) -> None:
        """Frames `expected` to have a chunk of `path`: absent ones are missing (if
        `must_exist`); with `read`, present ones must decode and features must be finite and
        not all zero."""
        array = self._array(path)
        present = self._present(array)
        if must_exist:
            self._report_absent(path, expected & ~present, spoils)
        if not self.read:
            return
        features = path.rsplit("/", 1)[-1] in ("spatial", "global")
        for position, values, error in self._blocks(array, np.flatnonzero(expected & present)):
            if error is not None:
                self._add(path, array, position, f"is corrupt ({error})", spoils(position))
            elif features and not np.isfinite(values).all():
                self._add(path, array, position, "holds non-finite values", spoils(position))
            elif features and not np.any(values):  # a 0-filled store's missing chunk
                self._add(path, array, position, "is missing (reads as zeros)", spoils(position))

    def _blocks(self, array: zarr.Array, positions: np.ndarray):
        """(position, values, None) of each frame, or (position, None, error text) for a
        chunk that does not decode; read a block at a time, frame by frame after a failure."""
        for start in range(0, positions.size, _BLOCK):
            block = positions[start:start + _BLOCK]
            try:
                values = array.get_orthogonal_selection((block,))
            except Exception:
                for position in block.tolist():
                    try:
                        yield position, array[position], None
                    except Exception as error:
                        yield position, None, " ".join(str(error).split())[:200]
                continue
            yield from ((int(p), v, None) for p, v in zip(block, values))

    def _add(self, path: str, array: zarr.Array, position: int, what: str,
             featuresets: tuple[str, ...]) -> None:
        self.found.append(Problem(self.scene_id, path, self.store.chunk_file(array, position),
                                  what, int(self.frame_ids[position]), position, featuresets))


def _file_of(error: StoreError) -> str:
    """The file a StoreError names: its first store path or URL ending in a known name."""
    for word in str(error).replace("(", " ").replace(")", " ").replace(";", " ").split():
        if word.endswith("zarr.json") or "/c/" in word:
            return word.rstrip(":,")
    return str(error)
