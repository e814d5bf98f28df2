"""The raw ScanNet reader on small `.sens` files written by the tests' own writer: exact
values, every kind of bad frame, cut files, unreadable headers, and bounded reads."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.readers.discovery import list_scenes
from pipeline.readers.scannet import ScanNetScene
from pipeline.readers.annotations import read_axis_alignment
from pipeline.readers.scannet_sens import SensScene
from pipeline.readers.base import SceneError
from tests.pipeline.test_scannet import (COLOR, DEPTH, INTRINSIC_COLOR, INTRINSIC_DEPTH,
                                         color_image, depth_image, make_scene, pose, write_ply)
from tests.sens_writer import SensFrame, jpeg_bytes, write_sens, zlib_depth

REPO = Path(__file__).resolve().parents[2]
SCENE = "scene0042_00"


def good_frame(frame_id: int) -> SensFrame:
    return SensFrame(pose(frame_id), jpeg_bytes(color_image(frame_id), quality=95),
                     zlib_depth(depth_image(frame_id)), timestamp=1000 * frame_id)


def write_scan(root: Path, frames: list[SensFrame], **header) -> Path:
    """A raw scan folder `root/SCENE` holding SCENE.sens (COLOR, DEPTH, the test intrinsics)."""
    scene = root / SCENE
    scene.mkdir(parents=True, exist_ok=True)
    options = {"color_size": COLOR, "depth_size": DEPTH, "intrinsic_color": INTRINSIC_COLOR,
               "intrinsic_depth": INTRINSIC_DEPTH, **header}
    write_sens(scene / f"{SCENE}.sens", frames, **options)
    return scene


def decoded(jpeg: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(jpeg)) as image:
        return np.asarray(image.convert("RGB"))


# --- frames -----------------------------------------------------------------------------------

def test_header_and_frames_read_exact_values(tmp_path):
    frames = [good_frame(i) for i in range(4)]
    root = write_scan(tmp_path, frames, trailer=b"\x07" * 100)  # IMU records follow in some
    scene = SensScene.open(root)
    assert scene.scene_id == SCENE and scene.sens_path == root / f"{SCENE}.sens"
    np.testing.assert_array_equal(scene.frame_ids, np.arange(4))
    assert scene.frame_ids.dtype == np.int64
    assert scene.color_size == COLOR and scene.depth_size == DEPTH
    np.testing.assert_array_equal(scene.intrinsic_color, INTRINSIC_COLOR[:3, :3])
    np.testing.assert_array_equal(scene.intrinsic_depth, INTRINSIC_DEPTH[:3, :3])
    assert scene.header.sensor_name == "StructureSensor" and scene.header.depth_shift == 1000
    assert (scene.header.color_compression, scene.header.depth_compression) == (
        "jpeg", "zlib_ushort")
    assert scene.index.damage == "" and scene.scan_frames() == {}
    for i, written in enumerate(frames):
        frame = scene.read_frame(i)
        assert frame.valid and frame.frame_id == i, frame.reason
        assert frame.pose.dtype == np.float64
        np.testing.assert_array_equal(frame.pose, pose(i))
        assert frame.depth_mm.dtype == np.uint16
        np.testing.assert_array_equal(frame.depth_mm, depth_image(i))
        # The recorded JPEG bytes, decoded as the export reader decodes a file: identical.
        np.testing.assert_array_equal(frame.color, decoded(written.color))
    only_depth = scene.read_frame(2, color=False)
    assert only_depth.valid and only_depth.color is None
    np.testing.assert_array_equal(only_depth.depth_mm, depth_image(2))
    only_color = scene.read_frame(3, depth=False)
    assert only_color.valid and only_color.depth_mm is None
    np.testing.assert_array_equal(only_color.color, decoded(frames[3].color))
    assert "frame 4 is not in" in scene.read_frame(4).reason
    assert "frame -1 is not in" in scene.read_frame(-1).reason


def test_every_bad_frame_is_an_invalid_frame_with_its_reason(tmp_path):
    frames = [good_frame(i) for i in range(11)]
    frames[1].pose = np.full((4, 4), -np.inf)  # as in real scans where tracking was lost
    frames[2].pose = pose(2)
    frames[2].pose[1, 2] = np.nan
    frames[3].color = frames[3].color[: len(frames[3].color) // 2]
    frames[4].depth = b"not a zlib stream"
    frames[5].depth = zlib_depth(depth_image(5, size=(5, 8)))
    frames[6].depth = frames[6].depth[:-20]
    frames[7].color = jpeg_bytes(color_image(7, size=(12, 15)))
    frames[8].color = b""
    frames[9].depth = zlib_depth(np.zeros((7, 8), np.uint16))
    frames[10].depth = b""
    name = f"{SCENE}.sens"
    expected = {
        1: f"pose is not finite ({name} frame 1)",
        2: f"pose is not finite ({name} frame 2)",
        3: f"colour image does not decode ({name} frame 3)",
        4: f"depth does not decompress (zlib: Error -3 while decompressing data: incorrect "
           f"header check) ({name} frame 4)",
        5: f"depth decompresses to 80 bytes, expected 6x8 uint16 (96 bytes) ({name} frame 5)",
        6: f"depth does not decompress (the zlib stream is cut off) ({name} frame 6)",
        7: f"colour image is 12x15, expected 12x16 ({name} frame 7)",
        8: f"colour image does not decode ({name} frame 8)",
        9: f"depth decompresses to more than 6x8 uint16 (96 bytes) ({name} frame 9)",
        10: f"depth does not decompress (the zlib stream is cut off) ({name} frame 10)",
    }
    scene = SensScene(write_scan(tmp_path, frames))
    read = {i: scene.read_frame(i) for i in range(11)}
    assert {i: f.reason for i, f in read.items() if not f.valid} == expected
    assert read[0].valid
    assert np.isneginf(read[1].pose).all()  # the pose as stored, as the export reader keeps it
    assert read[3].color is None
    np.testing.assert_array_equal(read[3].depth_mm, depth_image(3))  # decoded before the colour
    assert read[5].depth_mm is None and read[5].color is None
    # Without decoding, only what the frame heads tell: the poses.
    assert scene.scan_frames() == {1: expected[1], 2: expected[2]}


@pytest.mark.parametrize("cut", ["inside a payload", "inside a head", "between frames",
                                 "fewer frames than the header claims"])
def test_a_cut_file_keeps_the_frames_before_the_cut(tmp_path, caplog, cut):
    frames = [good_frame(i) for i in range(6)]
    root = write_scan(tmp_path, frames, n_frames=9 if "claims" in cut else None)
    path = root / f"{SCENE}.sens"
    data = path.read_bytes()
    ends = [len(data) - sum(96 + len(f.color) + len(f.depth) for f in frames[i:])
            for i in range(7)]  # ends[i]: where frame i starts (ends[6]: the end of the file)
    length = {"inside a payload": ends[4] + 96 + 10, "inside a head": ends[4] + 50,
              "between frames": ends[4], "fewer frames than the header claims": len(data)}[cut]
    path.write_bytes(data[:length])
    with caplog.at_level(logging.WARNING, logger="pipeline.readers.scannet_sens"):
        scene = SensScene(root)
    n, first_lost = (9, 6) if "claims" in cut else (6, 4)
    lost = n - first_lost
    how = {"inside a payload": "the file ends inside frame 4",
           "inside a head": "the file ends inside frame 4",
           "between frames": "the file ends before frame 4",
           "fewer frames than the header claims": "the file ends before frame 6"}[cut]
    damage = (f"{SCENE}.sens is cut short or corrupt: {how}, so frames {first_lost}-{n - 1} "
              f"({lost} of {n}) cannot be read; download the file again")
    assert scene.index.damage == damage
    assert caplog.text.count(damage) == 1  # said once, when the scene is opened
    np.testing.assert_array_equal(scene.frame_ids, np.arange(n))  # the frame table is whole
    for i in range(first_lost):
        assert scene.read_frame(i).valid
    for i in range(first_lost, n):
        frame = scene.read_frame(i)
        assert frame.reason == f"frame {i} is not readable: {damage}"
        assert np.isnan(frame.pose).all() and frame.color is None and frame.depth_mm is None
    assert sorted(scene.scan_frames()) == list(range(first_lost, n))


def test_a_corrupt_byte_count_ends_the_index_there(tmp_path):
    frames = [good_frame(i) for i in range(5)]
    frames[3].color_padding = 3 * 12 * 16 * 2 + (1 << 16)  # more than twice a raw RGB image
    frames[3].color = frames[3].color[:10]
    scene = SensScene(write_scan(tmp_path, frames))
    assert scene.index.readable == 3
    assert "frame 3's head is corrupt" in scene.index.damage
    assert "frames 3-4 (2 of 5) cannot be read" in scene.index.damage
    assert [scene.read_frame(i).valid for i in range(5)] == [True, True, True, False, False]


def test_frames_are_read_alike_from_many_threads(tmp_path):
    scene = SensScene(write_scan(tmp_path, [good_frame(i) for i in range(8)]))
    with ThreadPoolExecutor(4) as pool:
        frames = list(pool.map(scene.read_frame, [i % 8 for i in range(64)]))
    for frame in frames:
        assert frame.valid
        np.testing.assert_array_equal(frame.depth_mm, depth_image(frame.frame_id))
        np.testing.assert_array_equal(frame.pose, pose(frame.frame_id))


def test_raw_and_png_colour_raw_depth_and_another_depth_shift(tmp_path):
    rgb = color_image(3)
    depth_units = np.array([[0, 4000, 4002, 4001] * 2] * 6, np.uint16)  # shift 4000: 0.25 mm
    frame = SensFrame(pose(3), rgb.tobytes(), depth_units.astype("<u2").tobytes())
    scene = SensScene(write_scan(tmp_path, [frame], color_compression=0, depth_compression=0,
                                 depth_shift=4000.0))
    read = scene.read_frame(0)
    assert read.valid, read.reason
    np.testing.assert_array_equal(read.color, rgb)
    np.testing.assert_array_equal(read.depth_mm[0, :4], [0, 1000, 1000, 1000])  # rounded to mm
    png = io.BytesIO()
    Image.fromarray(rgb).save(png, format="PNG")
    frame = SensFrame(pose(3), png.getvalue(), zlib_depth(depth_image(3)))
    read = SensScene(write_scan(tmp_path / "png", [frame], color_compression=1)).read_frame(0)
    assert read.valid, read.reason
    np.testing.assert_array_equal(read.color, rgb)  # PNG is lossless
    np.testing.assert_array_equal(read.depth_mm, depth_image(3))
    short = SensFrame(pose(3), rgb.tobytes()[:-3], zlib_depth(depth_image(3)))
    assert SensScene(write_scan(tmp_path / "short", [short], color_compression=0)).read_frame(
        0).reason == f"colour image is 573 bytes, expected 12x16 RGB ({SCENE}.sens frame 0)"


# --- scenes that cannot be read ---------------------------------------------------------------

@pytest.mark.parametrize("header, message", [
    ({"version": 5}, "is a .sens file of version 5 (or not a .sens file); this reader reads "
                     "version 4, ScanNet's"),
    ({"color_compression": 7}, ": colour compression 7 is unknown (this reader reads 0 raw, "
                               "1 png, 2 jpeg)"),
    ({"color_compression": -1}, ": colour compression -1 (unknown) is not supported"),
    ({"depth_compression": 2}, ": depth compression 2 (occi_ushort) is not supported (this "
                               "reader reads 0 raw_ushort, 1 zlib_ushort)"),
    ({"depth_compression": 9}, ": depth compression 9 is unknown (this reader reads"),
    ({"depth_shift": 0.0}, "has a corrupt header (depth shift 0.0"),
    ({"n_frames": 2**40}, "has a corrupt header: it claims 1099511627776 frames"),
    ({"sensor_name": b""}, None),  # an empty name is fine
])
def test_an_unreadable_header_fails_the_scene_in_one_line(tmp_path, header, message):
    root = write_scan(tmp_path, [good_frame(0)], **header)
    if message is None:
        assert SensScene(root).read_frame(0).valid
        return
    with pytest.raises(SceneError) as error:
        SensScene(root)
    text = str(error.value)
    assert "\n" not in text and str(root / f"{SCENE}.sens") in text and message in text


def test_cut_headers_missing_files_and_empty_scans_fail_in_one_line(tmp_path):
    root = write_scan(tmp_path, [good_frame(0)])
    path = root / f"{SCENE}.sens"
    data = path.read_bytes()
    for length in (0, 3, 100, 300):
        path.write_bytes(data[:length])
        with pytest.raises(SceneError, match=rf"^{path} ends inside its header \({length} bytes\)"):
            SensScene(root)
    path.write_bytes(b"<html>not found</html>" * 20)
    with pytest.raises(SceneError, match=r"of version 1836345404 \(or not a .sens file\)"):
        SensScene(root)
    write_sens(path, [], color_size=COLOR, depth_size=DEPTH, intrinsic_color=INTRINSIC_COLOR,
               intrinsic_depth=INTRINSIC_DEPTH)
    with pytest.raises(SceneError, match=f"scene {SCENE}: .*holds no frames"):
        SensScene(root)
    path.unlink()
    with pytest.raises(SceneError, match=f"scene {SCENE}: .*{SCENE}.sens is missing"):
        SensScene(root)
    nan_intrinsics = np.array(INTRINSIC_COLOR)
    nan_intrinsics[0, 0] = np.nan
    write_scan(tmp_path, [good_frame(0)], intrinsic_color=nan_intrinsics)
    with pytest.raises(SceneError, match="the colour intrinsics are not finite"):
        SensScene(root)


# --- the scan folder --------------------------------------------------------------------------

def test_a_raw_folder_is_listed_and_opened_by_the_scannet_reader(tmp_path):
    raw = write_scan(tmp_path, [good_frame(i) for i in range(2)])
    exported = make_scene(tmp_path, "scene0001_00", frame_ids=(0, 1))
    (exported / "scene0001_00.sens").write_bytes(b"")  # both: the export wins, as before
    assert [p.name for p in list_scenes(tmp_path)] == ["scene0001_00", SCENE]
    assert type(ScanNetScene.open(raw)) is SensScene
    assert type(ScanNetScene.open(exported)) is ScanNetScene
    assert type(SensScene.open(raw)) is SensScene


def test_points_and_annotations_are_those_of_the_export_reader(tmp_path):
    raw = write_scan(tmp_path, [good_frame(0)])
    write_ply(raw / f"{SCENE}_vh_clean_2.ply", 4)
    write_ply(raw / f"{SCENE}_vh_clean_2.labels.ply", 4, label=np.array([1, 2, 5, 40]))
    (raw / f"{SCENE}_vh_clean_2.0.010000.segs.json").write_text(
        json.dumps({"segIndices": [3, 3, 9, 9]}))
    (raw / f"{SCENE}.aggregation.json").write_text(
        json.dumps({"segGroups": [{"segments": [9]}, {"segments": [3]}]}))
    exported = make_scene(tmp_path / "export", SCENE, frame_ids=(0,))
    for path in raw.iterdir():
        if path.suffix != ".sens":
            (exported / path.name).write_bytes(path.read_bytes())
    sens_points, export_points = SensScene(raw).read_points(), ScanNetScene(exported).read_points()
    for field in ("xyz", "rgb", "semantic", "instance", "segment"):
        np.testing.assert_array_equal(getattr(sens_points, field), getattr(export_points, field))
    np.testing.assert_array_equal(sens_points.instance, [1, 1, 0, 0])
    (raw / f"{SCENE}_vh_clean_2.ply").unlink()
    with pytest.raises(SceneError, match=f"{SCENE}_vh_clean_2.ply is missing"):
        SensScene(raw).read_points()


SCANNET_META = """axisAlignment = 0.945519 0.325568 0.000000 -5.384390 -0.325568 0.945519 \
0.000000 -2.871780 0.000000 0.000000 1.000000 -0.064350 0.000000 0.000000 0.000000 1.000000 
colorHeight = 968
colorToDepthExtrinsics = 0.999973 0.006791 0.002776 -0.037886 -0.006767 0.999881 -0.013826 \
-0.003116 -0.002870 0.013807 0.999900 -0.000439 -0 -0 -0 1
colorWidth = 1296
numColorFrames = 5578
sceneType = Apartment
"""
"""The head of scene0000_00.txt as ScanNet distributes it (one line per key)."""


def test_axis_alignment_is_read_row_by_row_from_the_meta_file(tmp_path):
    meta = tmp_path / "scene0000_00" / "scene0000_00.txt"
    meta.parent.mkdir()
    meta.write_text(SCANNET_META)
    expected = np.array([[0.945519, 0.325568, 0.0, -5.38439], [-0.325568, 0.945519, 0.0, -2.87178],
                         [0.0, 0.0, 1.0, -0.06435], [0.0, 0.0, 0.0, 1.0]])
    np.testing.assert_array_equal(read_axis_alignment(meta), expected)
    meta.write_text("\n".join(line for line in SCANNET_META.splitlines()
                              if not line.startswith("axisAlignment")))
    assert read_axis_alignment(meta) is None  # a test scan: none
    assert read_axis_alignment(tmp_path / "missing.txt") is None
    for bad in ("axisAlignment = 1 0 0 0 0 1 0 0 0 0 1 0 0 0 0", "axisAlignment = 1 0 x",
                "axisAlignment = " + " ".join(["nan"] * 16)):
        meta.write_text(bad + "\n")
        with pytest.raises(SceneError, match=f"scene0000_00: the axisAlignment of {meta} is not "
                                             "16 finite numbers"):
            read_axis_alignment(meta)


def test_both_readers_read_the_axis_alignment(tmp_path):
    raw = write_scan(tmp_path, [good_frame(0)])
    exported = make_scene(tmp_path / "export", SCENE, frame_ids=(0,))
    assert SensScene(raw).axis_alignment is None and ScanNetScene(exported).axis_alignment is None
    for folder in (raw, exported):
        (folder / f"{SCENE}.txt").write_text(SCANNET_META)
    for scene in (SensScene(raw), ScanNetScene(exported)):
        np.testing.assert_array_equal(scene.axis_alignment[0], [0.945519, 0.325568, 0, -5.38439])


def test_synthetic_scenes_carry_an_axis_alignment_that_centres_the_room(synthetic_root):
    from pipeline.readers.synthetic import SyntheticScene

    scene = SyntheticScene.open(synthetic_root / "scene0000_00")
    length, width, _ = scene.description["room"]
    expected = np.eye(4)
    expected[:2, 3] = -length / 2, -width / 2
    np.testing.assert_array_equal(scene.axis_alignment, expected)
    aligned = scene.read_points().xyz @ expected[:3, :3].T + expected[:3, 3]
    assert np.abs(aligned[:, :2].max(axis=0) + aligned[:, :2].min(axis=0)).max() < 0.3


# --- memory ---------------------------------------------------------------------------------

BOUNDED_READS = r"""
import io, json, sys
import numpy as np
from PIL import Image
from pipeline.readers.scannet_sens import SensScene

