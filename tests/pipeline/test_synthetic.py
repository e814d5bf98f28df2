"""Synthetic scenes: exact geometry, labels that agree with the boxes, determinism, the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from storage.labels import nyu40_to_scannet20
from cli.errors import UserError
from pipeline.readers.base import IGNORE_INDEX, NO_INSTANCE
from pipeline.synthetic import (
    COLOR_SIZE,
    DEPTH_SIZE,
    Box,
    cast_rays,
    raycast_depth,
    scaled_intrinsic,
    write_scene,
)
from pipeline.readers.synthetic import SyntheticScene

REPO = Path(__file__).resolve().parents[2]


def box(centre, size, yaw=0.0, nyu40=3, instance=0) -> Box:
    return Box(tuple(centre), tuple(size), yaw, nyu40, instance, "checker", 0.2, (200, 0, 0),
               (0, 0, 200))


def look_along_x(position) -> np.ndarray:
    """Camera-to-world of a camera at `position` looking along world +x, world z up."""
    pose = np.eye(4)
    pose[:3, :3] = np.array([[0, 0, 1], [-1, 0, 0], [0, -1, 0]])  # columns: right, down, forward
    pose[:3, 3] = position
    return pose


@pytest.fixture(scope="module")
def scenes(synthetic_root):
    return [SyntheticScene.open(path) for path in sorted(synthetic_root.iterdir())]


def signed_distance(boxes, xyz: np.ndarray) -> np.ndarray:
    """(N, B) signed distance of points to each box's surface, metres (negative inside)."""
    distances = []
    for b in boxes:
        q = np.abs(b.to_local(xyz)) - np.asarray(b.size) / 2
        distances.append(np.linalg.norm(np.maximum(q, 0), axis=1) + np.minimum(q.max(axis=1), 0))
    return np.stack(distances, axis=1)


def camera_pixels(xyz, pose, intrinsic, size):
    """z (N,), nearest pixel row/col (N,), and whether it is in front and in the image."""
    camera = (xyz - pose[:3, 3]) @ pose[:3, :3]
    z = camera[:, 2]
    safe = np.where(z > 1e-6, z, 1.0)
    col = np.round(intrinsic[0, 0] * camera[:, 0] / safe + intrinsic[0, 2]).astype(int)
    row = np.round(intrinsic[1, 1] * camera[:, 1] / safe + intrinsic[1, 2]).astype(int)
    inside = (z > 0.1) & (col >= 0) & (col < size[1]) & (row >= 0) & (row < size[0])
    return z, np.clip(row, 0, size[0] - 1), np.clip(col, 0, size[1] - 1), inside


def test_raycast_depth_of_a_box_and_a_rotated_box():
    intrinsic = scaled_intrinsic((9, 13), 577.9, DEPTH_SIZE)
    centre_pixel = (4, 6)
    depth = raycast_depth([box((5, 0, 0), (2, 2, 2))], look_along_x((0, 0, 0)), intrinsic, (9, 13))
    assert depth.dtype == np.float32 and depth.shape == (9, 13)
    assert depth[centre_pixel] == pytest.approx(4.0, abs=1e-6)
    # Turned 45 degrees about z, the cube shows the camera an edge at sqrt(2) from its centre.
    turned = raycast_depth([box((5, 0, 0), (2, 2, 2), yaw=np.pi / 4)], look_along_x((0, 0, 0)),
                           intrinsic, (9, 13))
    assert turned[centre_pixel] == pytest.approx(5 - np.sqrt(2), abs=1e-6)
    # The nearer of two boxes wins, a box behind the camera is not seen, and a miss is 0.
    both = raycast_depth([box((5, 0, 0), (2, 2, 2)), box((3, 0, 0), (0.2, 0.2, 0.2)),
                          box((-3, 0, 0), (1, 1, 1))], look_along_x((0, 0, 0)), intrinsic, (9, 13))
    assert both[centre_pixel] == pytest.approx(2.9, abs=1e-6)
    assert both[0, 0] == 0.0 and depth[4, 8] == pytest.approx(4.0, abs=1e-6)  # z, not ray length
    wide = raycast_depth([box((5, 0, 0), (2, 2, 2))], look_along_x((0, 0, 0)),
                         scaled_intrinsic((9, 13), 4.0, (9, 13)), (9, 13))
    assert wide[0, 0] == 0.0 and wide[centre_pixel] == pytest.approx(4.0, abs=1e-6)


