"""Synthetic RGB-D scans in ScanNet's export layout, with exact ground truth.

A scene is a box-shaped room (floor, four walls, an unannotated ceiling) holding furniture
made of z-rotated boxes (tables, chairs, beds, ...) and flat items on the walls (doors,
windows, pictures, curtains). Every surface carries a procedural texture that is a function
of the surface and the 3D point, so the point cloud's colours agree with the images.
Depth and colour are ray-cast exactly; the point cloud holds the surface points that some
camera of the trajectory sees, as a reconstructed mesh would.

    python -m pipeline.synthetic data/synthetic --scenes 2 --frames 20 --small

`<scene>/synthetic.json` records the boxes, so tests can ray-cast the truth again with
`raycast_depth`; `<scene>/<scene>.txt` holds ScanNet's meta data, its axisAlignment among them.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from plyfile import PlyData, PlyElement

from storage.labels import NYU40_NAMES
from cli.errors import UserError
from cli.run import run_command

log = logging.getLogger(__name__)

COLOR_SIZE = (968, 1296)
DEPTH_SIZE = (480, 640)
SMALL_COLOR_SIZE = (242, 324)
SMALL_DEPTH_SIZE = (240, 320)
"""(height, width) in pixels: ScanNet's sizes, and a quarter / half of them for speed."""

COLOR_FOCAL = 1170.0
DEPTH_FOCAL = 577.9
"""ScanNet's focal lengths (pixels) at its own sizes; other sizes scale them."""

WALL_THICKNESS = 0.1
"""Metres; walls, floor and ceiling are slabs this thick around the room's interior."""

CAMERA_RADIUS = 0.4
CAMERA_HEIGHT = 1.45
CLEAR_RADIUS = 1.2
"""Metres: the camera walks a CAMERA_RADIUS circle around the room centre at about
CAMERA_HEIGHT; furniture keeps CLEAR_RADIUS from the centre, so no camera is inside a box."""

SEGMENT_VOXEL = 0.3
"""Edge (metres) of the grid that cuts each box face into segments (superpoints)."""


@dataclass(frozen=True)
class Box:
    """A solid box, the one primitive of a synthetic scene.

    centre: world frame, metres. size: full extents along the box's own x, y, z, metres.
    yaw: rotation about world +z, radians. nyu40: NYU40 class id (0 = unannotated).
    instance: 0..K-1 as the reader gives it, -1 for no instance. Boxes of one object share it.
    pattern, period (metres), color, accent (RGB 0..255): the procedural texture.
    """

    centre: tuple[float, float, float]
    size: tuple[float, float, float]
    yaw: float
    nyu40: int
    instance: int
    pattern: str
    period: float
    color: tuple[int, int, int]
    accent: tuple[int, int, int]

    @property
    def rotation(self) -> np.ndarray:
        """(3, 3) float64, box axes as columns, in the world frame."""
        c, s = np.cos(self.yaw), np.sin(self.yaw)
        return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])

    def to_local(self, points: np.ndarray) -> np.ndarray:
        """(M, 3) world points -> (M, 3) box coordinates (centre at 0, axes of the box)."""
        return (points - np.asarray(self.centre)) @ self.rotation


def scaled_intrinsic(size: tuple[int, int], focal: float, reference: tuple[int, int]) -> np.ndarray:
    """(3, 3) float64 pinhole intrinsics for an image of `size` (h, w) whose focal length is
    `focal` pixels at `reference` (h, w); the principal point is the image centre."""
    height, width = size
    return np.array([[focal * width / reference[1], 0.0, (width - 1) / 2],
                     [0.0, focal * height / reference[0], (height - 1) / 2],
                     [0.0, 0.0, 1.0]])


def cast_rays(boxes: Sequence[Box], origin: np.ndarray, directions: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
    """First hit of rays `origin + t * directions` (t > 0) among `boxes`.

    origin: (3,) world, metres. directions: (R, 3) world, any length.
    Returns t (R,) float64 (inf when nothing is hit) and the hit box's index (R,) int64 (-1).
    """
    directions = np.asarray(directions, dtype=np.float64)
    t_best = np.full(len(directions), np.inf)
    index = np.full(len(directions), -1, dtype=np.int64)
    for i, box in enumerate(boxes):
        _keep_closer(t_best, index, i, _intersect(box, origin, *directions.T))
    return t_best, index


def _keep_closer(t_best: np.ndarray, index: np.ndarray, i: int, t: np.ndarray) -> None:
    """In place: where t is nearer than t_best, take it and box index i."""
    np.copyto(index, i, where=t < t_best)
    np.minimum(t_best, t, out=t_best)


def _intersect(box: Box, origin: np.ndarray, dx: np.ndarray, dy: np.ndarray, dz: np.ndarray
               ) -> np.ndarray:
    """Slab test in the box's frame for directions given per component (arrays of one shape):
    the entry distance t, inf on a miss or from inside the box."""
    half = np.asarray(box.size) / 2
    origin_local = box.to_local(np.asarray(origin, dtype=np.float64)[None])[0]
    if box.yaw:
        c, s = np.cos(box.yaw), np.sin(box.yaw)
        dx, dy = c * dx + s * dy, c * dy - s * dx
    t_near = t_far = None
    with np.errstate(divide="ignore", invalid="ignore"):
        for d, o, h in zip((dx, dy, dz), origin_local, half):
            inverse = 1.0 / d
            t1, t2 = (-h - o) * inverse, (h - o) * inverse
            near, far = np.minimum(t1, t2), np.maximum(t1, t2)
            t_near = near if t_near is None else np.maximum(t_near, near)
            t_far = far if t_far is None else np.minimum(t_far, far)
    return np.where((t_near <= t_far) & (t_near > 0), t_near, np.inf)


def pixel_rays(cam_to_world: np.ndarray, intrinsic: np.ndarray, size: tuple[int, int]
               ) -> np.ndarray:
    """(3, H, W) world directions through pixel centres (integer pixel coordinates), scaled so
    that the ray parameter t is the camera-frame depth z. OpenCV camera axes."""
    intrinsic = np.asarray(intrinsic, dtype=np.float64)[:3, :3]
    rows, cols = np.mgrid[0:size[0], 0:size[1]].astype(np.float64)
    camera = np.stack([(cols - intrinsic[0, 2]) / intrinsic[0, 0],
                       (rows - intrinsic[1, 2]) / intrinsic[1, 1], np.ones(size)])
    return np.einsum("ij,jhw->ihw", np.asarray(cam_to_world, dtype=np.float64)[:3, :3], camera)


_CORNERS = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], float)
_EDGES = np.array([(a, a | bit) for bit in (1, 2, 4) for a in range(8) if not a & bit])
NEAR = 0.01
"""Surfaces nearer to the camera plane than this (metres) are not ray-cast into images."""


