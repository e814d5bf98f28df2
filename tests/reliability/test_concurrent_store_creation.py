"""Several processes creating one new store at once (stage-1 runs or workers started together)
never fail: every group is created idempotently, tolerating a peer creating it meanwhile."""

from __future__ import annotations

import multiprocessing
import traceback
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from storage import open_store
from storage.featureset import FeatureSetSpec

PROCESSES, ROUNDS = 4, 12
SCENES = ("scene0000_00", "scene0001_00")
DESCRIPTION = {"model": "race", "pretrained": "none", "image_size": [32, 32], "grid_size": [2, 2],
               "resize": "squash", "mean": [0.5] * 3, "std": [0.5] * 3, "spatial_kind": "tokens",
               "spatial_dim": 4, "global_dim": 4}
FRAMES = 8


def create_and_write(path: str, worker: int) -> None:
    """What a stage-1 run does first on a new store, then one frame per scene of its own."""
    store = open_store(path, mode="a")
    fid = store.register_featureset(DESCRIPTION)
    points = SimpleNamespace(xyz=np.zeros((10, 3)), rgb=np.zeros((10, 3)),
                             semantic=np.zeros(10), instance=np.full(10, -1),
                             segment=np.full(10, -1))
    for scene_id in SCENES:
        store.create_scene(scene_id, frame_id=np.arange(FRAMES), intrinsic_color=np.eye(3),
                           intrinsic_depth=np.eye(3), color_size=(4, 4), depth_size=(4, 4),
                           depth_scale=0.001, points=points)
        store.create_features(scene_id, fid, (2, 2), 4, 4)
        for position in (worker, worker + PROCESSES):
            store.write_frames(scene_id, [position], pose=np.eye(4)[None], valid=[True],
                               reason=[""], depth=np.ones((1, 4, 4), np.uint16))
            store.write_features(scene_id, fid, [position], spatial=np.ones((1, 2, 2, 4)),
                                 global_=np.ones((1, 4)))


def worker_loop(root: str, worker: int, barrier, errors) -> None:
    for round_ in range(ROUNDS):
        barrier.wait()  # all processes start on the new store at the same moment
        try:
            create_and_write(f"{root}/store{round_}.zarr", worker)
        except Exception:
            errors.put(f"round {round_} worker {worker}: {traceback.format_exc()}")


def test_processes_creating_one_new_store_at_once(tmp_path: Path):
    context = multiprocessing.get_context("spawn")
    barrier, errors = context.Barrier(PROCESSES), context.Queue()
    processes = [context.Process(target=worker_loop, args=(str(tmp_path), w, barrier, errors))
                 for w in range(PROCESSES)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=600)
    found = []
    while not errors.empty():
        found.append(errors.get())
    assert not found, "\n".join(found[:3])
    assert all(process.exitcode == 0 for process in processes)
    for round_ in range(ROUNDS):
        store = open_store(tmp_path / f"store{round_}.zarr")
        (fid,) = store.featuresets()
        assert store.featuresets()[fid] == FeatureSetSpec.from_attrs(DESCRIPTION)
        assert store.scenes() == list(SCENES)
        for scene_id in SCENES:
            assert store.done(scene_id, fid).all() and store.valid(scene_id).all()
            assert store.features(scene_id, fid).spatial.shape == (FRAMES, 2, 2, 4)