def test_cast_rays_agrees_with_the_image_ray_cast():
    boxes = [box((4, 0.3, 0.1), (1, 2, 1), yaw=0.4), box((6, -1, 0), (1, 1, 3))]
    pose = look_along_x((0, 0, 0.2))
    intrinsic = scaled_intrinsic((30, 40), 30.0, (30, 40))
    depth = raycast_depth(boxes, pose, intrinsic, (30, 40))
    rows, cols = np.mgrid[0:30, 0:40]
    camera = np.stack([(cols - intrinsic[0, 2]) / intrinsic[0, 0],
                       (rows - intrinsic[1, 2]) / intrinsic[1, 1], np.ones((30, 40))], -1)
    t, index = cast_rays(boxes, pose[:3, 3], camera.reshape(-1, 3) @ pose[:3, :3].T)
    np.testing.assert_allclose(depth.reshape(-1), np.where(index >= 0, t, 0), atol=1e-5)
    assert 0.1 < (index == 0).mean() < 0.9 and (index == 1).any()


def test_intrinsics_scale_like_scannet(scenes):
    np.testing.assert_allclose(scaled_intrinsic(COLOR_SIZE, 1170.0, COLOR_SIZE),
                               [[1170, 0, 647.5], [0, 1170, 483.5], [0, 0, 1]])
    scene = scenes[0]
    assert scene.color_size == (242, 324) and scene.depth_size == (240, 320)
    assert scene.intrinsic_color[0, 0] == pytest.approx(1170 / 4)
    assert scene.intrinsic_depth[0, 0] == pytest.approx(577.9 / 2)
    assert scene.intrinsic_depth[1, 2] == pytest.approx(119.5)


def test_every_frame_is_valid_and_depth_is_dense(scenes):
    for scene in scenes:
        assert len(scene.frame_ids) == 8 and scene.scan_frames() == {}
        for frame_id in scene.frame_ids:
            frame = scene.read_frame(frame_id)
            assert frame.valid, frame.reason
            assert (frame.depth_mm > 0).mean() == 1.0  # a closed room: every ray hits
            assert 300 < np.median(frame.depth_mm) < 7000
            assert frame.color.std() > 10  # textured, not flat


def test_depth_pixels_lie_on_box_surfaces(scenes):
    for scene in scenes:
        frame = scene.read_frame(scene.frame_ids[3], color=False)
        height, width = scene.depth_size
        rows, cols = np.mgrid[0:height, 0:width]
        z = frame.depth_mm.astype(np.float64) / 1000
        k = scene.intrinsic_depth
        camera = np.stack([(cols - k[0, 2]) / k[0, 0] * z, (rows - k[1, 2]) / k[1, 1] * z, z], -1)
        world = camera.reshape(-1, 3) @ frame.pose[:3, :3].T + frame.pose[:3, 3]
        distance = np.abs(signed_distance(scene.boxes, world)).min(axis=1)
        # Millimetre rounding moves a point at most ~0.7 mm along its ray.
        assert np.quantile(distance, 0.999) < 0.0015