def _image_window(box: Box, cam_to_world: np.ndarray, intrinsic: np.ndarray,
                  size: tuple[int, int]) -> tuple[slice, slice] | None:
    """(rows, columns) of the pixels whose rays can hit `box`: the bounds of the projection of
    the box cut at the NEAR plane, one pixel wider; None when it is out of view."""
    corners = _CORNERS * np.asarray(box.size) / 2 @ box.rotation.T + np.asarray(box.centre)
    camera = (corners - cam_to_world[:3, 3]) @ cam_to_world[:3, :3]
    z = camera[:, 2]
    a, b = _EDGES[:, 0], _EDGES[:, 1]
    crossing = (z[a] - NEAR) * (z[b] - NEAR) < 0
    share = ((NEAR - z[a]) / np.where(crossing, z[b] - z[a], 1.0))[crossing, None]
    start, end = camera[a[crossing]], camera[b[crossing]]
    hull = np.concatenate([camera[z >= NEAR], start + share * (end - start)])
    if not len(hull):
        return None
    u = intrinsic[0, 0] * hull[:, 0] / hull[:, 2] + intrinsic[0, 2]
    v = intrinsic[1, 1] * hull[:, 1] / hull[:, 2] + intrinsic[1, 2]
    c0, c1 = max(0, int(np.ceil(u.min())) - 1), min(size[1], int(np.floor(u.max())) + 2)
    r0, r1 = max(0, int(np.ceil(v.min())) - 1), min(size[0], int(np.floor(v.max())) + 2)
    return (slice(r0, r1), slice(c0, c1)) if c0 < c1 and r0 < r1 else None


