"""Point-to-view projection: which views see a point, where, and the CLIP features they give it.

Conventions (ScanNet / OpenScene):

- `cam_to_world` (4, 4) maps camera coordinates to world coordinates. Camera frame is OpenCV's:
  x right, y down, z forward, metres. Poses are rigid (rotation + translation), so the inverse
  is `R^T (p - t)`, cheaper and better conditioned than a general 4x4 inverse.
- Pixel coordinates: u is the column, v the row, u = fx * x / z + cx. Integer u is the *centre*
  of pixel column u, so a point belongs to pixel `round(u)` (round half to even, as numpy and
  torch both do and OpenScene relies on). Pixel column u spans the edges [u - 0.5, u + 0.5].
- Depth maps are (H, W) in units of `depth_scale` metres (ScanNet: uint16 millimetres, 0.001);
  0 means no reading.

Everything here runs under `torch.no_grad()`: poses, depth and the cached CLIP features are
constants of the dataset, and no gradient must ever reach them (the reason the features are
cached at all). The device follows `points`; per-view inputs (depth, features) are moved there
one chunk of views at a time, so they may stay on the CPU, or even be lazy arrays (zarr).

Memory is bounded by the chunk, not by views x points: views are projected a chunk at a time
(as many as fit in WORKING_BYTES of working memory) into per-point accumulators, so
`fuse_features` holds (N, C) sums, (N,) counts and one chunk's intermediates whatever the
number of views. Only `project`, which returns every view's pixels, is (V, N) by nature;
`project_chunks` streams the same results.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

DEPTH_THRESHOLD = 0.05
"""Absolute depth tolerance, metres. ScanNet's mesh (vh_clean_2, from BundleFusion's TSDF and
decimation) and a single frame's depth disagree by a few centimetres from pose drift and the
reconstruction itself; and with nearest-pixel lookup, a surface at an angle changes depth across
the half pixel between the point's ray and the pixel centre. 5 cm covers both at ScanNet's
0.5-2.5 m working range while still rejecting points behind a surface more than 5 cm thick."""

RELATIVE_THRESHOLD = 0.02
"""Depth tolerance relative to the measured depth. Structured-light (Kinect/Structure sensor)
noise grows roughly quadratically with depth (sigma ~ 1.4e-3 * d^2 m: 2.3 cm at 4 m), so a
fixed tolerance that fits 1 m rejects true points at 4 m; 2% of d exceeds the 5 cm floor beyond
2.5 m and is 8 cm (~3.5 sigma) at 4 m. OpenScene uses |z - d| <= 0.25 * d, which at 3 m accepts
points 75 cm behind the visible surface; ours is the tighter, noise-shaped choice."""

MIN_Z = 1e-4
"""Points closer to the camera plane than this (metres) count as behind it; also keeps the
perspective division finite."""

WORKING_BYTES = 256 * 2**20
"""Working memory of one chunk of views: the default chunk holds as many views as fit in it
(at least 1, at most MAX_VIEW_CHUNK)."""

BYTES_PER_VIEW_POINT = 96
"""Peak working memory per view and point of a chunk (camera coordinates, pixels, depth
lookup and visibility masks of `_visible`, the colour pixels and grid coordinates of
`fuse_features`): measured 81 bytes on CPU (peak resident memory of 4-view against 1-view
chunks of 2M points), rounded up."""

MAX_VIEW_CHUNK = 64
"""Views projected at once at most: beyond it the per-chunk overhead is already negligible."""

RIGID_TOLERANCE = 1e-3
"""Largest |R^T R - I| entry (and deviation of the last row from 0 0 0 1) of a pose taken as
rigid. ScanNet's poses are printed with 6 decimals (entries round by 5e-7); a pose 0.1%
off a rotation displaces a point 1 m away by about 1 mm, beyond that it is not a camera pose."""


def view_chunk_for(n_points: int, per_view_bytes: int = 0) -> int:
    """Views per chunk so that one chunk's working memory stays under WORKING_BYTES: n_points
    points cost BYTES_PER_VIEW_POINT each per view, plus `per_view_bytes` of inputs a view."""
    per_view = n_points * BYTES_PER_VIEW_POINT + per_view_bytes
    return int(min(MAX_VIEW_CHUNK, max(1, WORKING_BYTES // max(1, per_view))))


def pose_problem(cam_to_world: Any) -> str:
    """Why a camera-to-world pose cannot be used, or "" when it is a finite rigid transform.

    cam_to_world: (4, 4). Projection inverts poses as R^T (p - t), which holds only for a
    rotation R; an all-zero pose (a placeholder some exports write), a scaled, sheared or
    mirrored matrix, or a last row other than 0 0 0 1 would put points at wrong pixels.
    """
    pose = np.asarray(cam_to_world, dtype=np.float64)
    if pose.shape != (4, 4):
        return f"not a 4x4 matrix ({'x'.join(map(str, pose.shape))})"
    if not np.isfinite(pose).all():
        return "not finite"
    if not pose.any():
        return "all zero"
    if np.abs(pose[3] - (0.0, 0.0, 0.0, 1.0)).max() > RIGID_TOLERANCE:
        return "not a rigid transform (last row is not 0 0 0 1)"
    rotation = pose[:3, :3]
    error = np.abs(rotation.T @ rotation - np.eye(3)).max()
    if error > RIGID_TOLERANCE:
        return f"not a rigid transform (rotation part off orthonormal by {error:.2g})"
    if np.linalg.det(rotation) < 0:
        return "not a rigid transform (a reflection)"
    return ""


def rigid_poses(cam_to_world: Any) -> np.ndarray:
    """(V,) bool: which of (V, 4, 4) poses `pose_problem` accepts."""
    return np.array([not pose_problem(pose) for pose in np.asarray(cam_to_world)], dtype=bool)


@torch.no_grad()
def project(
    points: Tensor,
    cam_to_world: Any,
    intrinsic: Any,
    depth: Any,
    *,
    depth_scale: float = 0.001,
    depth_threshold: float = DEPTH_THRESHOLD,
    relative_threshold: float = RELATIVE_THRESHOLD,
    border: int = 0,
    view_chunk: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Project points into every view and test their visibility against the depth maps.

    points: (N, 3) float, metres, world frame. Its device is the device of the computation.
    cam_to_world: (V, 4, 4) float tensor or numpy array, rigid camera-to-world poses (OpenCV
        camera axes), metres; used in float32. A pose with a non-finite entry sees nothing.
    intrinsic: (3, 3) shared or (V, 3, 3) per view, pinhole intrinsics of the depth image,
        pixels (fx, fy, cx, cy used; a (..., 4, 4) ScanNet matrix works too).
    depth: (V, H, W) depth maps, uint16 or float, in units of `depth_scale` metres, 0 = no
        reading. A tensor on any device, a numpy or a zarr array: sliced one chunk at a time.

    A point is visible in a view when all hold:
      - z > MIN_Z in the camera frame (in front of the camera);
      - its nearest pixel (round(u), round(v)) lies inside the image, at least `border` pixels
        from every edge;
      - the depth d at that pixel is a reading (d > 0);
      - |z - d| <= max(depth_threshold, relative_threshold * d) (not occluded).
    Nearest-pixel lookup (no depth interpolation) is OpenScene's choice and avoids blending
    depth across occlusion edges, where an interpolated depth belongs to neither surface.

    view_chunk: views projected at once; None: as many as fit in WORKING_BYTES.

    Returns:
      uv: (V, N, 2) float32, (u, v) pixel coordinates in the depth image; meaningful only where
          visible (points behind the camera get mirrored coordinates, bad poses NaN).
      visible: (V, N) bool.
    Both are V x N: for many views of many points, stream them with `project_chunks`.
    """
    n_points = points.shape[0]
    uv_chunks = [torch.zeros(0, n_points, 2, device=points.device)]
    visible_chunks = [torch.zeros(0, n_points, dtype=torch.bool, device=points.device)]
    for _, _, _, uv, visible in project_chunks(
            points, cam_to_world, intrinsic, depth, depth_scale=depth_scale,
            depth_threshold=depth_threshold, relative_threshold=relative_threshold,
            border=border, view_chunk=view_chunk):
        uv_chunks.append(uv)
        visible_chunks.append(visible)
    return torch.cat(uv_chunks), torch.cat(visible_chunks)