def counter(name):
    with open("/proc/self/" + ("io" if name == "rchar" else "status")) as f:
        line = next(l for l in f if l.startswith(name))
    return int(line.split()[1])

Image.open(io.BytesIO(bytes.fromhex(sys.argv[3]))).convert("RGB")  # load the JPEG plugin first
peak_0 = counter("VmHWM:")
read_0 = counter("rchar")
own = counter("rchar") - read_0  # what reading /proc/self/io itself adds
read_0 = counter("rchar")
scene = SensScene(sys.argv[1])
read_1 = counter("rchar")
frames = [scene.read_frame(i) for i in range(0, len(scene.frame_ids), int(sys.argv[2]))]
read_2 = counter("rchar")
print(json.dumps({"index_bytes": read_1 - read_0 - own, "frame_bytes": read_2 - read_1 - own,
                  "peak_growth_kb": counter("VmHWM:") - peak_0,
                  "valid": [f.valid for f in frames], "reasons": [f.reason for f in frames]}))
"""


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="reads /proc/self/io (Linux)")
def test_a_2_gb_scan_is_indexed_and_read_with_bounded_reads_and_memory(tmp_path):
    """The file is sparse (payloads are holes), so it costs no disk: only the frames the stride
    selects carry a real JPEG and depth map. A reader that read the file, or kept what it read,
    would read or hold gigabytes."""
    color_size, depth_size, stride, n_frames = (968, 1296), (480, 640), 100, 600
    rows = np.linspace(0, 255, color_size[0], dtype=np.uint8)
    jpeg = jpeg_bytes(np.stack([np.tile(rows[:, None], (1, color_size[1]))] * 3, axis=-1))
    depth = zlib_depth(np.full(depth_size, 1500, np.uint16))
    frame_bytes = 3_600_000  # about a raw 1296x968 RGB image: the file holds 2.2 GB
    frames = []
    for i in range(n_frames):
        payload = (jpeg, depth) if i % stride == 0 else (b"", b"")
        frames.append(SensFrame(pose(i), payload[0], payload[1],
                                color_padding=frame_bytes - len(payload[0])))
    path = tmp_path / SCENE / f"{SCENE}.sens"
    path.parent.mkdir()
    write_sens(path, frames, color_size=color_size, depth_size=depth_size,
               intrinsic_color=INTRINSIC_COLOR, intrinsic_depth=INTRINSIC_DEPTH)
    size = path.stat().st_size
    assert size > 2**31  # offsets past 2 GiB
    tiny_jpeg = jpeg_bytes(np.zeros((8, 8, 3), np.uint8)).hex()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", BOUNDED_READS, str(path.parent), str(stride),
                             tiny_jpeg], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["valid"] == [True] * (n_frames // stride), figures["reasons"]
    header_bytes = 4 + 8 + len(b"StructureSensor") + 4 * 64 + 2 * 4 + 4 * 4 + 4 + 8
    # heads only, once (give or take a digit of the counter file's own length)
    assert abs(figures["index_bytes"] - (header_bytes + 96 * n_frames)) <= 4, figures
    selected = (n_frames // stride) * (frame_bytes + len(depth))
    assert abs(figures["frame_bytes"] - selected) <= 4, figures  # the selected payloads only
    assert figures["peak_growth_kb"] < 100_000, figures  # < 100 MB for a 2.2 GB file
