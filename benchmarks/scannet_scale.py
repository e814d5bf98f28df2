"""Stage 2's data path on a ScanNet-size scene: 150k points and 2,000 frames (ScanNet's
larger scans; its median is about 1,500 frames of 640x480 depth), read from the store and
projected, as `model.dataset.CachedScenes.load` does for every scene a training run sees.

The scene is written straight into a store through its writer API, without running stage 1
(which would take hours on a CPU for 2,000 frames): a box-shaped room (7 x 5 x 3 m) whose
walls, floor and ceiling carry the points, 2,000 cameras inside it along a loop at 1.0-1.6 m
height turning about the vertical and tilting, each frame's 640x480 depth ray-cast from the
room (every 4th pixel, see CAST_STEP), ScanNet's intrinsics, and random float16 features of ViT-B-16's maskclip
shape (14 x 14 x 512 and 512 global) with the feature-set spec stage 1 writes. What
is timed is what training does with that store; only the feature values are not CLIP's (the
work does not depend on them).
"""

from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import torch

ROOM = np.array([7.0, 5.0, 3.0])
DEPTH_SIZE = (480, 640)
COLOR_SIZE = (968, 1296)
INTRINSIC_DEPTH = np.array([[577.6, 0, 319.5], [0, 577.6, 239.5], [0, 0, 1]])
INTRINSIC_COLOR = np.array([[1170.2, 0, 647.8], [0, 1170.2, 483.8], [0, 0, 1]])
FULL = {"points": 150_000, "frames": 2_000}
QUICK = {"points": 5_000, "frames": 40}
DESCRIPTION = {
    "model": "ViT-B-16", "pretrained": "none (benchmarks.scannet_scale: random features)",
    "random_weights": True, "image_size": [224, 224], "patch_size": [16, 16],
    "grid_size": [14, 14], "resize": "squash", "decode": "scaled", "spatial_kind": "maskclip",
    "mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711],
    "spatial_dim": 512, "global_dim": 512, "dtype": "float16",
}


def room_points(n_points: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 3) float32 points on the room's six faces, spread by area."""
    areas = np.array([ROOM[1] * ROOM[2], ROOM[0] * ROOM[2], ROOM[0] * ROOM[1]]).repeat(2)
    face = rng.choice(6, size=n_points, p=areas / areas.sum())
    xyz = rng.uniform(0, 1, size=(n_points, 3)) * ROOM
    axis = face // 2
    xyz[np.arange(n_points), axis] = np.where(face % 2 == 0, 0.0, ROOM[axis])
    return xyz.astype(np.float32)


def camera_poses(n_frames: int) -> np.ndarray:
    """(F, 4, 4) float64 camera-to-world (OpenCV axes) along a loop inside the room."""
    t = np.linspace(0, 2 * np.pi, n_frames, endpoint=False)
    centre = np.stack([3.5 + 2.0 * np.cos(t), 2.5 + 1.5 * np.sin(t), 1.3 + 0.3 * np.sin(3 * t)],
                      axis=1)
    yaw, pitch = 3 * t, -0.3 + 0.2 * np.sin(5 * t)
    forward = np.stack([np.cos(yaw) * np.cos(pitch), np.sin(yaw) * np.cos(pitch), np.sin(pitch)],
                       axis=1)
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right, axis=1, keepdims=True)
    down = np.cross(forward, right)
    poses = np.tile(np.eye(4), (n_frames, 1, 1))
    poses[:, :3, 0], poses[:, :3, 1], poses[:, :3, 2] = right, down, forward
    poses[:, :3, 3] = centre
    return poses


CAST_STEP = 4
"""Depth is ray-cast at every 4th pixel of each row and column (160x120 rays) and each value
repeated over its 4x4 block: exact at those pixels, and 16 times less to compute for 2,000
frames (the data path's work does not depend on the values)."""


def _pixel_rays() -> np.ndarray:
    """(h / CAST_STEP * w / CAST_STEP, 3) float32 camera-frame rays through the centres of the
    depth pixels that are ray-cast, z = 1."""
    height, width = DEPTH_SIZE
    u, v = np.meshgrid(np.arange(0, width, CAST_STEP, dtype=np.float32),
                       np.arange(0, height, CAST_STEP, dtype=np.float32))
    return np.stack([(u - INTRINSIC_DEPTH[0, 2]) / INTRINSIC_DEPTH[0, 0],
                     (v - INTRINSIC_DEPTH[1, 2]) / INTRINSIC_DEPTH[1, 1],
                     np.ones_like(u)], axis=-1).reshape(-1, 3).astype(np.float32)