def cast_image(boxes: Sequence[Box], cam_to_world: np.ndarray, intrinsic: np.ndarray,
               size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ray-cast every pixel centre of an image of `size` (h, w): t (H, W) float64 camera-frame
    depth (inf: no hit), box index (H, W) int64 (-1), and the rays (3, H, W) of `pixel_rays`.
    Each box is tested only in the window of pixels it projects to."""
    cam_to_world = np.asarray(cam_to_world, dtype=np.float64)
    intrinsic = np.asarray(intrinsic, dtype=np.float64)[:3, :3]
    origin = cam_to_world[:3, 3]
    rays = pixel_rays(cam_to_world, intrinsic, size)
    t_best = np.full(size, np.inf)
    index = np.full(size, -1, dtype=np.int64)
    for i, box in enumerate(boxes):
        window = _image_window(box, cam_to_world, intrinsic, size)
        if window is not None:
            _keep_closer(t_best[window], index[window], i,
                         _intersect(box, origin, *(component[window] for component in rays)))
    return t_best, index, rays


def raycast_depth(boxes: Sequence[Box], cam_to_world: np.ndarray, intrinsic: np.ndarray,
                  size: tuple[int, int]) -> np.ndarray:
    """Exact depth image of the boxes.

    cam_to_world: (4, 4) camera-to-world, metres, OpenCV camera axes (x right, y down, z ahead).
    intrinsic: (3, 3) or (4, 4) pinhole intrinsics, pixels. size: (H, W).
    Returns (H, W) float32 camera-frame z of the first surface hit at each pixel centre,
    metres; 0 where nothing is hit.
    """
    t, _, _ = cast_image(boxes, cam_to_world, intrinsic, size)
    return np.where(np.isfinite(t), t, 0.0).astype(np.float32)


def render_color(boxes: Sequence[Box], cam_to_world: np.ndarray, intrinsic: np.ndarray,
                 size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 RGB image of the textured boxes (black where nothing is hit);
    arguments as in `raycast_depth`."""
    t, index, rays = cast_image(boxes, cam_to_world, intrinsic, size)
    origin = np.asarray(cam_to_world, dtype=np.float64)[:3, 3]
    t, index, rays = t.reshape(-1), index.reshape(-1), rays.reshape(3, -1)
    rgb = np.zeros((len(t), 3), dtype=np.uint8)
    order = np.argsort(index, kind="stable")
    starts = np.searchsorted(index[order], np.arange(len(boxes) + 1))
    for i, box in enumerate(boxes):
        pixels = order[starts[i]:starts[i + 1]]
        if pixels.size:
            rgb[pixels] = surface_color(box, origin + t[pixels, None] * rays[:, pixels].T)
    return rgb.reshape(*size, 3)


def surface_color(box: Box, points: np.ndarray) -> np.ndarray:
    """(M, 3) uint8 RGB of world points (M, 3) on the surface of `box`: a two-colour pattern
    in the face's own coordinates, a fine grain, and a shade per face orientation."""
    local = box.to_local(points)
    half = np.asarray(box.size) / 2
    axis = np.argmax(np.abs(local) / half, axis=1)
    rows = np.arange(len(points))
    in_face = np.array([[1, 2], [0, 2], [0, 1]])[axis]
    u = local[rows, in_face[:, 0]] + half[in_face[:, 0]]
    v = local[rows, in_face[:, 1]] + half[in_face[:, 1]]
    cells_u, cells_v = np.floor(u / box.period), np.floor(v / box.period)
    if box.pattern == "checker":
        mix = (cells_u + cells_v) % 2
    elif box.pattern == "stripes":
        mix = np.floor((u + 0.5 * v) / box.period) % 2
    else:
        mix = 0.5 + 0.5 * np.sin(2 * np.pi * u / box.period) * np.sin(2 * np.pi * v / box.period)
    grain = 0.07 * np.sin(37.0 * u + 11.0 * v) * np.sin(23.0 * v - 7.0 * u)
    normal = box.rotation[:, axis].T * np.sign(local[rows, axis])[:, None]
    shade = 0.8 + 0.2 * normal[:, 2] + 0.08 * normal[:, 0] + grain
    base = np.asarray(box.color) * (1 - mix[:, None]) + np.asarray(box.accent) * mix[:, None]
    return np.clip(base * shade[:, None], 0, 255).astype(np.uint8)


PALETTE = {
    0: ((236, 236, 230), (214, 214, 206)), 1: ((202, 190, 168), (168, 158, 140)),
    2: ((150, 110, 70), (118, 84, 52)), 3: ((122, 82, 50), (88, 60, 40)),
    4: ((70, 90, 160), (222, 222, 232)), 5: ((182, 62, 50), (62, 40, 30)),
    6: ((60, 130, 90), (40, 88, 60)), 7: ((172, 130, 80), (110, 80, 50)),
    8: ((140, 100, 60), (90, 60, 30)), 9: ((150, 200, 230), (232, 240, 250)),
    10: ((100, 70, 40), (200, 170, 90)), 11: ((222, 180, 40), (40, 100, 180)),
    12: ((210, 210, 200), (90, 90, 90)), 14: ((190, 150, 100), (80, 60, 40)),
    16: ((150, 50, 110), (200, 120, 170)), 24: ((230, 230, 236), (178, 178, 190)),
    29: ((190, 150, 90), (150, 110, 60)), 33: ((245, 245, 245), (196, 196, 210)),
    34: ((200, 200, 206), (150, 150, 160)), 35: ((240, 220, 150), (60, 60, 60)),
    36: ((235, 235, 240), (170, 190, 210)), 39: ((90, 110, 60), (160, 170, 80)),
}
"""NYU40 id -> (colour, accent) of its texture; each instance jitters them."""

FURNITURE = (3, 4, 5, 5, 6, 7, 10, 12, 14, 24, 29, 33, 34, 35, 36, 39)
"""NYU40 ids of floor-standing objects, drawn uniformly (chairs twice as often). Box (29)
and lamp (35) are outside the 20 benchmark classes, so objects also meet IGNORE_INDEX."""

WALL_ITEMS = (8, 9, 11, 16)
"""NYU40 ids of thin items on the walls: door, window, picture, curtain."""

OBJECT_KINDS = {NYU40_NAMES[nyu40]: nyu40 for nyu40 in (*FURNITURE, *WALL_ITEMS)}
"""Name -> NYU40 id of every kind of object a room can hold (what `objects` may name)."""


def _legs(width: float, depth: float, height: float, side: float) -> list[tuple[float, ...]]:
    x, y = width / 2 - side, depth / 2 - side
    return [(sx * x, sy * y, 0.0, side, side, height) for sx in (-1, 1) for sy in (-1, 1)]


def _parts(nyu40: int, rng: np.random.Generator) -> list[tuple[float, ...]]:
    """The boxes of one object in its own frame (front towards +y, floor at z = 0), as
    (x, y, bottom z, width, depth, height), metres."""
    u = rng.uniform
    if nyu40 == 7:  # table: a top on four legs
        w, d, h = u(1.0, 1.6), u(0.7, 1.0), u(0.7, 0.78)
        return [(0, 0, h - 0.05, w, d, 0.05)] + _legs(w, d, h - 0.05, 0.06)
    if nyu40 == 14:  # desk: a top on two side panels
        w, d, h = u(1.2, 1.6), u(0.6, 0.75), 0.74
        return [(0, 0, h - 0.04, w, d, 0.04), (-(w / 2 - 0.02), 0, 0, 0.04, d, h - 0.04),
                (w / 2 - 0.02, 0, 0, 0.04, d, h - 0.04)]
    if nyu40 == 5:  # chair: seat, legs, back
        s = u(0.42, 0.5)
        return [(0, 0, 0.42, s, s, 0.05), (0, -(s / 2 - 0.025), 0.47, s, 0.05, u(0.35, 0.5))] \
            + _legs(s, s, 0.42, 0.04)
    if nyu40 == 6:  # sofa: seat block, back, arms
        w, d = u(1.6, 2.2), u(0.85, 0.95)
        return [(0, 0, 0, w, d, 0.42), (0, -(d / 2 - 0.1), 0.42, w, 0.2, 0.4),
                (-(w / 2 - 0.1), 0.1, 0.42, 0.2, d - 0.2, 0.2),
                (w / 2 - 0.1, 0.1, 0.42, 0.2, d - 0.2, 0.2)]
    if nyu40 == 4:  # bed: mattress block and headboard
        w, d = u(1.4, 1.8), u(2.0, 2.1)
        return [(0, 0, 0, w, d, 0.5), (0, -(d / 2 + 0.04), 0, w, 0.08, 1.0)]
    if nyu40 == 33:  # toilet: bowl and tank
        return [(0, 0.05, 0, 0.4, 0.55, 0.4), (0, -0.3, 0, 0.45, 0.2, 0.8)]
    if nyu40 == 34:  # sink: pedestal and basin
        return [(0, 0, 0, 0.2, 0.2, 0.8), (0, 0, 0.8, u(0.5, 0.6), 0.45, 0.15)]
    if nyu40 == 35:  # lamp: pole and shade
        return [(0, 0, 0, 0.05, 0.05, 1.3), (0, 0, 1.3, 0.35, 0.35, 0.3)]
    extents = {3: ((0.6, 1.2), (0.45, 0.6), (0.8, 1.1)), 10: ((0.8, 1.0), (0.3, 0.4), (1.6, 2.0)),
               12: ((1.4, 2.0), (0.6, 0.65), (0.88, 0.92)),
               24: ((0.7, 0.8), (0.65, 0.75), (1.7, 1.9)),
               29: ((0.3, 0.5), (0.3, 0.5), (0.3, 0.5)), 36: ((1.5, 1.7), (0.7, 0.8), (0.5, 0.6)),
               39: ((0.4, 0.8), (0.4, 0.8), (0.4, 1.0))}[nyu40]
    return [(0, 0, 0, *(u(low, high) for low, high in extents))]


def _texture(nyu40: int, rng: np.random.Generator) -> dict:
    color, accent = PALETTE[nyu40]
    jitter = rng.uniform(0.85, 1.15, size=3)
    return {"pattern": str(rng.choice(["checker", "stripes", "waves"])),
            "period": float(rng.uniform(0.1, 0.5)),
            "color": tuple(int(min(255, c * j)) for c, j in zip(color, jitter)),
            "accent": tuple(int(min(255, c * j)) for c, j in zip(accent, jitter))}


def _room_boxes(room: tuple[float, float, float], rng: np.random.Generator) -> list[Box]:
    """The room's interior is [0, lx] x [0, ly] x [0, height]: floor (instance 0), four walls
    (instances 1-4) and an unannotated ceiling, as WALL_THICKNESS slabs around it."""
    lx, ly, height = room
    t = WALL_THICKNESS
    slabs = [
        ((lx / 2, ly / 2, -t / 2), (lx + 2 * t, ly + 2 * t, t), 2, 0),
        ((lx / 2, -t / 2, height / 2), (lx + 2 * t, t, height + 2 * t), 1, 1),
        ((lx / 2, ly + t / 2, height / 2), (lx + 2 * t, t, height + 2 * t), 1, 2),
        ((-t / 2, ly / 2, height / 2), (t, ly + 2 * t, height + 2 * t), 1, 3),
        ((lx + t / 2, ly / 2, height / 2), (t, ly + 2 * t, height + 2 * t), 1, 4),
        ((lx / 2, ly / 2, height + t / 2), (lx + 2 * t, ly + 2 * t, t), 0, -1),
    ]
    return [Box(centre, size, 0.0, nyu40, instance, **_texture(nyu40, rng))
            for centre, size, nyu40, instance in slabs]


def _furniture_boxes(room: tuple[float, float, float], rng: np.random.Generator,
                     first_instance: int, kinds: Sequence[int] = FURNITURE) -> list[Box]:
    """7-10 objects of `kinds` (NYU40 ids) on the floor, facing the room centre, apart from
    each other (10 cm), the walls (10 cm) and the camera's circle (CLEAR_RADIUS); an object
    that finds no place is left out. Instances count up from `first_instance`."""
    lx, ly, _ = room
    centre = np.array([lx / 2, ly / 2])
    taken: list[np.ndarray] = []  # footprints (xmin, ymin, xmax, ymax) with their margin
    boxes = []
    for _ in range(rng.integers(7, 11)):
        nyu40 = int(rng.choice(kinds))
        parts = _parts(nyu40, rng)
        half = np.array([max(abs(p[0]) + p[3] / 2 for p in parts),
                         max(abs(p[1]) + p[4] / 2 for p in parts)])
        for _ in range(30):
            position = rng.uniform([0, 0], [lx, ly])
            towards = centre - position
            yaw = float(np.arctan2(-towards[0], towards[1]) + rng.normal(0, 0.25))
            c, s = abs(np.cos(yaw)), abs(np.sin(yaw))
            extent = np.array([c * half[0] + s * half[1], s * half[0] + c * half[1]]) + 0.05
            footprint = np.concatenate([position - extent, position + extent])
            nearest = np.clip(centre, footprint[:2], footprint[2:])
            if (footprint[:2].min() >= 0.05 and footprint[2] <= lx - 0.05
                    and footprint[3] <= ly - 0.05
                    and np.linalg.norm(nearest - centre) >= CLEAR_RADIUS
                    and not any(_overlap(footprint, other) for other in taken)):
                break
        else:
            continue
        taken.append(footprint)
        texture = _texture(nyu40, rng)
        rotation = np.array([[np.cos(yaw), -np.sin(yaw)], [np.sin(yaw), np.cos(yaw)]])
        instance = first_instance + len(taken) - 1
        for x, y, bottom, width, depth, height in parts:
            xy = position + rotation @ (x, y)
            boxes.append(Box((float(xy[0]), float(xy[1]), bottom + height / 2),
                             (width, depth, height), yaw, nyu40, instance, **texture))
    return boxes


def _overlap(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3])


