"""ScanNet's `.sens` file (SensorData, version 4): header, frame index and payload decoding.

Layout, little-endian, matrices as 16 float32 row by row::

    header  uint32 version (4); uint64 n and n bytes: the sensor name;
            4x4 colour intrinsics, colour extrinsics, depth intrinsics, depth extrinsics;
            int32 colour compression (-1 unknown, 0 raw, 1 png, 2 jpeg);
            int32 depth compression (-1 unknown, 0 raw_ushort, 1 zlib_ushort, 2 occi_ushort);
            uint32 colour width, colour height, depth width, depth height;
            float32 depth shift (depth units per metre: 1000, millimetres, in ScanNet);
            uint64 frame count
    frame   4x4 camera-to-world (metres; -inf where tracking was lost); uint64 colour
            timestamp, depth timestamp, colour byte count, depth byte count (the 96-byte head);
            the colour bytes (a JPEG in ScanNet); the depth bytes (zlib_ushort: zlib of a
            uint16 height x width array, row-major)

What follows the last frame (IMU records in some files) is not read.

`index_sens` reads the header and then only the head of each frame, seeking over the payloads,
so indexing a 2 GB scan reads about 100 bytes a frame; `read_payload` reads one frame's bytes
with one seek. Nothing here holds more than one frame's payload, and a byte count larger than
twice its raw image is taken for corruption, so no read is larger than that either.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from pipeline.preprocess import DECODE_ERRORS, decode_color_scaled
from pipeline.readers.base import SceneError

VERSION = 4
"""The SensorData version this module reads (every ScanNet .sens file is version 4)."""

COLOR_COMPRESSION = {-1: "unknown", 0: "raw", 1: "png", 2: "jpeg"}
DEPTH_COMPRESSION = {-1: "unknown", 0: "raw_ushort", 1: "zlib_ushort", 2: "occi_ushort"}
"""The format's compression codes; ScanNet uses jpeg and zlib_ushort."""

READABLE_COLOR = ("raw", "png", "jpeg")
READABLE_DEPTH = ("raw_ushort", "zlib_ushort")
"""What this module decodes (occi_ushort, a proprietary codec, is not)."""

FRAME_HEAD = struct.Struct("<16f4Q")
"""A frame's head: camera-to-world, then colour and depth timestamps and byte counts."""

MAX_SENSOR_NAME = 1 << 16
MAX_SIDE = 1 << 14
MAX_FRAMES = 1 << 20
"""Sanity bounds of a header (bytes, pixels, frames): ScanNet's sensor names are a few bytes,
its images 1296x968 and 640x480, its longest scans about 6,000 frames. A header beyond them is
corrupt (a frame count beyond MAX_FRAMES is accepted when the file holds that many heads)."""


@dataclass(frozen=True)
class SensHeader:
    """A .sens file's header.

    intrinsic_*, extrinsic_*: (4, 4) float64 (stored as float32), pixels / metres.
    color_size, depth_size: (height, width) pixels. depth_shift: depth units per metre.
    n_frames: the frame count the header claims. frames_offset: byte offset of frame 0.
    """

    version: int
    sensor_name: str
    intrinsic_color: np.ndarray
    extrinsic_color: np.ndarray
    intrinsic_depth: np.ndarray
    extrinsic_depth: np.ndarray
    color_compression: str
    depth_compression: str
    color_size: tuple[int, int]
    depth_size: tuple[int, int]
    depth_shift: float
    n_frames: int
    frames_offset: int


@dataclass(frozen=True)
class SensIndex:
    """Where every readable frame's bytes are, from the frame heads alone.

    The first R = `readable` frames are whole in the file; frames R..n_frames-1 are not
    (`damage` says why and how many: a truncated file, a corrupt byte count), "" when R is
    n_frames.
    pose: (R, 4, 4) float32 camera-to-world, metres, as stored (may hold -inf or NaN).
    color_offset: (R,) int64 byte offset of each frame's colour bytes; its depth bytes follow.
    color_bytes, depth_bytes: (R,) int64 byte counts.
    """

    n_frames: int
    pose: np.ndarray
    color_offset: np.ndarray
    color_bytes: np.ndarray
    depth_bytes: np.ndarray
    damage: str = ""

    @property
    def readable(self) -> int:
        return len(self.color_offset)


