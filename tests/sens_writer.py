"""A writer of ScanNet `.sens` files for the tests (and the benchmark that measures the reader).

Written from the format as ScanNet documents it (SensorData version 4, little-endian), with
its own struct layouts and nothing from pipeline.readers.sens_format, so a field the reader misreads
fails a test instead of agreeing with itself:

    header  uint32 version; uint64 name length, name; float32 4x4 colour intrinsics, colour
            extrinsics, depth intrinsics, depth extrinsics; int32 colour compression, int32
            depth compression; uint32 colour width, colour height, depth width, depth height;
            float32 depth shift; uint64 frame count
    frame   float32 4x4 camera-to-world; uint64 colour timestamp, depth timestamp, colour byte
            count, depth byte count; colour bytes; depth bytes
"""

from __future__ import annotations

import io
import shutil
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

JPEG, ZLIB_USHORT = 2, 1
"""ScanNet's colour and depth compression codes."""

SCAN_FILES = ("{}_vh_clean_2.ply", "{}_vh_clean_2.labels.ply", "{}_vh_clean_2.0.010000.segs.json",
              "{}.aggregation.json", "{}.txt")
"""The files of a scan folder beside its .sens."""


@dataclass
class SensFrame:
    """One frame as written: pose (4, 4) (stored as float32), the colour and depth bytes as
    they go into the file, and zero bytes appended to the colour bytes (written as a hole, so
    a large test file costs no disk)."""

    pose: np.ndarray
    color: bytes
    depth: bytes
    color_padding: int = 0
    timestamp: int = 0


def jpeg_bytes(rgb: np.ndarray, quality: int = 92) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def zlib_depth(depth: np.ndarray) -> bytes:
    """(h, w) uint16 -> zlib of its little-endian bytes, row by row, as ScanNet stores depth."""
    return zlib.compress(np.ascontiguousarray(depth, dtype="<u2").tobytes())


def write_sens(path: Path, frames: list[SensFrame], *, color_size: tuple[int, int],
               depth_size: tuple[int, int], intrinsic_color: np.ndarray,
               intrinsic_depth: np.ndarray, version: int = 4, color_compression: int = JPEG,
               depth_compression: int = ZLIB_USHORT, depth_shift: float = 1000.0,
               sensor_name: bytes = b"StructureSensor", n_frames: int | None = None,
               trailer: bytes = b"") -> Path:
    """Write a .sens file. Sizes are (height, width); intrinsics (3, 3) or (4, 4).
    n_frames: the count the header claims (default: len(frames)). trailer: bytes after the
    last frame (ScanNet's files may end with IMU records)."""

    def matrix(values) -> bytes:
        full = np.eye(4)
        values = np.asarray(values, dtype=np.float64)
        full[:values.shape[0], :values.shape[1]] = values
        return struct.pack("<16f", *full.ravel())  # row by row

    with open(path, "wb") as out:
        out.write(struct.pack("<I", version))
        out.write(struct.pack("<Q", len(sensor_name)) + sensor_name)
        out.write(matrix(intrinsic_color) + matrix(np.eye(4)))
        out.write(matrix(intrinsic_depth) + matrix(np.eye(4)))
        out.write(struct.pack("<ii", color_compression, depth_compression))
        out.write(struct.pack("<IIII", color_size[1], color_size[0], depth_size[1], depth_size[0]))
        out.write(struct.pack("<f", depth_shift))
        out.write(struct.pack("<Q", len(frames) if n_frames is None else n_frames))
        for frame in frames:
            out.write(matrix(frame.pose))
            out.write(struct.pack("<QQQQ", frame.timestamp, frame.timestamp,
                                  len(frame.color) + frame.color_padding, len(frame.depth)))
            out.write(frame.color)
            out.seek(frame.color_padding, io.SEEK_CUR)
            out.write(frame.depth)
        out.write(trailer)
        out.truncate()  # a hole at the very end still counts
    return Path(path)


def sens_from_export(scene_dir: Path, out_root: Path, *, quality: int | None = None) -> Path:
    """Write `out_root/<scene>/` as ScanNet distributes a scan, from a scene in the export
    layout: `<scene>.sens` holding the export's JPEG bytes unchanged (or, with `quality`,
    decoded and encoded again), its depth PNGs' pixels under zlib, its poses and intrinsics
    (as float32, the format's type), beside copies of the mesh, annotation and .txt files.
    Returns the new scene folder."""
    scene_id = Path(scene_dir).name
    target = Path(out_root) / scene_id
    target.mkdir(parents=True)
    ids = sorted(int(p.stem) for p in (scene_dir / "color").iterdir() if p.stem.isdigit())
    frames, sizes = [], []
    for i in ids:
        color = (scene_dir / "color" / f"{i}.jpg").read_bytes()
        if quality is not None:
            color = jpeg_bytes(np.asarray(Image.open(io.BytesIO(color)).convert("RGB")), quality)
        depth = np.asarray(Image.open(scene_dir / "depth" / f"{i}.png"))
        frames.append(SensFrame(np.loadtxt(scene_dir / "pose" / f"{i}.txt"), color,
                                zlib_depth(depth), timestamp=33_333 * i))
        sizes.append(depth.shape)
    with Image.open(scene_dir / "color" / f"{ids[0]}.jpg") as first:
        color_size = (first.height, first.width)
    write_sens(target / f"{scene_id}.sens", frames, color_size=color_size,
               depth_size=max(set(sizes), key=sizes.count),  # the size most depth maps have
               intrinsic_color=np.loadtxt(scene_dir / "intrinsic" / "intrinsic_color.txt"),
               intrinsic_depth=np.loadtxt(scene_dir / "intrinsic" / "intrinsic_depth.txt"))
    for pattern in SCAN_FILES:
        source = scene_dir / pattern.format(scene_id)
        if source.exists():
            shutil.copyfile(source, target / source.name)
    return target