def _wall_item_boxes(room: tuple[float, float, float], rng: np.random.Generator,
                     first_instance: int, kinds: Sequence[int] = WALL_ITEMS) -> list[Box]:
    """0-2 thin items of `kinds` (NYU40 ids: doors, windows, pictures, curtains) against each
    wall, 10 cm apart, thinner than the furniture's distance to the walls; none if no kinds."""
    lx, ly, _ = room
    boxes = []
    for wall in range(4):  # y = 0, y = ly, x = 0, x = lx
        length = lx if wall < 2 else ly
        taken: list[tuple[float, float]] = []
        for _ in range(rng.integers(0, 3) if kinds else 0):
            nyu40 = int(rng.choice(kinds))
            width, height, bottom, thickness = {
                8: (rng.uniform(0.8, 0.95), rng.uniform(2.0, 2.1), 0.0, 0.05),
                9: (rng.uniform(0.8, 1.5), rng.uniform(1.0, 1.3), rng.uniform(0.9, 1.1), 0.04),
                11: (rng.uniform(0.4, 0.8), rng.uniform(0.3, 0.6), rng.uniform(1.3, 1.6), 0.03),
                16: (rng.uniform(1.0, 1.6), rng.uniform(2.0, 2.3), 0.2, 0.05),
            }[nyu40]
            along = rng.uniform(0.2 + width / 2, length - 0.2 - width / 2)
            if any(abs(along - a) < (width + w) / 2 + 0.1 for a, w in taken):
                continue
            taken.append((along, width))
            z = bottom + height / 2
            centre, size = [
                ((along, thickness / 2, z), (width, thickness, height)),
                ((along, ly - thickness / 2, z), (width, thickness, height)),
                ((thickness / 2, along, z), (thickness, width, height)),
                ((lx - thickness / 2, along, z), (thickness, width, height)),
            ][wall]
            boxes.append(Box(centre, size, 0.0, nyu40, first_instance + len(boxes),
                             **_texture(nyu40, rng)))
    return boxes


