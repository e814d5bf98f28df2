"""Stage 1's work for one scene: decode frames, run the frozen encoder, write the store.

Three things run at once so that the model is the bottleneck: a thread pool decodes and
resizes the next batch of frames (JPEG, PNG, pose text -> model input) while the model encodes
the current one, and a writer thread puts the previous batch into the store. Plain functions,
no Prefect: flows/ wraps them.

Before encoding, a scene already in the store is checked for missing chunks (a listing; with
verify=True every chunk is also read back): frames whose chunks are missing or corrupt have
their done flag cleared and are encoded again, damaged points or frame-table arrays are
written again. A frame whose encoder output is not finite is invalid, with that reason;
features beyond float16's range are clamped and counted (SceneReport.clamped).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.preprocess import Preprocess
from pipeline.readers.base import Frame, Scene, SceneError
from storage.integrity import damaged_positions, damaged_whole_arrays, scene_problems
from storage.store import FeatureStore

log = logging.getLogger(__name__)

DEFAULT_STRIDE = 1
"""Frames kept: every N-th (1: all)."""
DEFAULT_BATCH_SIZE = 16
"""Frames per forward pass of the encoder."""


@dataclass
class SceneReport:
    """What one scene's extraction did, in user terms."""

    scene_id: str
    frames: int
    already_done: int = 0
    encoded: int = 0
    skipped_concurrent: int = 0  # frames another run did while this one was at the scene
    invalid: dict[int, str] = field(default_factory=dict)
    seconds: float = 0.0
    repaired: int = 0  # frames encoded again because their chunks were missing or corrupt
    clamped: int = 0  # feature values beyond float16's range, stored as +-65504
    ignored_files: dict[str, str] = field(default_factory=dict)  # path -> why it is no frame

    @property
    def frames_per_second(self) -> float:
        return self.encoded / self.seconds if self.seconds > 0 else 0.0


def register_scene(store: FeatureStore, scene: Scene, stride: int,
                   rewrite: tuple[str, ...] = ()) -> np.ndarray:
    """Write a scene's points and frame table to the store if not there yet (and the arrays
    in `rewrite`, whose chunks are missing or corrupt, again).

    Returns the (F,) int64 frame ids kept (every `stride`-th frame of the scan, stride >= 1).
    Raises SceneError (naming the scene and file) when the point cloud cannot be read.
    """
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    frame_ids = scene.frame_ids[::stride]
    if frame_ids.size == 0:
        raise SceneError(f"scene {scene.scene_id} has no frames in {scene.root / 'color'}")
    store.create_scene(  # no-op (after checking the frame table) when the scene is stored
        scene.scene_id,
        frame_id=frame_ids,
        intrinsic_color=scene.intrinsic_color,
        intrinsic_depth=scene.intrinsic_depth,
        color_size=scene.color_size,
        depth_size=scene.depth_size,
        depth_scale=0.001,
        points=scene.read_points,
        axis_alignment=scene.axis_alignment,
        rewrite=rewrite,
    )
    return frame_ids


