"""ScanNet's submission format: write a model's predictions, read anyone's.

What ScanNet's benchmark server and its scripts (BenchmarkScripts/3d_evaluation) read, in a
folder DIR:

    DIR/semantic/<scene>.txt                          one NYU40 label id per mesh vertex
    DIR/instance/<scene>.txt                          one line per predicted instance:
        predicted_masks/<scene>_NNN.txt <nyu40 id> <confidence>
    DIR/instance/predicted_masks/<scene>_NNN.txt      one 0/1 per mesh vertex

Vertices are those of `<scene>_vh_clean_2.ply`, in its order. A store's points are exactly
these: pipeline.readers.scannet reads every vertex of that mesh in order (and checks that the label
mesh and the over-segmentation have the same count), and synthetic scenes write their points as
that mesh; nothing subsamples them. So one line per stored point is one line per vertex.

`write_ground_truth` writes the store's ground truth as the scripts' `--gt_path` folders expect
it (`ground_truth/semantic/<scene>.txt`: NYU40 ids; `ground_truth/instance/<scene>.txt`:
nyu40_id * 1000 + instance + 1), so the official scripts run on an export as is.

Reading follows the scripts' rules (a line is `path label confidence`, split on single spaces;
the path is relative and stays inside DIR/instance; a label is read as int(float(text)); a mask
is non-zero where the instance is; a mask named twice keeps its first place and its last
label and confidence), and is stricter where they would crash or mislead: every file's line
count must be the scene's vertex count, every value an integer, every confidence finite.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.instance_eval import encode_ground_truth
from storage.labels import scannet20_to_nyu40
from storage.errors import UserError

SEMANTIC = "semantic"
INSTANCE = "instance"
MASKS = "predicted_masks"
GROUND_TRUTH = "ground_truth"


@dataclass
class PredictedInstance:
    """One predicted instance of a scene: mask (N,) bool over the mesh vertices, its NYU40
    label id and its confidence."""

    mask: np.ndarray
    label: int
    score: float


# ---------------------------------------------------------------------------- writing


def write_ids(path: Path, values: np.ndarray) -> None:
    """One integer per line (ScanNet's util_3d.export_ids)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{value}\n" for value in np.asarray(values, dtype=np.int64).tolist()))


def write_mask(path: Path, mask: np.ndarray) -> None:
    """A 0/1 line per vertex; (N,) bool, written without a Python loop (N is 10^5 a scene)."""
    text = np.empty(2 * len(mask), dtype=np.uint8)
    text[0::2] = np.where(mask, ord("1"), ord("0"))
    text[1::2] = ord("\n")
    path.write_bytes(text.tobytes())


def write_semantic(folder: Path, scene_id: str, nyu40: np.ndarray) -> Path:
    """DIR/semantic/<scene>.txt from (N,) NYU40 label ids per vertex."""
    path = folder / SEMANTIC / f"{scene_id}.txt"
    write_ids(path, nyu40)
    return path


def write_instances(folder: Path, scene_id: str, instances: Sequence[PredictedInstance]) -> Path:
    """DIR/instance/<scene>.txt and a mask file per instance, numbered in the given order.
    Confidences are written with repr, so reading them back gives the same floats."""
    masks = folder / INSTANCE / MASKS
    masks.mkdir(parents=True, exist_ok=True)
    lines = []
    for number, instance in enumerate(instances):
        relative = f"{MASKS}/{scene_id}_{number:03d}.txt"
        write_mask(folder / INSTANCE / relative, np.asarray(instance.mask, dtype=bool))
        lines.append(f"{relative} {int(instance.label)} {float(instance.score)!r}\n")
    path = folder / INSTANCE / f"{scene_id}.txt"
    path.write_text("".join(lines))
    return path


def write_ground_truth(folder: Path, scene_id: str, semantic: np.ndarray,
                       instance: np.ndarray) -> None:
    """DIR/ground_truth/{semantic,instance}/<scene>.txt from the store's (N,) benchmark classes
    (IGNORE_INDEX: NYU40 id 0) and (N,) instance ids (-1 none)."""
    write_ids(folder / GROUND_TRUTH / SEMANTIC / f"{scene_id}.txt", scannet20_to_nyu40(semantic))
    write_ids(folder / GROUND_TRUTH / INSTANCE / f"{scene_id}.txt",
              encode_ground_truth(semantic, instance))


# ---------------------------------------------------------------------------- reading


def scenes_in(folder: Path, part: str) -> list[str]:
    """Scene ids with a DIR/<part>/<scene>.txt file, sorted ([] without the folder)."""
    if not (folder / part).is_dir():
        return []
    return sorted(path.stem for path in (folder / part).glob("*.txt") if path.is_file())


def read_ids(path: Path, n_vertices: int, what: str) -> np.ndarray:
    """(n_vertices,) int64 from a file of one integer per line; UserError naming the file when
    it is missing, unreadable, not integers, or of another length."""
    text = read_small_text(path, limit=32 * n_vertices + 1024)  # 32 bytes a line is plenty
    values = _parse_plain(text)
    lines = text.splitlines() if values is None else None
    count = len(values) if values is not None else len(lines)
    if count != n_vertices:
        raise UserError(f"{path} has {count} lines but the scene has {n_vertices} mesh "
                        f"vertices: write {what} per vertex of <scene>_vh_clean_2.ply, in its "
                        "order")
    if values is not None:
        return values
    try:
        return np.array([int(line) for line in lines], dtype=np.int64)
    except ValueError:
        bad = next(i for i, line in enumerate(lines) if not _is_int(line))
        raise UserError(f"{path} line {bad + 1}: {lines[bad]!r} is not an integer") from None
    except OverflowError:
        bad = next(i for i, line in enumerate(lines) if abs(int(line)) > _INT64_MAX)
        raise UserError(f"{path} line {bad + 1}: {lines[bad]!r} is out of range (a label id "
                        "or 0/1 is expected)") from None


_INT64_MAX = int(np.iinfo(np.int64).max)


def read_small_text(path: Path, limit: int) -> str:
    """The text of regular file `path`, at most `limit` bytes; UserError naming the file when
    it is missing, not a regular file (a device, a FIFO: they never end), larger, or not text."""
    try:
        if not path.is_file():
            raise UserError(f"cannot read {path}: not a regular file" if path.exists()
                            else f"cannot read {path}: no such file")
        size = path.stat().st_size
        if size > limit:
            raise UserError(f"{path} is {size} bytes, more than its lines can take ({limit}): "
                            "is it the right file?")
        return path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read {path}: {error}") from None


_DIGITS = str.maketrans("", "", "0123456789-\n")


def _parse_plain(text: str) -> np.ndarray | None:
    """The integers of `text` when it is plainly one per line (digits, minus signs and
    newlines only, no empty line), parsed in C (20x faster than a Python loop: 150k lines a
    mask, thousands of masks a submission); None for anything else, which the exact path
    reads or rejects with its line number."""
    if not text or text.translate(_DIGITS) or "\n\n" in text or text.startswith("\n"):
        return None
    lines = text.count("\n") + (not text.endswith("\n"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            values = np.fromstring(text, dtype=np.int64, sep="\n")
        except (ValueError, DeprecationWarning):
            return None
    if len(values) != lines or ((values == _INT64_MAX) | (values == -_INT64_MAX - 1)).any():
        return None  # saturated: possibly out of range, which the exact path says
    return values


def read_semantic(folder: Path, scene_id: str, n_vertices: int) -> np.ndarray:
    """(N,) int64 NYU40 ids of DIR/semantic/<scene>.txt."""
    return read_ids(folder / SEMANTIC / f"{scene_id}.txt", n_vertices, "one NYU40 label id")


def read_instances(folder: Path, scene_id: str, n_vertices: int) -> list[PredictedInstance]:
    """The instances of DIR/instance/<scene>.txt, in file order, masks (N,) bool."""
    root = folder / INSTANCE
    listing = root / f"{scene_id}.txt"
    lines = read_small_text(listing, limit=1 << 24).splitlines()  # 16 MB: ~200k instances
    entries: dict[Path, tuple[int, float]] = {}
    inside = os.path.abspath(root)
    for number, line in enumerate(lines, 1):
        where = f"{listing} line {number}"
        parts = line.split(" ")
        if len(parts) != 3:
            raise UserError(f"{where}: expected `predicted_masks/<scene>_NNN.txt <nyu40 id> "
                            f"<confidence>` (three fields, single spaces), got {line!r}")
        relative, label_text, score_text = parts
        if os.path.isabs(relative):
            raise UserError(f"{where}: the mask path {relative} must be relative to {root}")
        mask_path = Path(os.path.abspath(root / relative))
        if os.path.commonprefix([str(mask_path), inside]) != inside:
            raise UserError(f"{where}: the mask {relative} lies outside {root}")
        try:
            label, score = int(float(label_text)), float(score_text)
        except ValueError:
            raise UserError(f"{where}: label {label_text!r} and confidence {score_text!r} must be "
                            "numbers") from None
        if not math.isfinite(score):
            raise UserError(f"{where}: confidence {score_text} is not a finite number")
        entries[mask_path] = (label, score)
    return [PredictedInstance(read_ids(path, n_vertices, "one 0/1") != 0, label, score)
            for path, (label, score) in entries.items()]


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True