def _trajectory(room: tuple[float, float, float], n_frames: int, rng: np.random.Generator
                ) -> np.ndarray:
    """(F, 4, 4) float64 camera-to-world poses, OpenCV axes: one loop on a CAMERA_RADIUS circle
    around the room centre at about CAMERA_HEIGHT, looking outwards, pitched 18-25 degrees down."""
    lx, ly, _ = room
    phase = rng.uniform(0, 2 * np.pi)
    poses = np.tile(np.eye(4), (n_frames, 1, 1))
    for i, angle in enumerate(phase + 2 * np.pi * np.arange(n_frames) / n_frames):
        yaw = angle + 0.35 * np.sin(2 * angle)
        pitch = -(0.38 + 0.06 * np.sin(angle))
        forward = np.array([np.cos(pitch) * np.cos(yaw), np.cos(pitch) * np.sin(yaw),
                            np.sin(pitch)])
        right = np.cross(forward, (0.0, 0.0, 1.0))
        right /= np.linalg.norm(right)
        poses[i, :3, :3] = np.stack([right, np.cross(forward, right), forward], axis=1)
        poses[i, :3, 3] = (lx / 2 + CAMERA_RADIUS * np.cos(angle),
                           ly / 2 + CAMERA_RADIUS * np.sin(angle),
                           CAMERA_HEIGHT + 0.1 * np.sin(3 * angle))
    return poses


@dataclass(frozen=True)
class SurfacePoints:
    """Points on the boxes' surfaces. xyz: (N, 3) float64, world, metres; box: (N,) int64 index
    into the scene's boxes; face: (N,) int64, 2 * axis + (1 on the + side)."""

    xyz: np.ndarray
    box: np.ndarray
    face: np.ndarray

    def take(self, keep: np.ndarray) -> SurfacePoints:
        return SurfacePoints(self.xyz[keep], self.box[keep], self.face[keep])