def extract_scene(
    scene: Scene,
    store: FeatureStore,
    encoder,
    featureset: str,
    *,
    stride: int = DEFAULT_STRIDE,
    batch_size: int = DEFAULT_BATCH_SIZE,
    decode_workers: int | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    verify: bool = False,
) -> SceneReport:
    """Encode every frame of `scene` whose `done` flag is unset, and write it.

    encoder: a pipeline.encoders.base.ImageEncoder (prepare + encode + describe).
    stride, batch_size: >= 1 (ValueError otherwise).
    decode_workers: threads decoding frames ahead of the model; None: 1 when the model runs on
    the CPU (more threads would take cores from the model's own), 4 on a GPU.
    on_progress(done, total) is called once before the first batch and after each batch
    (frames of the scene handled so far, frames of the scene).
    verify: read every stored chunk of the scene back (not only list them) to find corrupt ones.
    Invalid frames are written with their reason and marked done without features, and read
    again by the next run (a replaced file then counts); done frames with missing or corrupt
    chunks are encoded again.
    Raises SceneError when the scene has no valid frame at all.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    start = time.perf_counter()
    if decode_workers is None:
        decode_workers = 1 if encoder.device.type == "cpu" else 4
    problems = (scene_problems(store, scene.scene_id, read=verify, featuresets=[featureset])
                if store.has_scene(scene.scene_id) else [])
    frame_ids = register_scene(store, scene, stride, tuple(damaged_whole_arrays(problems)))
    spec = encoder.describe()
    store.create_features(scene.scene_id, featureset, spec.grid_size, spec.spatial_dim,
                          spec.global_dim)
    damaged = damaged_positions(problems, featureset)
    if damaged:
        log.warning("%s: %d done frames have missing or corrupt chunks (e.g. %s): encoding "
                    "them again", scene.scene_id, len(damaged), problems[0].line())
        store.clear_done(scene.scene_id, featureset, damaged)
    done = store.done(scene.scene_id, featureset)
    retried = _retry_invalid_frames(store, scene.scene_id, done)
    done[retried] = False
    pending = np.flatnonzero(~done)
    if retried.size:
        log.info("%s: reading the %d frames that were invalid last time again (their files may "
                 "have been replaced since)", scene.scene_id, retried.size)
    report = SceneReport(scene.scene_id, frames=int(frame_ids.size), already_done=int(done.sum()),
                         repaired=len(damaged), ignored_files=scene.ignored_files)
    if on_progress is not None:
        on_progress(report.already_done, report.frames)
    if pending.size:
        log.info("%s: %d of %d frames to encode", scene.scene_id, pending.size, frame_ids.size)
    with ThreadPoolExecutor(1, thread_name_prefix="store-writer") as writer:
        writes: list[Future] = []
        completed = report.already_done
        batches = _decoded_batches(scene, frame_ids,
                                   _batches_in_random_order(pending, batch_size),
                                   encoder.preprocess, decode_workers)
        for positions, frames, inputs in batches:
            # Another run on the same store may have done some of these frames meanwhile: skip
            # them, so two concurrent runs share the work (at most one batch each overlaps).
            handled = len(positions)
            done_now = store.done(scene.scene_id, featureset, positions)
            keep = [i for i in range(len(positions)) if not done_now[i]]
            report.skipped_concurrent += len(positions) - len(keep)
            positions = [positions[i] for i in keep]
            frames = [frames[i] for i in keep]
            inputs = [inputs[i] for i in keep if inputs[i] is not None]
            spatial = global_ = None
            if inputs:
                spatial, global_ = encoder.encode(torch.stack(inputs))
                spatial, global_ = spatial.float().cpu().numpy(), global_.float().cpu().numpy()
                report.encoded += len(inputs)
                frames, spatial, global_ = _reject_non_finite(frames, spatial, global_)
            for frame in frames:
                if not frame.valid:
                    report.invalid[frame.frame_id] = frame.reason
                    log.warning("%s: frame %d is invalid: %s", scene.scene_id, frame.frame_id, frame.reason)
            while len(writes) >= 2:  # at most one batch behind: what is encoded is soon done
                report.clamped += writes.pop(0).result()
            if positions:
                writes.append(writer.submit(_write_batch, store, scene.scene_id, featureset,
                                            scene.depth_size, positions, frames, spatial, global_))
            completed += handled
            if on_progress is not None:
                on_progress(completed, report.frames)
        for write in writes:
            report.clamped += write.result()
    if report.clamped:
        log.warning("%s: %d feature values were beyond float16's range (+-65504) and are stored "
                    "clamped to it", scene.scene_id, report.clamped)
    if not store.valid(scene.scene_id).any():
        raise SceneError(
            f"scene {scene.scene_id} has no valid frame ({report.frames} frames, e.g. "
            f"{next(iter(report.invalid.values()), 'see the store')}): check {scene.root}"
        )
    report.seconds = time.perf_counter() - start
    return report


def _retry_invalid_frames(store: FeatureStore, scene_id: str, done: np.ndarray) -> np.ndarray:
    """Unmark the frames stored invalid (done, without features) so that this run reads them
    again: a file cut short or corrupt that was replaced since then becomes a valid frame. They
    are unmarked for every feature set of the scene, since the frame table they share may now
    call them valid. done: (F,) bool, this feature set's flags as read. Returns the positions
    read again, (R,) int64."""
    positions = np.flatnonzero(done & ~store.valid(scene_id))
    if positions.size:
        for featureset in store.scene_featuresets(scene_id):
            store.clear_done(scene_id, featureset, positions.tolist())
    return positions


def _decoded_batches(
    scene: Scene, frame_ids: np.ndarray, batches: list[list[int]],
    preprocess: Preprocess, workers: int,
) -> Iterator[tuple[list[int], list[Frame], list[torch.Tensor | None]]]:
    """Each batch of positions as (positions, frames, model inputs), decoded (at the size
    `preprocess.decode` asks for) and preprocessed by a thread pool one batch ahead of the
    consumer; an invalid frame's input is None."""

    def read(position: int) -> tuple[Frame, torch.Tensor | None]:
        frame = scene.read_frame(int(frame_ids[position]), color_min_size=preprocess.decode_size)
        if not frame.valid:
            return frame, None
        return frame, preprocess(frame.color, frame.color_reduction, scene.color_size)

    with ThreadPoolExecutor(workers, thread_name_prefix="frame-decoder") as pool:
        submit = lambda positions: [pool.submit(read, p) for p in positions]  # noqa: E731
        upcoming = submit(batches[0]) if batches else []
        for index, positions in enumerate(batches):
            current = upcoming
            if index + 1 < len(batches):  # decode the next batch while this one is encoded
                upcoming = submit(batches[index + 1])
            results = [future.result() for future in current]
            yield positions, [frame for frame, _ in results], [x for _, x in results]


