"""Projection as training uses it: `pipeline.projection.fuse_features` (chunks of views, each
view's feature grid sampled at the points it sees into per-point accumulators) against the
per-view numpy loop of OpenScene's fusion script doing the same (`fuse_loop_numpy`), same
scene, same arrays in memory.

The two must give the same answer, and the benchmark checks it before timing: the same view
count per point on all but a few pairs at the depth test's threshold (float32 against the
loop's float64), and the same fused features where the counts agree. Peak memory: each
function's peak resident memory above the memory before it (Linux; VmHWM reset first), beside
the bound `CachedScenes.load` promises (model.dataset.projection_memory_bound).
"""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np
import torch

from benchmarks.backbone import _at_threads, _interleaved, _thread_counts
from pipeline.projection import (
    DEPTH_THRESHOLD,
    MIN_Z,
    RELATIVE_THRESHOLD,
    GridMapping,
    fuse_features,
)


def fuse_loop_numpy(points: np.ndarray, cam_to_world: np.ndarray, intrinsic_depth: np.ndarray,
                    depth: np.ndarray, intrinsic_color: np.ndarray, spatial: np.ndarray,
                    mapping: GridMapping, *, depth_scale: float = 0.001,
                    depth_threshold: float = DEPTH_THRESHOLD,
                    relative_threshold: float = RELATIVE_THRESHOLD
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Reference: `fuse_features` one view at a time in numpy, as OpenScene's fusion script.

    points (N, 3), cam_to_world (V, 4, 4), intrinsic_depth and intrinsic_color (3, 3),
    depth (V, h, w) in depth_scale metres, spatial (V, gh, gw, C): as `fuse_features`.
    Visibility as `project_loop_numpy` (float64, a general inverse of the pose); the colour
    pixel mapped onto the grid as `GridMapping`; bilinear sampling with border padding
    (`grid_sample`'s align_corners=False). Returns (features (N, C) float32 mean over the
    views that see each point, zeros where none; count (N,) int32).
    """
    n_views, height, width = depth.shape
    (color_h, color_w), (input_h, input_w) = mapping.color_size, mapping.input_size
    if mapping.resize == "squash":
        scale_x, scale_y, offset_x, offset_y = input_w / color_w, input_h / color_h, 0.0, 0.0
    else:
        scale_x = scale_y = max(input_h / color_h, input_w / color_w)
        offset_x, offset_y = (color_w * scale_x - input_w) / 2, (color_h * scale_y - input_h) / 2
    grid_h, grid_w = spatial.shape[1:3]
    homogeneous = np.concatenate([points, np.ones((len(points), 1))], axis=1).T
    feature_sum = np.zeros((len(points), spatial.shape[-1]), dtype=np.float64)
    count = np.zeros(len(points), dtype=np.int32)
    kd, kc = intrinsic_depth[:3, :3], intrinsic_color[:3, :3]
    for view in range(n_views):
        if not np.isfinite(cam_to_world[view]).all():
            continue
        camera = np.linalg.inv(cam_to_world[view].astype(np.float64)) @ homogeneous
        with np.errstate(divide="ignore", invalid="ignore"):
            u = camera[0] * kd[0, 0] / camera[2] + kd[0, 2]
            v = camera[1] * kd[1, 1] / camera[2] + kd[1, 2]
            uc = camera[0] * kc[0, 0] / camera[2] + kc[0, 2]
            vc = camera[1] * kc[1, 1] / camera[2] + kc[1, 2]
        column, row = np.round(u), np.round(v)
        mask = (camera[2] > MIN_Z) & (column >= 0) & (column < width) & (row >= 0) & (row < height)
        d = depth[view][row[mask].astype(int), column[mask].astype(int)] * depth_scale
        tolerance = np.maximum(depth_threshold, relative_threshold * d)
        mask[mask] = (d > 0) & (np.abs(camera[2][mask] - d) <= tolerance)
        x = (uc + 0.5) * scale_x - offset_x  # input edge coordinates
        y = (vc + 0.5) * scale_y - offset_y
        mask &= (x >= 0) & (x < input_w) & (y >= 0) & (y < input_h)
        seen = np.flatnonzero(mask)
        # grid_sample, align_corners=False: cell centres at (i + 0.5) / g of the input
        gx = np.clip(x[seen] / input_w * grid_w - 0.5, 0, grid_w - 1)
        gy = np.clip(y[seen] / input_h * grid_h - 0.5, 0, grid_h - 1)
        x0, y0 = np.floor(gx).astype(int), np.floor(gy).astype(int)
        x1, y1 = np.minimum(x0 + 1, grid_w - 1), np.minimum(y0 + 1, grid_h - 1)
        wx, wy = (gx - x0)[:, None], (gy - y0)[:, None]
        grid = spatial[view].astype(np.float32)
        sampled = ((1 - wy) * ((1 - wx) * grid[y0, x0] + wx * grid[y0, x1])
                   + wy * ((1 - wx) * grid[y1, x0] + wx * grid[y1, x1]))
        feature_sum[seen] += sampled
        count[seen] += 1
    features = (feature_sum / np.maximum(count, 1)[:, None]).astype(np.float32)
    return features, count


def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def peak_above_mb(function) -> float | None:
    """Peak resident memory of `function()` above the memory before it, MiB (Linux); None
    elsewhere."""
    if not Path("/proc/self/clear_refs").exists():
        return None
    before = _rss_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    function()
    return _rss_mb("VmHWM") - before


def scene_arrays(store_path: str) -> tuple[dict, GridMapping]:
    """The first scene of a store, every array in memory as the training path passes them."""
    from storage import open_store

    store = open_store(store_path)
    (featureset, spec), = store.featuresets().items()
    scene_id = store.scenes()[0]
    scene = store.scene(scene_id)
    usable = scene.valid
    spatial = store.features(scene_id, featureset).spatial[usable]
    mapping = GridMapping.for_featureset(spec, scene.color_size)
    arrays = {"points": scene.xyz, "cam_to_world": scene.pose[usable],
              "intrinsic_depth": scene.intrinsic_depth, "depth": scene.depth[usable],
              "intrinsic_color": scene.intrinsic_color, "spatial": spatial,
              "depth_scale": scene.depth_scale}
    return arrays, mapping


def bench_fuse_features(arrays: dict, mapping: GridMapping, repeats: int) -> dict:
    a = arrays
    tensors = {"points": torch.as_tensor(a["points"], dtype=torch.float32),
               "cam_to_world": torch.as_tensor(a["cam_to_world"], dtype=torch.float32),
               "intrinsic_depth": torch.as_tensor(a["intrinsic_depth"], dtype=torch.float32),
               "intrinsic_color": torch.as_tensor(a["intrinsic_color"], dtype=torch.float32)}

    def vectorised():
        return fuse_features(tensors["points"], tensors["cam_to_world"],
                             tensors["intrinsic_depth"], a["depth"], tensors["intrinsic_color"],
                             a["spatial"], mapping, depth_scale=a["depth_scale"],
                             return_visibility=True, max_view_points=20000)

    def loop():
        return fuse_loop_numpy(a["points"], a["cam_to_world"], a["intrinsic_depth"], a["depth"],
                               a["intrinsic_color"], a["spatial"], mapping,
                               depth_scale=a["depth_scale"])

    fused = vectorised()
    features, count = loop()
    fast_count = fused.count.numpy()
    agree = fast_count == count
    difference = float(np.abs(fused.features.numpy()[agree] - features[agree]).max())
    count_agreement = float(agree.mean())
    assert count_agreement > 0.999, f"view counts differ on {100 * (1 - count_agreement):.2f}%"
    assert difference < 1e-3, f"fused features differ by {difference}"
    functions = {"fuse_features": vectorised, "loop": loop}
    rows = []
    for threads in _thread_counts():  # torch's count, then one thread (the loop is numpy's)
        seconds = _at_threads(threads, lambda: {
            name: run["wall"] for name, run in _interleaved(functions, repeats).items()})
        ratios = [slow / fast for fast, slow in zip(seconds["fuse_features"], seconds["loop"])]
        rows.append({"threads": threads,
                     "fuse_features_s": statistics.median(seconds["fuse_features"]),
                     "fuse_features_spread": _spread(seconds["fuse_features"]),
                     "loop_s": statistics.median(seconds["loop"]),
                     "loop_spread": _spread(seconds["loop"]),
                     "ratio": statistics.median(ratios), "ratio_min": min(ratios),
                     "ratio_max": max(ratios)})
    n_points, n_views = len(a["points"]), len(a["cam_to_world"])
    from model.dataset import projection_memory_bound

    spatial_dim = a["spatial"].shape[-1]
    return {
        "points": n_points, "views": n_views, "channels": int(spatial_dim), "repeats": repeats,
        "ratio": rows[0]["ratio"], "ratio_min": rows[0]["ratio_min"],
        "ratio_max": rows[0]["ratio_max"],
        "ratio_one_thread": rows[-1]["ratio"] if len(rows) > 1 else None,
        "what": "seconds of the per-view numpy loop over fuse_features, same scene and answer "
                "(bigger is better), at torch's thread count",
        "threads": rows, "count_agreement": count_agreement,
        "max_feature_difference": difference,
        "fuse_features_peak_mb": peak_above_mb(vectorised), "loop_peak_mb": peak_above_mb(loop),
        "bound_mb": projection_memory_bound(n_points, n_views, int(spatial_dim), 1) / 2**20,
    }


def _spread(seconds: list[float]) -> list[float]:
    return [min(seconds), max(seconds)]