def _sample_surfaces(boxes: Sequence[Box], room: tuple[float, float, float], n_samples: int,
                     rng: np.random.Generator) -> SurfacePoints:
    """Uniform samples (by area) of the box faces that bound the room's interior, without the
    parts of faces that lie inside or against another box (floor under a cabinet, a wall behind
    a picture, box bottoms); about `n_samples` before that removal."""
    faces = []
    for i, box in enumerate(boxes):
        half = np.asarray(box.size) / 2
        for axis in range(3):
            for sign in (-1, 1):
                face_centre = np.asarray(box.centre) + box.rotation[:, axis] * sign * half[axis]
                if _inside_room(face_centre[None], room)[0]:
                    faces.append((i, axis, sign, 4 * np.prod(np.delete(half, axis))))
    counts = rng.multinomial(n_samples, np.array([f[3] for f in faces]) / sum(f[3] for f in faces))
    chunks = []
    for (i, axis, sign, _), count in zip(faces, counts):
        half = np.asarray(boxes[i].size) / 2
        local = rng.uniform(-half, half, size=(count, 3))
        local[:, axis] = sign * half[axis]
        xyz = local @ boxes[i].rotation.T + np.asarray(boxes[i].centre)
        chunks.append(SurfacePoints(xyz, np.full(count, i), np.full(count, 2 * axis + (sign > 0))))
    points = SurfacePoints(*(np.concatenate([getattr(chunk, field) for chunk in chunks])
                             for field in ("xyz", "box", "face")))
    keep = _inside_room(points.xyz, room)
    for i, box in enumerate(boxes):
        local = np.abs(box.to_local(points.xyz))
        covered = np.all(local <= np.asarray(box.size) / 2 + 1e-6, axis=1)
        keep &= ~(covered & (points.box != i))
    return points.take(keep)


def _inside_room(xyz: np.ndarray, room: tuple[float, float, float]) -> np.ndarray:
    return np.all((xyz >= -1e-6) & (xyz <= np.asarray(room) + 1e-6), axis=1)


def _seen_by_any(boxes: Sequence[Box], xyz: np.ndarray, poses: np.ndarray, intrinsic: np.ndarray,
                 size: tuple[int, int]) -> np.ndarray:
    """(N,) bool: the surface point is the first hit on its ray from some camera and projects
    into that camera's image. xyz: (N, 3) world, metres; poses: (F, 4, 4) camera-to-world;
    intrinsic: (3, 3) pixels of images of `size` (h, w)."""
    seen = np.zeros(len(xyz), dtype=bool)
    for pose in poses:
        camera = (xyz - pose[:3, 3]) @ pose[:3, :3]
        z = np.maximum(camera[:, 2], 1e-9)
        u = intrinsic[0, 0] * camera[:, 0] / z + intrinsic[0, 2]
        v = intrinsic[1, 1] * camera[:, 1] / z + intrinsic[1, 2]
        candidates = np.flatnonzero(~seen & (camera[:, 2] > 0.05) & (u >= -0.5)
                                    & (u < size[1] - 0.5) & (v >= -0.5) & (v < size[0] - 0.5))
        # The ray to the point has t = 1 at the point: anything hit before it occludes it.
        t, _ = cast_rays(boxes, pose[:3, 3], xyz[candidates] - pose[:3, 3])
        seen[candidates[t >= 1 - 1e-6]] = True
    return seen


def _segment_ids(points: SurfacePoints) -> np.ndarray:
    """(N,) int64 superpoints 0..S-1: each box face cut by a SEGMENT_VOXEL world grid, so that
    no segment spans two boxes, hence two instances."""
    cells = np.floor(points.xyz / SEGMENT_VOXEL).astype(np.int64)
    keys = np.column_stack([points.box, points.face, cells])
    return np.unique(keys, axis=0, return_inverse=True)[1].reshape(-1)


@dataclass(frozen=True)
class SyntheticLayout:
    """Everything a synthetic scene is, before it is written."""

    room: tuple[float, float, float]
    boxes: list[Box]
    poses: np.ndarray
    intrinsic_color: np.ndarray
    intrinsic_depth: np.ndarray
    points: SurfacePoints


def make_layout(rng: np.random.Generator, n_frames: int, color_size: tuple[int, int],
                depth_size: tuple[int, int], n_points: int,
                objects: Sequence[str] | None = None) -> SyntheticLayout:
    """A random room, its trajectory and at most `n_points` surface points seen by a camera.
    objects: names of the kinds of object the room may hold (OBJECT_KINDS; None: all).
    Instances are renumbered 0..K-1 over the objects that have points; the others get -1."""
    room = tuple(float(rng.uniform(low, high))
                 for low, high in ((4.5, 7.0), (4.0, 6.0), (2.6, 3.0)))  # lx, ly, height
    furniture, wall_items = FURNITURE, WALL_ITEMS
    if objects is not None:
        furniture = tuple(OBJECT_KINDS[name] for name in objects
                          if OBJECT_KINDS[name] in FURNITURE)
        wall_items = tuple(OBJECT_KINDS[name] for name in objects
                           if OBJECT_KINDS[name] in WALL_ITEMS)
    boxes = _room_boxes(room, rng)
    if furniture:
        boxes += _furniture_boxes(room, rng, first_instance=5, kinds=furniture)
    boxes += _wall_item_boxes(room, rng, first_instance=max(b.instance for b in boxes) + 1,
                              kinds=wall_items)
    poses = _trajectory(room, n_frames, rng)
    intrinsic_color = scaled_intrinsic(color_size, COLOR_FOCAL, COLOR_SIZE)
    intrinsic_depth = scaled_intrinsic(depth_size, DEPTH_FOCAL, DEPTH_SIZE)
    # About 70% of the surface is hidden from every camera (upper walls, ceiling, backs).
    points = _sample_surfaces(boxes, room, 5 * n_points, rng)
    points = points.take(rng.permutation(len(points.xyz)))
    points = points.take(np.flatnonzero(_seen_by_any(boxes, points.xyz, poses, intrinsic_depth,
                                                    depth_size))[:n_points])
    present = sorted({boxes[i].instance for i in np.unique(points.box)} - {-1})
    renumber = {old: new for new, old in enumerate(present)}
    boxes = [Box(**{**asdict(b), "instance": renumber.get(b.instance, -1)}) for b in boxes]
    return SyntheticLayout(room, boxes, poses, intrinsic_color, intrinsic_depth, points)