def index_sens(path: Path) -> tuple[SensHeader, SensIndex]:
    """Read the header of the .sens file at `path` and index its frames by seeking over them.

    Reads the header and 96 bytes per frame, never a payload. A file cut short, or a frame head
    whose byte counts cannot be right, ends the index there (`SensIndex.damage`).
    Raises SceneError, one line naming the file, when the header is not that of a readable
    version-4 file: another version, an unknown or unsupported compression, a cut or corrupt
    header, non-finite intrinsics.
    """
    path = Path(path)
    try:
        with open(path, "rb", buffering=0) as file:
            file_size = os.fstat(file.fileno()).st_size
            header = _read_header(file, path)
            return header, _index_frames(file, path, header, file_size)
    except OSError as error:
        raise SceneError(f"cannot read {path} ({error.strerror or error})") from None


def read_payload(path: Path, offset: int, size: int) -> bytes:
    """`size` bytes of the file at `path` from byte `offset` (one seek, one read).
    Raises OSError when the file ends before."""
    with open(path, "rb", buffering=0) as file:
        file.seek(offset)
        data = _read_exact(file, size)
    if len(data) < size:
        raise OSError(f"the file ends {size - len(data)} bytes early (was it cut since?)")
    return data


def decode_depth(payload: bytes, compression: str, size: tuple[int, int]
                 ) -> tuple[np.ndarray | None, str]:
    """A frame's depth bytes -> ((h, w) uint16 in the file's depth units, reason).

    size: (h, w) of the header. A zlib stream that fails or ends early, or that holds another
    number of pixels than h x w, gives None and the reason.
    """
    expected = 2 * size[0] * size[1]
    image = f"{size[0]}x{size[1]} uint16 ({expected} bytes)"
    if compression == "zlib_ushort":
        stream = zlib.decompressobj()
        try:  # never inflate more than a pixel past the image: a zlib bomb stops there
            raw = stream.decompress(payload, expected + 2)
        except zlib.error as error:
            return None, f"depth does not decompress (zlib: {error})"
        if len(raw) > expected:
            return None, f"depth decompresses to more than {image}"
        if not stream.eof:
            return None, "depth does not decompress (the zlib stream is cut off)"
        if len(raw) < expected:
            return None, f"depth decompresses to {len(raw)} bytes, expected {image}"
    elif len(payload) != expected:
        return None, f"depth is {len(payload)} bytes, expected {image}"
    else:
        raw = payload
    return np.frombuffer(raw, dtype="<u2").reshape(size).astype(np.uint16), ""


def decode_color_payload(payload: bytes, compression: str, size: tuple[int, int],
                         min_size: tuple[int, int] | None = None
                         ) -> tuple[np.ndarray | None, int, str]:
    """A frame's colour bytes -> ((H, W, 3) uint8 RGB at 1/r of its size, r, reason), JPEG and
    PNG through the decode of every reader (pipeline.preprocess.decode_color_scaled; r > 1 only
    for a JPEG with `min_size`). size: (H, W) of the header."""
    if compression == "raw":
        if len(payload) != 3 * size[0] * size[1]:
            return None, 1, (f"colour image is {len(payload)} bytes, expected "
                             f"{size[0]}x{size[1]} RGB")
        return np.frombuffer(payload, dtype=np.uint8).reshape(*size, 3).copy(), 1, ""
    try:
        color, encoded, reduction = decode_color_scaled(io.BytesIO(payload), min_size)
    except DECODE_ERRORS:
        return None, 1, "colour image does not decode"
    if encoded != tuple(size):
        return None, 1, (f"colour image is {encoded[0]}x{encoded[1]}, expected "
                         f"{size[0]}x{size[1]}")
    return color, reduction, ""


