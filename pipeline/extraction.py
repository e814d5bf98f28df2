"""Stage 1's work for one scene: decode frames, run the frozen encoder, write the store.

Three things run at once so that the model is the bottleneck: a thread pool decodes and
resizes the next batch of frames (JPEG, PNG, pose text -> model input) while the model encodes
the current one, and a writer thread puts the previous batch into the store. Plain functions,
no Prefect: flows/ wraps them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.scenes import Frame, Scene, SceneError
from storage.store import FeatureStore

log = logging.getLogger(__name__)


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

    @property
    def frames_per_second(self) -> float:
        return self.encoded / self.seconds if self.seconds > 0 else 0.0


def register_scene(store: FeatureStore, scene: Scene, stride: int) -> np.ndarray:
    """Write a scene's points and frame table to the store if not there yet.

    Returns the (F,) int64 frame ids kept (every `stride`-th frame of the scan).
    Raises SceneError (naming the scene and file) when the point cloud cannot be read.
    """
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
    )
    return frame_ids


def extract_scene(
    scene: Scene,
    store: FeatureStore,
    encoder,
    featureset: str,
    *,
    stride: int = 1,
    batch_size: int = 16,
    decode_workers: int | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> SceneReport:
    """Encode every frame of `scene` whose `done` flag is unset, and write it.

    encoder: a pipeline.clip_encoder.FrozenClipEncoder (preprocess + encode + describe).
    decode_workers: threads decoding frames ahead of the model; None: 1 when the model runs on
    the CPU (more threads would take cores from the model's own), 4 on a GPU.
    on_progress(done, total) is called after each written batch.
    Invalid frames are written with their reason and marked done without features.
    Raises SceneError when the scene has no valid frame at all.
    """
    start = time.perf_counter()
    if decode_workers is None:
        decode_workers = 1 if encoder.device.type == "cpu" else 4
    frame_ids = register_scene(store, scene, stride)
    description = encoder.describe()
    store.create_features(
        scene.scene_id, featureset, tuple(description["grid_size"]),
        description["spatial_dim"], description["global_dim"],
    )
    done = store.done(scene.scene_id, featureset)
    pending = np.flatnonzero(~done)
    report = SceneReport(scene.scene_id, frames=int(frame_ids.size), already_done=int(done.sum()))
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
            for frame in frames:
                if not frame.valid:
                    report.invalid[frame.frame_id] = frame.reason
                    log.warning("%s: frame %d is invalid: %s", scene.scene_id, frame.frame_id, frame.reason)
            while len(writes) >= 2:  # at most one batch behind: what is encoded is soon done
                writes.pop(0).result()
            if positions:
                writes.append(writer.submit(_write_batch, store, scene.scene_id, featureset,
                                            scene.depth_size, positions, frames, spatial, global_))
            completed += handled
        for write in writes:
            write.result()
    if not store.valid(scene.scene_id).any():
        raise SceneError(
            f"scene {scene.scene_id} has no valid frame ({report.frames} frames, e.g. "
            f"{next(iter(report.invalid.values()), 'see the store')}): check {scene.root}"
        )
    report.seconds = time.perf_counter() - start
    return report


def _decoded_batches(
    scene: Scene, frame_ids: np.ndarray, batches: list[list[int]],
    preprocess: Callable[[np.ndarray], torch.Tensor], workers: int,
) -> Iterator[tuple[list[int], list[Frame], list[torch.Tensor | None]]]:
    """Each batch of positions as (positions, frames, model inputs), decoded and preprocessed by
    a thread pool one batch ahead of the consumer; an invalid frame's input is None."""

    def read(position: int) -> tuple[Frame, torch.Tensor | None]:
        frame = scene.read_frame(int(frame_ids[position]))
        return frame, preprocess(frame.color) if frame.valid else None

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


def _write_batch(store, scene_id, featureset, depth_size, positions, frames, spatial,
                 global_) -> None:
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
    if valid_positions:
        store.write_features(scene_id, featureset, valid_positions, spatial=spatial, global_=global_)
    if invalid_positions:
        store.write_features(scene_id, featureset, invalid_positions, spatial=None, global_=None)