def write_scene(scene_dir: Path, seed: int | Sequence[int] = 0, n_frames: int = 20,
                color_size: tuple[int, int] = COLOR_SIZE, depth_size: tuple[int, int] = DEPTH_SIZE,
                n_points: int = 20000, objects: Sequence[str] | None = None) -> Path:
    """Write one synthetic scene into `scene_dir` (whose name is the scene id) in ScanNet's
    export layout, plus synthetic.json; deterministic given `seed`. objects: the kinds of
    object the room may hold (names of OBJECT_KINDS; None: all). Returns `scene_dir`.
    Raises UserError when `scene_dir` exists and is not empty or an object kind is unknown."""
    scene_dir = Path(scene_dir)
    if scene_dir.exists() and any(scene_dir.iterdir()):
        raise UserError(f"{scene_dir} exists and is not empty; remove it or choose another folder")
    unknown = sorted(set(objects or ()) - set(OBJECT_KINDS))
    if unknown:
        raise UserError(f"unknown object kind(s) {', '.join(unknown)}: choose from "
                         f"{', '.join(sorted(OBJECT_KINDS))}")
    rng = np.random.default_rng(seed)
    layout = make_layout(rng, n_frames, tuple(color_size), tuple(depth_size), n_points, objects)
    for folder in ("color", "depth", "pose", "intrinsic"):
        (scene_dir / folder).mkdir(parents=True, exist_ok=True)
    for name, intrinsic in (("color", layout.intrinsic_color), ("depth", layout.intrinsic_depth)):
        matrix = np.eye(4)
        matrix[:3, :3] = intrinsic
        np.savetxt(scene_dir / "intrinsic" / f"intrinsic_{name}.txt", matrix, fmt="%.17g")
        np.savetxt(scene_dir / "intrinsic" / f"extrinsic_{name}.txt", np.eye(4), fmt="%.17g")
    for frame_id, pose in enumerate(layout.poses):
        # %.17g round-trips float64 exactly: the files hold the poses the images were cast with.
        np.savetxt(scene_dir / "pose" / f"{frame_id}.txt", pose, fmt="%.17g")
        depth_m = raycast_depth(layout.boxes, pose, layout.intrinsic_depth, depth_size)
        depth_mm = np.round(depth_m.astype(np.float64) * 1000)
        depth_mm = np.where(depth_mm <= np.iinfo(np.uint16).max, depth_mm, 0).astype(np.uint16)
        Image.fromarray(depth_mm).save(scene_dir / "depth" / f"{frame_id}.png")
        color = render_color(layout.boxes, pose, layout.intrinsic_color, color_size)
        Image.fromarray(color).save(scene_dir / "color" / f"{frame_id}.jpg", quality=92)
    _write_points(scene_dir, layout)
    _write_meta(scene_dir, layout, n_frames, tuple(color_size), tuple(depth_size))
    description = {
        "scene_id": scene_dir.name,
        "seed": np.atleast_1d(seed).tolist(),
        "config": {"n_frames": n_frames, "color_size": list(color_size),
                   "depth_size": list(depth_size), "n_points": n_points,
                   "objects": None if objects is None else list(objects)},
        "room": list(layout.room),
        "boxes": [asdict(box) for box in layout.boxes],
    }
    (scene_dir / "synthetic.json").write_text(json.dumps(description, indent=1))
    log.info("wrote %s: %d frames, %d points, %d objects", scene_dir, n_frames,
             len(layout.points.xyz), max(b.instance for b in layout.boxes) + 1)
    return scene_dir


def axis_alignment(room: tuple[float, float, float]) -> np.ndarray:
    """(4, 4) float64 ScanNet-style axisAlignment of a synthetic room: its walls already run
    along x and y, so it only moves the floor's centre to the origin."""
    matrix = np.eye(4)
    matrix[:2, 3] = -np.asarray(room[:2]) / 2
    return matrix


def _write_meta(scene_dir: Path, layout: SyntheticLayout, n_frames: int,
                color_size: tuple[int, int], depth_size: tuple[int, int]) -> None:
    """`<scene>.txt` as ScanNet writes it (`key = value` lines), with the room's axisAlignment."""
    numbers = lambda values: " ".join(repr(float(v)) for v in np.ravel(values))  # noqa: E731
    meta = {"axisAlignment": numbers(axis_alignment(layout.room)),
            "colorHeight": color_size[0], "colorWidth": color_size[1],
            "depthHeight": depth_size[0], "depthWidth": depth_size[1]}
    for name, intrinsic in (("color", layout.intrinsic_color), ("depth", layout.intrinsic_depth)):
        meta.update({f"fx_{name}": intrinsic[0, 0], f"fy_{name}": intrinsic[1, 1],
                     f"mx_{name}": intrinsic[0, 2], f"my_{name}": intrinsic[1, 2]})
    meta.update({"numColorFrames": n_frames, "numDepthFrames": n_frames,
                 "sceneType": "Synthetic room"})
    (scene_dir / f"{scene_dir.name}.txt").write_text(
        "".join(f"{key} = {value}\n" for key, value in sorted(meta.items())))