def inverse_depth_bilinear(depth_mm: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Depth (metres) at continuous pixel (u, v) by bilinear interpolation of 1 / depth, which
    is exact inside a planar face (1 / z is affine in pixel coordinates there)."""
    height, width = depth_mm.shape
    inverse = 1000.0 / np.maximum(depth_mm, 1)
    col = np.minimum(np.floor(u).astype(int), width - 2)
    row = np.minimum(np.floor(v).astype(int), height - 2)
    a, b = u - col, v - row
    return 1 / ((1 - a) * (1 - b) * inverse[row, col] + a * (1 - b) * inverse[row, col + 1]
                + (1 - a) * b * inverse[row + 1, col] + a * b * inverse[row + 1, col + 1])


def test_cloud_points_agree_with_depth_and_colour(scenes):
    occluded = occluded_ok = 0
    for scene in scenes:
        points = scene.read_points()
        xyz = points.xyz.astype(np.float64)
        depth_error, colour_error = [], []
        k = scene.intrinsic_depth
        height, width = scene.depth_size
        for frame_id in scene.frame_ids:
            frame = scene.read_frame(frame_id)
            t, _ = cast_rays(scene.boxes, frame.pose[:3, 3], xyz - frame.pose[:3, 3])
            unoccluded = t >= 1 - 1e-6  # the ray to a point (t = 1) hits nothing before it
            camera = (xyz - frame.pose[:3, 3]) @ frame.pose[:3, :3]
            z = np.maximum(camera[:, 2], 1e-6)
            u, v = k[0, 0] * camera[:, 0] / z + k[0, 2], k[1, 1] * camera[:, 1] / z + k[1, 2]
            seen = (unoccluded & (z > 0.1) & (u >= 0) & (u <= width - 1) & (v >= 0)
                    & (v <= height - 1))
            interpolated = inverse_depth_bilinear(frame.depth_mm, u[seen], v[seen])
            depth_error.append(np.abs(interpolated - z[seen]))
            _, row, col, inside = camera_pixels(xyz, frame.pose, k, scene.depth_size)
            hidden = inside & (t < 0.9)
            occluded += hidden.sum()
            occluded_ok += (hidden & (frame.depth_mm[row, col] / 1000 < z - 0.01)).sum()
            _, row, col, inside = camera_pixels(xyz, frame.pose, scene.intrinsic_color,
                                                scene.color_size)
            visible = inside & unoccluded
            colour_error.append(np.abs(frame.color[row, col][visible].astype(int)
                                       - points.rgb[visible]).mean(axis=1))
        depth_error = np.concatenate(depth_error)
        assert len(depth_error) > 2000
        # Seen points sit on the depth map to the sub-pixel: only silhouettes (where the four
        # pixels span two surfaces) miss. A half-pixel shift of the rays drops this to ~0.65.
        assert (depth_error < 0.002).mean() > 0.95
        assert np.median(depth_error) < 0.0004  # millimetre PNG rounding
        # The colour images show the point's own texture (JPEG, nearest pixel, edges): mean
        # error ~3 of 255; colour rays 1% too wide (fx) give ~6 and 85% under 10.
        colour_error = np.concatenate(colour_error)
        assert colour_error.mean() < 4.5 and (colour_error < 10).mean() > 0.92
    # Occluded points land on a pixel of a nearer surface (few: the cameras look outwards).
    assert occluded > 20 and occluded_ok / occluded > 0.95


def test_labels_instances_and_segments_match_the_boxes(scenes):
    for scene in scenes:
        points = scene.read_points()
        boxes = scene.boxes
        owner = np.abs(signed_distance(boxes, points.xyz.astype(np.float64))).argmin(axis=1)
        nyu40 = np.array([b.nyu40 for b in boxes])[owner]
        instance = np.array([b.instance for b in boxes])[owner]
        np.testing.assert_array_equal(points.semantic, nyu40_to_scannet20(nyu40))
        np.testing.assert_array_equal(points.instance, instance)
        assert 4000 < len(points.xyz) <= 5000
        assert {0, 1} <= set(points.semantic.tolist())  # walls and floor
        assert len(set(points.semantic.tolist()) - {IGNORE_INDEX}) >= 4
        n_instances = points.instance.max() + 1
        np.testing.assert_array_equal(np.unique(points.instance[points.instance != NO_INSTANCE]),
                                      np.arange(n_instances))
        assert n_instances >= 8
        for instance_id in range(n_instances):  # one class per instance
            assert len(np.unique(points.semantic[points.instance == instance_id])) == 1
        assert (points.segment >= 0).all() and len(np.unique(points.segment)) > 2 * n_instances
        pairs = np.unique(np.stack([points.segment, points.instance], 1), axis=0)
        assert len(pairs) == len(np.unique(points.segment))  # no segment spans two instances


def test_same_seed_same_files_other_seed_other_scene(tmp_path):
    tiny = {"n_frames": 2, "color_size": (24, 32), "depth_size": (12, 16), "n_points": 300}
    first = write_scene(tmp_path / "a" / "scene0000_00", seed=5, **tiny)
    again = write_scene(tmp_path / "b" / "scene0000_00", seed=5, **tiny)
    other = write_scene(tmp_path / "c" / "scene0000_00", seed=6, **tiny)
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert len(files) == 2 * 3 + 4 + 4 + 1 + 1  # frames, intrinsics, mesh files, .json, .txt
    for relative in files:
        assert (first / relative).read_bytes() == (again / relative).read_bytes(), relative
    assert (first / "synthetic.json").read_bytes() != (other / "synthetic.json").read_bytes()
    with pytest.raises(UserError, match="exists and is not empty"):
        write_scene(first, seed=5, **tiny)


def test_cli_help_and_a_tiny_generation(tmp_path):
    help_text = subprocess.run([sys.executable, "-m", "pipeline.synthetic", "--help"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout
    for flag in ("--scenes", "--frames", "--seed", "--points", "--color-size", "--depth-size",
                 "--small"):
        assert flag in help_text
    out = tmp_path / "out"
    command = [sys.executable, "-m", "pipeline.synthetic", str(out), "--scenes", "2",
               "--frames", "3", "--seed", "1", "--color-size", "24x32", "--depth-size", "12x16",
               "--points", "200"]
    subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True)
    assert sorted(p.name for p in out.iterdir()) == ["scene0000_00", "scene0001_00"]
    scene = SyntheticScene.open(out / "scene0001_00")
    frame = scene.read_frame(2)
    assert frame.valid and frame.color.shape == (24, 32, 3) and frame.depth_mm.shape == (12, 16)
    assert 100 < len(scene.read_points().xyz) <= 200
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 1
    assert again.stderr.startswith("error: ") and again.stderr.count("\n") == 1
