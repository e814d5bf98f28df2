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
"""

from __future__ import annotations

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

VIEW_CHUNK = 16
"""Views projected at once: ~40 bytes per view and point of working memory, plus the chunk's
depth maps and feature grids in float32. Feature sampling then goes view by view."""


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
    view_chunk: int = VIEW_CHUNK,
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

    Returns:
      uv: (V, N, 2) float32, (u, v) pixel coordinates in the depth image; meaningful only where
          visible (points behind the camera get mirrored coordinates, bad poses NaN).
      visible: (V, N) bool.
    """
    n_points = points.shape[0]
    uv_chunks = [torch.zeros(0, n_points, 2, device=points.device)]
    visible_chunks = [torch.zeros(0, n_points, dtype=torch.bool, device=points.device)]
    for start, stop in _chunks(cam_to_world.shape[0], view_chunk):
        camera = _to_camera(points, cam_to_world[start:stop])
        uv = _pixels(camera, _view_intrinsics(intrinsic, start, stop, points.device))
        depth_raw = _depth_on(depth[start:stop], points.device)
        uv_chunks.append(uv)
        visible_chunks.append(
            _visible(camera[..., 2], uv, depth_raw, depth_scale, depth_threshold,
                     relative_threshold, border))
    return torch.cat(uv_chunks), torch.cat(visible_chunks)


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
        zeros where count == 0 (check `seen`, a zero is not a feature).
    count: (N,) int32, number of views that see the point.
    seen: (N,) bool, count > 0.
    view_visible: (V, N) bool, which view sees which point (after the crop test), or None
        unless asked for; the CLIP consistency loss pools per view with it.
    """

    features: Tensor
    count: Tensor
    seen: Tensor
    view_visible: Tensor | None = None


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
    view_chunk: int = VIEW_CHUNK,
    return_visibility: bool = False,
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
    visible_chunks = [torch.zeros(0, n_points, dtype=torch.bool, device=device)]
    for start, stop in _chunks(cam_to_world.shape[0], view_chunk):
        camera = _to_camera(points, cam_to_world[start:stop])
        uv_depth = _pixels(camera, _view_intrinsics(intrinsic_depth, start, stop, device))
        depth_raw = _depth_on(depth[start:stop], device)
        visible = _visible(camera[..., 2], uv_depth, depth_raw, depth_scale, depth_threshold,
                           relative_threshold, border)
        uv_color = _pixels(camera, _view_intrinsics(intrinsic_color, start, stop, device))
        grid_uv, inside = mapping.color_to_grid(uv_color)
        visible &= inside
        count += visible.sum(dim=0, dtype=torch.int32)
        if return_visibility:
            visible_chunks.append(visible)

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

    features = (feature_sum / count.clamp(min=1).float()).T.contiguous()
    view_visible = torch.cat(visible_chunks) if return_visibility else None
    return FusedFeatures(features=features, count=count, seen=count > 0,
                         view_visible=view_visible)


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