def _write_points(scene_dir: Path, layout: SyntheticLayout) -> None:
    """The mesh vertices and labels plys, segs.json and aggregation.json (no faces)."""
    scene_id = scene_dir.name
    points, boxes = layout.points, layout.boxes
    rgb = np.zeros((len(points.xyz), 3), dtype=np.uint8)
    for i, box in enumerate(boxes):
        members = np.flatnonzero(points.box == i)
        rgb[members] = surface_color(box, points.xyz[members])
    nyu40 = np.array([b.nyu40 for b in boxes], dtype=np.uint16)[points.box]
    instance = np.array([b.instance for b in boxes], dtype=np.int64)[points.box]
    fields = [("x", "f4"), ("y", "f4"), ("z", "f4"), ("red", "u1"), ("green", "u1"),
              ("blue", "u1"), ("alpha", "u1")]
    vertex = np.empty(len(points.xyz), dtype=fields)
    for axis, name in enumerate("xyz"):
        vertex[name] = points.xyz[:, axis]
    for channel, name in enumerate(("red", "green", "blue")):
        vertex[name] = rgb[:, channel]
    vertex["alpha"] = 255
    PlyData([PlyElement.describe(vertex, "vertex")]).write(scene_dir / f"{scene_id}_vh_clean_2.ply")
    labelled = np.empty(len(vertex), dtype=fields + [("label", "u2")])
    for name, _ in fields:
        labelled[name] = vertex[name]
    labelled["label"] = nyu40
    PlyData([PlyElement.describe(labelled, "vertex")]).write(
        scene_dir / f"{scene_id}_vh_clean_2.labels.ply")
    segment = _segment_ids(points)
    segs_name = f"{scene_id}_vh_clean_2.0.010000.segs.json"
    (scene_dir / segs_name).write_text(json.dumps(
        {"params": {"synthetic": True, "voxel": SEGMENT_VOXEL}, "sceneId": scene_id,
         "segIndices": segment.tolist()}))
    groups = []
    for object_id in range(instance.max(initial=-1) + 1):
        members = instance == object_id
        groups.append({"id": object_id, "objectId": object_id,
                       "label": NYU40_NAMES[int(nyu40[members][0])],
                       "segments": np.unique(segment[members]).tolist()})
    (scene_dir / f"{scene_id}.aggregation.json").write_text(json.dumps(
        {"sceneId": f"scannet.{scene_id}", "appId": "pipeline.synthetic", "segGroups": groups,
         "segmentsFile": f"scannet.{segs_name}"}))


def write_scenes(out_dir: Path, n_scenes: int = 2, n_frames: int = 20, seed: int = 0,
                 color_size: tuple[int, int] = COLOR_SIZE, depth_size: tuple[int, int] = DEPTH_SIZE,
                 n_points: int = 20000, objects: Sequence[str] | None = None) -> list[Path]:
    """Write scenes `out_dir/scene0000_00`, `scene0001_00`, ...; scene i draws from seed
    (seed, i). Sizes are (height, width) pixels; objects as in `write_scene`. Returns the
    scene folders."""
    return [write_scene(Path(out_dir) / f"scene{i:04d}_00", (seed, i), n_frames, color_size,
                        depth_size, n_points, objects) for i in range(n_scenes)]


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def _size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not HEIGHTxWIDTH, e.g. 480x640") from None
    if height < 2 or width < 2:
        raise argparse.ArgumentTypeError(f"{text!r}: height and width must be at least 2 pixels")
    return height, width


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.synthetic",
        description="Write synthetic RGB-D scenes in ScanNet's SensReader export layout, with "
                    "exact labels, instances, segments and a synthetic.json describing every box.")
    parser.add_argument("out_dir", type=Path,
                        help="folder to write scene0000_00, scene0001_00, ... into")
    parser.add_argument("--scenes", type=_positive, default=2, help="number of scenes (default 2)")
    parser.add_argument("--frames", type=_positive, default=20,
                        help="frames per scene (default 20)")
    parser.add_argument("--seed", type=int, default=0,
                        help="random seed; same seed, same files (default 0)")
    parser.add_argument("--points", type=_positive, default=None,
                        help="most points per scene cloud (default 20000, 5000 with --small)")
    parser.add_argument("--color-size", type=_size, default=None, metavar="HxW",
                        help="colour image size (default 968x1296 as ScanNet, 242x324 with "
                             "--small)")
    parser.add_argument("--depth-size", type=_size, default=None, metavar="HxW",
                        help="depth image size (default 480x640 as ScanNet, 240x320 with --small)")
    parser.add_argument("--objects", nargs="+", default=None, metavar="KIND",
                        choices=sorted(OBJECT_KINDS),
                        help="the kinds of object rooms may hold, e.g. chair table sofa bed door "
                             "(default: all of " + ", ".join(sorted(OBJECT_KINDS)) + ")")
    parser.add_argument("--small", action="store_true",
                        help="smaller defaults for tests and demos: quarter-size colour, half-size "
                             "depth, 5000 points; explicit sizes still win")
    args = parser.parse_args(argv)

    def write_command() -> None:
        start = time.perf_counter()
        scenes = write_scenes(
            args.out_dir, args.scenes, args.frames, args.seed,
            args.color_size or (SMALL_COLOR_SIZE if args.small else COLOR_SIZE),
            args.depth_size or (SMALL_DEPTH_SIZE if args.small else DEPTH_SIZE),
            args.points or (5000 if args.small else 20000), args.objects)
        print(f"wrote {len(scenes)} scenes to {args.out_dir} in "
              f"{time.perf_counter() - start:.1f} s")

    return run_command(write_command)


if __name__ == "__main__":
    sys.exit(main())