@torch.no_grad()
def project_chunks(
    points: Tensor,
    cam_to_world: Any,
    intrinsic: Any,
    depth: Any,
    *,
    depth_scale: float = 0.001,
    depth_threshold: float = DEPTH_THRESHOLD,
    relative_threshold: float = RELATIVE_THRESHOLD,
    border: int = 0,
    view_chunk: int | None = None,
) -> Iterator[tuple[int, int, Tensor, Tensor, Tensor]]:
    """`project`, a chunk of views at a time: yields (start, stop, camera, uv, visible) for
    views start:stop, with camera (c, N, 3) float32 camera-frame points, uv (c, N, 2) and
    visible (c, N) as in `project`. Arguments as in `project`; only `depth[start:stop]` is read
    per chunk, so memory is one chunk's whatever the number of views."""
    if view_chunk is None:
        view_chunk = view_chunk_for(points.shape[0], _per_view_bytes(depth))
    for start, stop in _chunks(cam_to_world.shape[0], view_chunk):
        camera = _to_camera(points, cam_to_world[start:stop])
        uv = _pixels(camera, _view_intrinsics(intrinsic, start, stop, points.device))
        depth_raw = _depth_on(depth[start:stop], points.device)
        visible = _visible(camera[..., 2], uv, depth_raw, depth_scale, depth_threshold,
                           relative_threshold, border)
        yield start, stop, camera, uv, visible
        del camera, uv, depth_raw, visible
        if points.device.type == "cpu":
            _release_freed_memory()