def _read_header(file: BinaryIO, path: Path) -> SensHeader:
    def take(layout: str) -> tuple:
        fields = struct.Struct("<" + layout)
        data = _read_exact(file, fields.size)
        if len(data) < fields.size:
            raise SceneError(f"{path} ends inside its header ({file.tell()} bytes): the file is "
                             "cut short or not a .sens file; download it again")
        return fields.unpack(data)

    (version,) = take("I")
    if version != VERSION:
        raise SceneError(f"{path} is a .sens file of version {version} (or not a .sens file); this "
                         f"reader reads version {VERSION}, ScanNet's")
    (name_length,) = take("Q")
    if name_length > MAX_SENSOR_NAME:
        raise SceneError(f"{path} has a corrupt header (a sensor name of {name_length} bytes)")
    sensor_name = bytes(take(f"{name_length}s")[0]).decode("utf-8", "replace")
    matrices = np.array(take("64f"), dtype=np.float32).astype(np.float64).reshape(4, 4, 4)
    color_code, depth_code = take("2i")
    color_width, color_height, depth_width, depth_height = take("4I")
    (depth_shift,) = take("f")
    (n_frames,) = take("Q")
    color = _compression(path, "colour", color_code, COLOR_COMPRESSION, READABLE_COLOR)
    depth = _compression(path, "depth", depth_code, DEPTH_COMPRESSION, READABLE_DEPTH)
    for name, height, width in (("colour", color_height, color_width),
                                ("depth", depth_height, depth_width)):
        if not (0 < height <= MAX_SIDE and 0 < width <= MAX_SIDE):
            raise SceneError(f"{path} has a corrupt header (a {width}x{height} {name} size)")
    if not (np.isfinite(depth_shift) and depth_shift > 0):
        raise SceneError(f"{path} has a corrupt header (depth shift {depth_shift}, not a "
                         "positive number of units per metre)")
    for name, matrix in (("colour", matrices[0]), ("depth", matrices[2])):
        if not np.isfinite(matrix).all():
            raise SceneError(f"{path}: the {name} intrinsics are not finite")
    return SensHeader(version, sensor_name, *matrices, color, depth,
                      (int(color_height), int(color_width)),
                      (int(depth_height), int(depth_width)),
                      float(depth_shift), int(n_frames), file.tell())


def _compression(path: Path, name: str, code: int, known: dict[int, str],
                 readable: tuple[str, ...]) -> str:
    codes = ", ".join(f"{c} {known[c]}" for c in sorted(known) if known[c] in readable)
    if known.get(code) not in readable:
        what = f"{code} ({known[code]}) is not supported" if code in known else f"{code} is unknown"
        raise SceneError(f"{path}: {name} compression {what} (this reader reads {codes})")
    return known[code]


def _index_frames(file: BinaryIO, path: Path, header: SensHeader, file_size: int) -> SensIndex:
    n_frames = header.n_frames
    room = max(0, file_size - header.frames_offset) // FRAME_HEAD.size
    if n_frames > MAX_FRAMES and n_frames > room:
        raise SceneError(f"{path} has a corrupt header: it claims {n_frames} frames, and the file "
                         f"can hold at most {room}")
    color_bound = 2 * 3 * header.color_size[0] * header.color_size[1] + (1 << 16)
    depth_bound = 2 * 2 * header.depth_size[0] * header.depth_size[1] + (1 << 16)
    # Grown as frames are found, so a header that claims more frames than the file holds
    # costs nothing.
    pose = np.empty((min(n_frames, 1024), 4, 4), np.float32)
    counts = np.empty((len(pose), 3), np.int64)  # colour offset, colour bytes, depth bytes
    offset, readable, problem = header.frames_offset, 0, ""
    for frame in range(n_frames):
        head = _read_exact(file, FRAME_HEAD.size)
        if len(head) < FRAME_HEAD.size:
            problem = (f"the file ends inside frame {frame}" if head
                       else f"the file ends before frame {frame}")
            break
        values = FRAME_HEAD.unpack(head)
        color_bytes, depth_bytes = values[18], values[19]
        if color_bytes > color_bound or depth_bytes > depth_bound:
            problem = (f"frame {frame}'s head is corrupt ({color_bytes} colour and {depth_bytes} "
                       "depth bytes, more than twice its images)")
            break
        end = offset + FRAME_HEAD.size + color_bytes + depth_bytes
        if end > file_size:
            problem = f"the file ends inside frame {frame}"
            break
        if frame == len(pose):
            pose = np.concatenate([pose, np.empty_like(pose)])
            counts = np.concatenate([counts, np.empty_like(counts)])
        pose[frame] = np.reshape(values[:16], (4, 4))
        counts[frame] = (offset + FRAME_HEAD.size, color_bytes, depth_bytes)
        readable, offset = frame + 1, end
        file.seek(end)
    damage = ""
    if readable < n_frames:
        lost = n_frames - readable
        frames = f"frame {readable}" if lost == 1 else f"frames {readable}-{n_frames - 1}"
        damage = (f"{path.name} is cut short or corrupt: {problem}, so {frames} ({lost} of "
                  f"{n_frames}) cannot be read; download the file again")
    return SensIndex(n_frames, pose[:readable].copy(), counts[:readable, 0].copy(),
                     counts[:readable, 1].copy(), counts[:readable, 2].copy(), damage)


def _read_exact(file: BinaryIO, size: int) -> bytes:
    """Up to `size` bytes; fewer only at the end of the file."""
    chunks, remaining = [], size
    while remaining > 0:
        chunk = file.read(remaining)
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)