def _batches_in_random_order(pending: np.ndarray, batch_size: int) -> list[list[int]]:
    """`pending` positions in batches of `batch_size` (consecutive frames), in random order.

    The batches are the same groups whatever the order, so the numbers are too. Two runs on one
    scene then take batches in independent orders: each skips what the other has done (see
    extract_scene), and they collide only when both pick the same batch at the same moment,
    a few batches per scene. (In one shared order, the run behind would skip up to the other
    and then follow it in lockstep, doing everything twice.)
    """
    batches = [pending[i:i + batch_size].tolist() for i in range(0, len(pending), batch_size)]
    order = np.random.default_rng().permutation(len(batches))
    return [batches[i] for i in order]


def _reject_non_finite(frames: list[Frame], spatial: np.ndarray, global_: np.ndarray
                       ) -> tuple[list[Frame], np.ndarray, np.ndarray]:
    """Make the valid frames whose encoder output is not finite invalid, with the reason, and
    drop their rows: (frames, spatial, global_) with one row per frame still valid."""
    finite = (np.isfinite(spatial).reshape(len(spatial), -1).all(axis=1)
              & np.isfinite(global_).all(axis=1))
    if finite.all():
        return frames, spatial, global_
    rows = iter(finite.tolist())
    checked = []
    for frame in frames:
        if frame.valid and not next(rows):
            frame = dataclasses.replace(frame, reason="the encoder's output is not finite "
                                        "(NaN or inf features)")
        checked.append(frame)
    return checked, spatial[finite], global_[finite]


def _write_batch(store, scene_id, featureset, depth_size, positions, frames, spatial,
                 global_) -> int:
    """Write a batch's frames, then its features; returns how many values were clamped."""
    depth = np.stack([
        f.depth_mm if f.valid else np.zeros(depth_size, np.uint16) for f in frames
    ])
    store.write_frames(
        scene_id, positions,
        pose=np.stack([f.pose for f in frames]),
        valid=np.array([f.valid for f in frames]),
        reason=[f.reason for f in frames],
        depth=depth,
    )
    valid_positions = [p for p, f in zip(positions, frames) if f.valid]
    invalid_positions = [p for p, f in zip(positions, frames) if not f.valid]
    clamped = 0
    if valid_positions:
        clamped = store.write_features(scene_id, featureset, valid_positions, spatial=spatial,
                                       global_=global_)
    if invalid_positions:
        store.write_features(scene_id, featureset, invalid_positions, spatial=None, global_=None)
    return clamped