def _release_freed_memory() -> None:
    """Hand the memory freed by a chunk back to the system. glibc's malloc keeps freed blocks
    below its mmap threshold (which it raises up to 32 MB after large frees) in the heap, and
    chunks of slightly different sizes do not fit each other's holes: without this, resident
    memory grew with the number of views (+190 MB from 8 to 48 views of 2M points, +450 MB
    at 200). No-op where libc has no malloc_trim."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _malloc_trim()


@dataclass(frozen=True)
class GridMapping:
    """How a colour frame became the model input, hence how colour pixels land on the feature grid.

    color_size: (Hc, Wc) of the colour frame, pixels.
    input_size: (H_in, W_in) of the model input, pixels.
    grid_size: (gh, gw) of the spatial feature grid: (H_in / patch, W_in / patch).
    resize: "squash": the whole colour frame resized to H_in x W_in (aspect not kept);
        "crop": open_clip's preprocess: scale by s = max(H_in / Hc, W_in / Wc) so the shorter
        side fits, then centre-crop H_in x W_in. The resize is modelled as continuous; the
        integer rounding of the resized size in torchvision moves pixels by < 1 input pixel,
        i.e. less than 1/patch of a grid cell.

    The feature grid covers the model input exactly (cell edges on input pixel edges), which is
    why the mapping goes through edge coordinates: colour pixel centre u -> edge coordinate
    u + 0.5 in [0, Wc] -> input edge coordinate x' = (u + 0.5) * s_x - offset_x in [0, W_in] ->
    normalised 2 x' / W_in - 1 in [-1, 1], which is what `F.grid_sample(align_corners=False)`
    means by the grid's outer edges, whatever gw is.
    """

    color_size: tuple[int, int]
    input_size: tuple[int, int]
    grid_size: tuple[int, int]
    resize: Literal["squash", "crop"]

    def __post_init__(self) -> None:
        if self.resize not in ("squash", "crop"):
            raise ValueError(f"resize must be 'squash' or 'crop', got {self.resize!r}")
        if min(*self.color_size, *self.input_size, *self.grid_size) <= 0:
            raise ValueError(f"sizes must be positive: {self}")

    @classmethod
    def for_featureset(cls, spec, color_size: tuple[int, int]) -> GridMapping:
        """The mapping of a feature set (a storage.featureset.FeatureSetSpec: its input size,
        grid and resize policy) for colour frames of `color_size` (Hc, Wc) pixels."""
        return cls(color_size=(int(color_size[0]), int(color_size[1])),
                   input_size=tuple(spec.image_size), grid_size=tuple(spec.grid_size),
                   resize=spec.resize)

    def color_to_grid(self, uv: Tensor) -> tuple[Tensor, Tensor]:
        """Map colour pixel coordinates onto the feature grid.

        uv: (..., 2) float, (u, v) colour pixel coordinates (integer = pixel centre).
        Returns:
          grid_uv: (..., 2) float32 in [-1, 1] where inside, normalised (x, y) for
              `F.grid_sample(align_corners=False)`.
          inside: (...) bool, the point falls on the model input: inside the colour frame
              and, for "crop", not in the cropped-away bands. NaN coordinates are outside.
        """
        (color_h, color_w), (input_h, input_w) = self.color_size, self.input_size
        if self.resize == "squash":
            scale_x, scale_y = input_w / color_w, input_h / color_h
            offset_x = offset_y = 0.0
        else:
            scale_x = scale_y = max(input_h / color_h, input_w / color_w)
            offset_x = (color_w * scale_x - input_w) / 2
            offset_y = (color_h * scale_y - input_h) / 2
        x = (uv[..., 0].float() + 0.5) * scale_x - offset_x
        y = (uv[..., 1].float() + 0.5) * scale_y - offset_y
        # Half-open, like rounding to a pixel: edge coordinate W_in belongs to no pixel.
        inside = (x >= 0) & (x < input_w) & (y >= 0) & (y < input_h)
        grid_uv = torch.stack((2 * x / input_w - 1, 2 * y / input_h - 1), dim=-1)
        return grid_uv, inside


@dataclass(frozen=True)
class FusedFeatures:
    """Per-point 2D features averaged over the views that see each point.

    features: (N, C) float32, mean of the bilinearly sampled features over seeing views;
        zeros where count == 0 (check `seen`, a zero is not a feature). A transposed view of
        the (C, N) accumulator, not a copy (copying it would double the peak memory).
    count: (N,) int32, number of views that see the point.
    seen: (N,) bool, count > 0.
    view_pairs: (2, M) int64 (view, point) pairs of which view sees which point (after the
        crop test), view-major and points ascending as `view_visible.nonzero()` gives them, or
        None unless asked for; the CLIP consistency loss pools per view with them. With
        `max_view_points`, a view seeing more points keeps a fixed random subset of them.
    n_views: V, the number of views projected.
    """

    features: Tensor
    count: Tensor
    seen: Tensor
    view_pairs: Tensor | None = None
    n_views: int = 0

    @property
    def view_visible(self) -> Tensor | None:
        """(V, N) bool, dense `view_pairs` (for small scenes and tests; V x N bytes)."""
        if self.view_pairs is None:
            return None
        dense = torch.zeros(self.n_views, self.count.shape[0], dtype=torch.bool,
                            device=self.count.device)
        dense[self.view_pairs[0], self.view_pairs[1]] = True
        return dense


@torch.no_grad()
def fuse_features(
    points: Tensor,
    cam_to_world: Any,
    intrinsic_depth: Any,
    depth: Any,
    intrinsic_color: Any,
    spatial: Any,
    mapping: GridMapping,
    *,
    depth_scale: float = 0.001,
    depth_threshold: float = DEPTH_THRESHOLD,
    relative_threshold: float = RELATIVE_THRESHOLD,
    border: int = 0,
    view_chunk: int | None = None,
    return_visibility: bool = False,
    max_view_points: int | None = None,
) -> FusedFeatures:
    """Sample each view's spatial feature grid at the points it sees and average over views.

    points, cam_to_world, intrinsic_depth, depth and the thresholds: as in `project`, which
        decides visibility in the depth image.
    intrinsic_color: (3, 3) or (V, 3, 3) pinhole intrinsics of the colour image, pixels. Colour
        and depth share the pose (ScanNet's export registers them), so only intrinsics differ.
    spatial: (V, gh, gw, C) features, any float dtype (float16 from the store; computed in
        float32); a tensor on any device, a numpy or a zarr array, sliced per chunk.
    mapping: how colour pixels map onto the grid; a point visible in depth but outside the
        colour frame or the crop is not seen by that view.
    view_chunk: views projected at once; None: as many as fit in WORKING_BYTES.
    return_visibility: also return the (view, point) pairs; max_view_points: keep at most
        that many points per view among them (a fixed random subset, the same on every call),
        so that they take V x max_view_points, not V x N.

    Sampling is bilinear (`grid_sample`, align_corners=False, border padding: a point in the
    outer half cell takes the edge cell's value rather than fading towards zero).
    Returns FusedFeatures on the device of `points`; nothing in it requires grad.
    """
    n_points = points.shape[0]
    device = points.device
    # Channels-first, (C, N): each view's samples come out of grid_sample as (C, n) and add
    # in as columns without a transpose (3x faster than (N, C) rows on CPU).
    feature_sum = torch.zeros(spatial.shape[-1], n_points, dtype=torch.float32, device=device)
    count = torch.zeros(n_points, dtype=torch.int32, device=device)
    pair_chunks = [torch.zeros(2, 0, dtype=torch.int64, device=device)]
    if view_chunk is None:
        view_chunk = view_chunk_for(n_points, _per_view_bytes(depth) + _per_view_bytes(spatial, 6))
    for start, stop, camera, _, visible in project_chunks(
            points, cam_to_world, intrinsic_depth, depth, depth_scale=depth_scale,
            depth_threshold=depth_threshold, relative_threshold=relative_threshold,
            border=border, view_chunk=view_chunk):
        uv_color = _pixels(camera, _view_intrinsics(intrinsic_color, start, stop, device))
        grid_uv, inside = mapping.color_to_grid(uv_color)
        del uv_color
        visible &= inside
        count += visible.sum(dim=0, dtype=torch.int32)
        if return_visibility:
            pair_chunks.append(_pairs(visible, start, max_view_points))

        grids = torch.as_tensor(spatial[start:stop]).to(device=device, dtype=torch.float32)
        grids = grids.permute(0, 3, 1, 2)
        for view in range(stop - start):
            # Only the points this view sees are sampled: work and memory scale with them,
            # not with N. Visible implies finite coordinates, so no NaN reaches grid_sample.
            seen_here = visible[view].nonzero().squeeze(1)
            if seen_here.numel() == 0:
                continue
            sampled = F.grid_sample(grids[view:view + 1], grid_uv[view, seen_here][None, None],
                                    mode="bilinear", padding_mode="border", align_corners=False)
            feature_sum.index_add_(1, seen_here, sampled[0, :, 0])

    features = feature_sum.div_(count.clamp(min=1).float()).T  # in place: no second (N, C)
    view_pairs = torch.cat(pair_chunks, dim=1) if return_visibility else None
    return FusedFeatures(features=features, count=count, seen=count > 0,
                         view_pairs=view_pairs, n_views=int(cam_to_world.shape[0]))


def _pairs(visible: Tensor, start: int, max_view_points: int | None) -> Tensor:
    """(2, m) int64 (view, point) pairs of a chunk's (c, N) visibility, views offset by
    `start`; a view seeing more than `max_view_points` points keeps a random subset of them,
    seeded by its view index (the same whatever the chunking), in ascending point order."""
    view, point = visible.nonzero(as_tuple=True)
    if max_view_points is not None:
        counts = torch.bincount(view, minlength=visible.shape[0]).tolist()
        if max(counts, default=0) > max_view_points:
            keep, offset = [], 0
            for index, n in enumerate(counts):
                if n > max_view_points:
                    generator = torch.Generator().manual_seed(start + index)
                    chosen = torch.randperm(n, generator=generator)[:max_view_points]
                    keep.append(offset + chosen.sort().values.to(view.device))
                else:
                    keep.append(torch.arange(offset, offset + n, device=view.device))
                offset += n
            keep = torch.cat(keep)
            view, point = view[keep], point[keep]
    return torch.stack((view + start, point))


def project_loop_numpy(
    points: np.ndarray,
    cam_to_world: np.ndarray,
    intrinsic: np.ndarray,
    depth: np.ndarray,
    *,
    depth_scale: float = 0.001,
    depth_threshold: float = DEPTH_THRESHOLD,
    relative_threshold: float = RELATIVE_THRESHOLD,
    border: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Reference: `project` as OpenScene's fusion script does it, one view at a time in numpy.

    Same arguments and results as `project`, as numpy arrays; float64 arithmetic, a general
    4x4 inverse of the pose, and non-finite poses skipped. Used by the benchmarks and to check
    `project` against an independent implementation.
    """
    n_views, height, width = depth.shape
    intrinsics = np.broadcast_to(intrinsic[..., :3, :3], (n_views, 3, 3))
    homogeneous = np.concatenate([points, np.ones((len(points), 1))], axis=1).T
    uv = np.full((n_views, len(points), 2), np.nan, dtype=np.float32)
    visible = np.zeros((n_views, len(points)), dtype=bool)
    for view in range(n_views):
        if not np.isfinite(cam_to_world[view]).all():
            continue
        camera = np.linalg.inv(cam_to_world[view].astype(np.float64)) @ homogeneous
        k = intrinsics[view]
        with np.errstate(divide="ignore", invalid="ignore"):
            u = camera[0] * k[0, 0] / camera[2] + k[0, 2]
            v = camera[1] * k[1, 1] / camera[2] + k[1, 2]
        uv[view] = np.stack([u, v], axis=1)
        column, row = np.round(u), np.round(v)
        mask = ((camera[2] > MIN_Z) & (column >= border) & (column < width - border)
                & (row >= border) & (row < height - border))
        d = depth[view][row[mask].astype(int), column[mask].astype(int)] * depth_scale
        z = camera[2][mask]
        tolerance = np.maximum(depth_threshold, relative_threshold * d)
        mask[mask] = (d > 0) & (np.abs(z - d) <= tolerance)
        visible[view] = mask
    return uv, visible


def _per_view_bytes(per_view: Any, bytes_per_value: int = 10) -> int:
    """Working bytes of one view's input array (depth map or feature grid): the stored value
    and its float32 and index copies, about `bytes_per_value` per value."""
    shape = getattr(per_view, "shape", ())
    return int(np.prod(shape[1:])) * bytes_per_value if len(shape) > 1 else 0


def _chunks(n_views: int, view_chunk: int) -> list[tuple[int, int]]:
    if view_chunk < 1:
        raise ValueError(f"view_chunk must be >= 1, got {view_chunk}")
    return [(start, min(start + view_chunk, n_views)) for start in range(0, n_views, view_chunk)]


def _to_camera(points: Tensor, cam_to_world: Any) -> Tensor:
    """(N, 3) world points, (c, 4, 4) poses -> (c, N, 3) float32 camera-frame points."""
    pose = torch.as_tensor(cam_to_world).to(device=points.device, dtype=torch.float32)
    rotation, translation = pose[:, :3, :3], pose[:, :3, 3]
    # Row vectors: (p - t) @ R is R^T (p - t), the rigid inverse.
    return (points.float()[None] - translation[:, None, :]) @ rotation


def _view_intrinsics(intrinsic: Any, start: int, stop: int, device: torch.device) -> Tensor:
    """(3, 3) or (V, 3, 3) (or 4x4) -> (c, 3, 3) float32 for views start:stop."""
    k = torch.as_tensor(intrinsic)[..., :3, :3].to(device=device, dtype=torch.float32)
    return k.expand(stop - start, 3, 3) if k.ndim == 2 else k[start:stop]


def _pixels(camera: Tensor, intrinsic: Tensor) -> Tensor:
    """(c, N, 3) camera points, (c, 3, 3) intrinsics -> (c, N, 2) float32 (u, v) pixels."""
    fx, fy = intrinsic[:, 0, 0, None], intrinsic[:, 1, 1, None]
    cx, cy = intrinsic[:, 0, 2, None], intrinsic[:, 1, 2, None]
    x, y, z = camera.unbind(-1)
    return torch.stack((fx * x / z + cx, fy * y / z + cy), dim=-1)


def _depth_on(depth: Any, device: torch.device) -> Tensor:
    """(c, H, W) depth of any dtype and place -> a tensor on `device`, dtype kept: only the
    pixels the points land on are converted to metres (a whole float32 depth map costs more
    than the projection itself)."""
    return torch.as_tensor(np.asarray(depth) if not isinstance(depth, Tensor) else depth).to(device)


def _visible(z: Tensor, uv: Tensor, depth_raw: Tensor, depth_scale: float,
             depth_threshold: float, relative_threshold: float, border: int) -> Tensor:
    """(c, N) camera depths, (c, N, 2) pixels, (c, H, W) depth in units of depth_scale metres
    -> (c, N) bool visibility."""
    n_views, height, width = depth_raw.shape
    column, row = torch.round(uv).unbind(-1)
    # Every comparison is False for NaN, so non-finite poses fall out here.
    visible = ((z > MIN_Z) & (column >= border) & (column <= width - 1 - border)
               & (row >= border) & (row <= height - 1 - border))
    # Index only where inside: casting NaN or huge coordinates to integers is undefined.
    flat = torch.where(visible, row, 0).long() * width + torch.where(visible, column, 0).long()
    d = torch.gather(depth_raw.reshape(n_views, -1), 1, flat).float() * depth_scale
    tolerance = torch.clamp(relative_threshold * d, min=depth_threshold)
    return visible & (d > 0) & ((z - d).abs() <= tolerance)
