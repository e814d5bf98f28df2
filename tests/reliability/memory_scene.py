"""A scene of many frames and millions of points, written straight into a store, and the
peak memory of loading it for stage 2, measured in a fresh process (used by
test_memory_bound and runnable by hand: `python -m tests.reliability.memory_scene STORE`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np

DESCRIPTION = {"model": "memory-test", "pretrained": "none", "image_size": [240, 320],
               "grid_size": [6, 8], "resize": "squash", "spatial_kind": "tokens",
               "mean": [0.5] * 3, "std": [0.5] * 3,
               "spatial_dim": 16, "global_dim": 16, "dtype": "float16"}
DEPTH_SIZE = (480, 640)
K = np.array([[500.0, 0.0, 319.5], [0.0, 500.0, 239.5], [0.0, 0.0, 1.0]])


def write_scene(path: Path, n_points: int, n_frames: int, every: int = 1, seed: int = 0) -> str:
    """A wall of `n_points` points 2 m in front of `n_frames` cameras sliding along it (each
    sees about a quarter of the wall), flat depth maps, random features; only every `every`-th
    frame is valid (the others are invalid frames, as a scan's blurred or unposed ones).
    Returns the feature set id."""
    from storage import open_store

    rng = np.random.default_rng(seed)
    store = open_store(path, mode="a")
    fid = store.register_featureset(DESCRIPTION)
    xyz = np.stack([rng.uniform(-2.0, 2.0, n_points), rng.uniform(-0.75, 0.75, n_points),
                    np.full(n_points, 2.0)], axis=1).astype(np.float32)
    points = SimpleNamespace(xyz=xyz, rgb=np.zeros((n_points, 3), np.uint8),
                             semantic=np.zeros(n_points, np.int16),
                             instance=np.full(n_points, -1, np.int32),
                             segment=np.full(n_points, -1, np.int32))
    store.create_scene("scene_big", frame_id=np.arange(n_frames), intrinsic_color=K,
                       intrinsic_depth=K, color_size=DEPTH_SIZE, depth_size=DEPTH_SIZE,
                       depth_scale=0.001, points=points)
    store.create_features("scene_big", fid, tuple(DESCRIPTION["grid_size"]),
                          DESCRIPTION["spatial_dim"], DESCRIPTION["global_dim"])
    depth = np.full(DEPTH_SIZE, 2000, np.uint16)
    for start in range(0, n_frames, 32):
        positions = list(range(start, min(start + 32, n_frames)))
        poses = np.tile(np.eye(4), (len(positions), 1, 1))
        poses[:, 0, 3] = np.linspace(-1.5, 1.5, n_frames)[positions]
        valid = np.array([p % every == 0 for p in positions])
        store.write_frames("scene_big", positions, pose=poses, valid=valid,
                           reason=["" if v else "left out" for v in valid],
                           depth=np.stack([depth] * len(positions)))
        kept = [p for p, v in zip(positions, valid) if v]
        store.write_features("scene_big", fid, kept,
                             spatial=rng.standard_normal((len(kept), 6, 8, 16)),
                             global_=rng.standard_normal((len(kept), 16)))
        store.write_features("scene_big", fid, [p for p in positions if p % every],
                             spatial=None, global_=None)
    return fid


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith(field)).split()[1])


def measure(path: str) -> dict:
    """Load the scene as stage 2 does; resident memory before and the peak (VmHWM) after."""
    import torch

    from model.dataset import CachedScenes
    from storage import open_store

    store = open_store(path)
    (fid,) = store.featuresets()
    scenes = CachedScenes({"scene_big": store}, fid, torch.device("cpu"))
    before = _rss_kb("VmRSS:")
    sample = scenes.load("scene_big")
    return {"rss_before_mb": before / 1024, "peak_mb": _rss_kb("VmHWM:") / 1024,
            "points": int(sample.xyz.shape[0]), "views": int(sample.view_global.shape[0]),
            "pairs": int(sample.view_pairs.shape[1]), "seen": float(sample.seen.float().mean()),
            "sample_mb": sum(v.nbytes for v in vars(sample).values()
                             if isinstance(v, torch.Tensor)) / 2**20}


if __name__ == "__main__":
    if sys.argv[1] == "write":
        print(write_scene(Path(sys.argv[2]), *map(int, sys.argv[3:])))
    else:
        print(json.dumps(measure(sys.argv[1])))