def room_depth(pose: np.ndarray, rays: np.ndarray | None = None) -> np.ndarray:
    """(480, 640) uint16 millimetres: the distance along the optical axis to the room's box
    (the first face each ray meets), ray-cast every CAST_STEP pixels. rays: `_pixel_rays()`."""
    rays = _pixel_rays() if rays is None else rays
    world = rays @ pose[:3, :3].T.astype(np.float32)
    origin = pose[:3, 3].astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        steps = (np.where(world > 0, ROOM.astype(np.float32), np.float32(0)) - origin) / world
    steps[~(steps > 0)] = np.inf  # parallel to a face, or behind
    depth = np.clip(np.rint(steps.min(axis=1) * 1000), 0, 65535).astype(np.uint16)
    height, width = DEPTH_SIZE
    depth = depth.reshape(height // CAST_STEP, width // CAST_STEP)
    return np.repeat(np.repeat(depth, CAST_STEP, axis=0), CAST_STEP, axis=1)


def write_scene(store_path: Path, n_points: int, n_frames: int, seed: int = 0,
                batch: int = 50) -> tuple[str, str]:
    """Write the scene and its feature set into a new store; (scene id, feature set id)."""
    from pipeline.readers.base import Points
    from storage import open_store

    rng = np.random.default_rng(seed)
    store = open_store(store_path, mode="a")
    featureset = store.register_featureset(DESCRIPTION)
    scene_id = "scene0000_00"
    xyz = room_points(n_points, rng)
    store.create_scene(
        scene_id, frame_id=np.arange(n_frames, dtype=np.int64), intrinsic_color=INTRINSIC_COLOR,
        intrinsic_depth=INTRINSIC_DEPTH, color_size=COLOR_SIZE, depth_size=DEPTH_SIZE,
        depth_scale=0.001,
        points=lambda: Points(xyz, np.full((n_points, 3), 128, np.uint8),
                              rng.integers(0, 20, n_points).astype(np.int16),
                              np.full(n_points, -1, np.int32), np.zeros(n_points, np.int32)))
    store.create_features(scene_id, featureset, tuple(DESCRIPTION["grid_size"]),
                          DESCRIPTION["spatial_dim"], DESCRIPTION["global_dim"])
    poses = camera_poses(n_frames)
    rays = _pixel_rays()
    for start in range(0, n_frames, batch):
        positions = list(range(start, min(start + batch, n_frames)))
        store.write_frames(scene_id, positions, pose=poses[positions],
                           valid=np.ones(len(positions), bool), reason=[""] * len(positions),
                           depth=np.stack([room_depth(poses[p], rays) for p in positions]))
        store.write_features(
            scene_id, featureset, positions,
            spatial=rng.standard_normal((len(positions), 14, 14, 512), np.float32),
            global_=rng.standard_normal((len(positions), 512), np.float32))
    return scene_id, featureset


def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def bench_scannet_scale(work: Path, repeats: int, quick: bool, device: str = "cpu") -> dict:
    from model.dataset import CachedScenes, projection_memory_bound
    from storage import open_store

    size = QUICK if quick else FULL
    store_path = work / f"scannet-scale-{size['points']}-{size['frames']}.zarr"
    start = time.perf_counter()
    if not store_path.exists():  # written once per work folder, then renamed: never half
        partial = store_path.with_suffix(".partial")
        shutil.rmtree(partial, ignore_errors=True)
        write_scene(partial, size["points"], size["frames"])
        partial.rename(store_path)
    write_seconds = time.perf_counter() - start
    store = open_store(store_path)
    (featureset,) = store.featuresets()
    scene_id = store.scenes()[0]
    loader = CachedScenes({scene_id: store}, featureset, torch.device(device), cache_bytes=0)
    seconds, peaks = [], []
    sample = None
    linux = Path("/proc/self/clear_refs").exists()
    for _ in range(repeats):
        sample = None
        before = _rss_mb("VmRSS") if linux else 0.0
        if linux:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        begin = time.perf_counter()
        sample = loader.load(scene_id)
        seconds.append(time.perf_counter() - begin)
        if linux:
            peaks.append(_rss_mb("VmHWM") - before)
    seen = float(sample.seen.float().mean())
    bound = projection_memory_bound(size["points"], size["frames"], DESCRIPTION["spatial_dim"],
                                    DESCRIPTION["global_dim"]) / 2**20
    store_bytes = sum(p.stat().st_size for p in store_path.rglob("*") if p.is_file())
    return {
        "points": size["points"], "frames": size["frames"], "repeats": repeats,
        "seconds": statistics.median(seconds), "seconds_min": min(seconds),
        "seconds_max": max(seconds),
        "frames_per_s": size["frames"] / statistics.median(seconds),
        "peak_above_start_mb": statistics.median(peaks) if peaks else None,
        "bound_mb": bound, "seen_fraction": seen,
        "store_mb": store_bytes / 2**20, "write_seconds": write_seconds,
    }
