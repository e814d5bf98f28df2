"""`python -m storage.inspect STORE [--json]`: what a feature store holds and what it costs."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np
import zarr

from storage.errors import UserError
from storage.store import (FeatureStore, add_storage_options_argument, open_store,
                           parse_storage_options)


def summarise(store: FeatureStore) -> dict[str, Any]:
    """Scenes (frames, valid, invalid reasons, done per feature set), feature sets and bytes."""
    featuresets = store.featuresets()
    feature_bytes = {fid: {"bytes": 0, "bytes_uncompressed": 0, "frames": 0} for fid in featuresets}
    scenes: dict[str, Any] = {}
    for scene_id in store.scenes():
        frames = store.root["scenes"][scene_id]["frames"]
        frame_id, valid = frames["frame_id"][:], frames["valid"][:]
        reason = frames["reason"][:]
        features = store.root["scenes"][scene_id].get("features")
        done = {}
        for fid in featuresets:
            if features is None or fid not in features:
                continue
            done_mask = features[fid]["done"][:]
            done[fid] = int(done_mask.sum())
            for name in ("spatial", "global"):
                array = features[fid][name]
                feature_bytes[fid]["bytes"] += array.nbytes_stored()
                feature_bytes[fid]["bytes_uncompressed"] += array.nbytes
            feature_bytes[fid]["frames"] += int((done_mask & valid).sum())
        scenes[scene_id] = {
            "frames": int(frame_id.size),
            "valid": int(valid.sum()),
            "invalid": {str(f): str(r) for f, r, v in zip(frame_id, reason, valid) if not v},
            "done": done,
            "points": int(store.root["scenes"][scene_id]["points"]["xyz"].shape[0]),
        }
    for fid, sizes in feature_bytes.items():
        stored = sizes["bytes"]
        sizes["compression_ratio"] = sizes["bytes_uncompressed"] / stored if stored else None
        sizes["bytes_per_frame"] = stored / sizes["frames"] if sizes["frames"] else None
        featuresets[fid] = {**featuresets[fid], "storage": sizes}
    total = sum(
        array.nbytes_stored()
        for _, array in store.root.members(max_depth=None)
        if isinstance(array, zarr.Array)
    )
    return {"store": store.url, "featuresets": featuresets, "scenes": scenes, "bytes": int(total)}


def format_report(report: dict[str, Any]) -> str:
    """The summary as a few aligned tables a person can read."""
    lines = [f"store {report['store']}: {len(report['scenes'])} scenes, "
             f"{_human(report['bytes'])} on disk", "", "feature sets:"]
    for fid, description in report["featuresets"].items():
        sizes = description["storage"]
        ratio = f"{sizes['compression_ratio']:.2f}x" if sizes["compression_ratio"] else "-"
        per_frame = _human(sizes["bytes_per_frame"]) if sizes["bytes_per_frame"] else "-"
        warning = "  RANDOM WEIGHTS: features are meaningless" if description.get("random_weights") else ""
        lines.append(
            f"  {fid}  {description.get('model')} / {description.get('pretrained')}  "
            f"{description.get('spatial_kind')} {description.get('grid_size')}x"
            f"{description.get('spatial_dim')} + global {description.get('global_dim')}  "
            f"{description.get('resize')} {description.get('image_size')}  "
            f"{_human(sizes['bytes'])} ({per_frame}/frame, compression {ratio}){warning}"
        )
    if not report["featuresets"]:
        lines.append("  none")
    lines += ["", f"{'scene':<16} {'frames':>6} {'valid':>6} {'points':>8}  done per feature set"]
    for scene_id, scene in report["scenes"].items():
        done = ", ".join(f"{fid}: {n}" for fid, n in scene["done"].items()) or "-"
        lines.append(f"{scene_id:<16} {scene['frames']:>6} {scene['valid']:>6} "
                     f"{scene['points']:>8}  {done}")
        for frame, reason in list(scene["invalid"].items())[:5]:
            lines.append(f"{'':<16} invalid frame {frame}: {reason}")
        if len(scene["invalid"]) > 5:
            lines.append(f"{'':<16} ... and {len(scene['invalid']) - 5} more invalid frames")
    return "\n".join(lines)


def _human(n_bytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n_bytes < 1024 or unit == "GB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024
    return f"{n_bytes:.1f} GB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m storage.inspect",
        description="Print a feature store's scenes (frames valid/done), feature sets, size on "
        "disk and compression ratio.",
    )
    parser.add_argument("store", help="store path or fsspec URL (e.g. storage/scannet.zarr)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    add_storage_options_argument(parser)
    args = parser.parse_args(argv)
    try:
        report = summarise(open_store(args.store,
                                      storage_options=parse_storage_options(args.storage_options)))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2, default=_jsonable) if args.json else format_report(report))
    return 0


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot serialise {type(value)}")


if __name__ == "__main__":
    sys.exit(main())
