"""`python -m storage.inspect STORE [--json] [--verify]`: what a feature store holds and what it
costs, and the conventions and dimension names it records (or that it predates them); with
--verify, every missing or corrupt chunk by scene, frame and file."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np
import zarr

from cli.arguments import add_storage_options_argument
from cli.commands import repair_command
from cli.run import run_command
from storage.featureset import OPEN_CLIP, FeatureSetSpec
from storage.integrity import Problem, store_problems
from storage.conventions import format_found, found_in
from storage.options import parse_storage_options
from storage.store import FeatureStore, open_store


def featureset_sizes(store: FeatureStore, scene_ids: list[str],
                     featuresets: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Per feature set (default: all), over `scene_ids`: bytes stored and uncompressed of its
    spatial and global arrays, frames done and valid, values clamped to float16, the
    compression ratio and bytes per frame (None without frames). Reads the metadata of those
    scenes' feature arrays only, not a listing of the store."""
    wanted = list(store.featuresets()) if featuresets is None else featuresets
    sizes = {fid: {"bytes": 0, "bytes_uncompressed": 0, "frames": 0, "clamped": 0}
             for fid in wanted}
    for scene_id in scene_ids:
        available = store.children(f"scenes/{scene_id}/features")
        valid = store.valid(scene_id)
        for fid in wanted:
            if fid not in available:
                continue
            done_mask = store.done(scene_id, fid)
            for name in ("spatial", "global"):
                array = store.node(f"scenes/{scene_id}/features/{fid}/{name}")
                sizes[fid]["bytes"] += array.nbytes_stored()
                sizes[fid]["bytes_uncompressed"] += array.nbytes
            sizes[fid]["frames"] += int((done_mask & valid).sum())
            sizes[fid]["clamped"] += int(store.clamped(scene_id, fid).sum())
    for figures in sizes.values():
        stored = figures["bytes"]
        figures["compression_ratio"] = figures["bytes_uncompressed"] / stored if stored else None
        figures["bytes_per_frame"] = stored / figures["frames"] if figures["frames"] else None
    return sizes


def summarise(store: FeatureStore) -> dict[str, Any]:
    """Scenes (frames, valid, invalid reasons, not yet processed, done and clamped values per
    feature set), feature sets (their spec's attributes and, under "storage", their sizes) and
    bytes."""
    specs = store.featuresets()
    scenes: dict[str, Any] = {}
    for scene_id in store.scenes():
        frame_id = store.node(f"scenes/{scene_id}/frames/frame_id")[:]
        valid = store.valid(scene_id)
        reason = store.frame_array(scene_id, "frames/reason", np.arange(valid.size))[:]
        available = store.children(f"scenes/{scene_id}/features")
        done, processed = {}, valid | (reason != "")
        for fid in specs:
            if fid not in available:
                continue
            done_mask = store.done(scene_id, fid)
            processed |= done_mask
            done[fid] = int(done_mask.sum())
        scenes[scene_id] = {
            "frames": int(frame_id.size),
            "valid": int(valid.sum()),
            "invalid": {str(f): str(r) for f, r, v in zip(frame_id, reason, valid)
                        if not v and r},
            "not_processed": int((~processed).sum()),
            "lost_state": int((processed & ~valid & (reason == "")).sum()),
            "done": done,
            "points": int(store.node(f"scenes/{scene_id}/points/xyz").shape[0]),
        }
    sizes = featureset_sizes(store, list(scenes))
    featuresets = {fid: {**spec.to_attrs(), "storage": sizes[fid]} for fid, spec in specs.items()}
    everything = zarr.open_group(store.root.store, path=store.root.path, mode="r",
                                 use_consolidated=False)  # also arrays written since a snapshot
    total = sum(
        array.nbytes_stored()
        for _, array in everything.members(max_depth=None)
        if isinstance(array, zarr.Array)
    )
    return {"store": store.url, "featuresets": featuresets, "scenes": scenes, "bytes": int(total)}


def format_report(report: dict[str, Any]) -> str:
    """The summary as a few aligned tables a person can read."""
    lines = [f"store {report['store']}: {len(report['scenes'])} scenes, "
             f"{format_bytes(report['bytes'])} on disk", "", "feature sets:"]
    for fid, attrs in report["featuresets"].items():
        spec, sizes = FeatureSetSpec.from_attrs(attrs), attrs["storage"]
        ratio = f"{sizes['compression_ratio']:.2f}x" if sizes["compression_ratio"] else "-"
        per_frame = format_bytes(sizes["bytes_per_frame"]) if sizes["bytes_per_frame"] else "-"
        warning = "  RANDOM WEIGHTS: features are meaningless" if spec.random_weights else ""
        family = "" if spec.encoder == OPEN_CLIP else f" ({spec.encoder})"
        lines.append(
            f"  {fid}  {spec.model}{family} / {spec.pretrained}  "
            f"{spec.spatial_kind} {list(spec.grid_size)}x{spec.spatial_dim} + global "
            f"{spec.global_dim}  {spec.resize} {list(spec.image_size)} {spec.decode} decode  "
            f"{format_bytes(sizes['bytes'])} ({per_frame}/frame, compression {ratio}){warning}"
        )
        if sizes.get("clamped"):
            lines.append(f"  {'':<12}  {sizes['clamped']} feature values were beyond float16's "
                         "range and are stored clamped to +-65504")
    if not report["featuresets"]:
        lines.append("  none")
    if "conventions" in report:
        lines += ["", *format_found(report["conventions"])]
    lines += ["", f"{'scene':<16} {'frames':>6} {'valid':>6} {'points':>8}  done per feature set"]
    for scene_id, scene in report["scenes"].items():
        done = ", ".join(f"{fid}: {n}" for fid, n in scene["done"].items()) or "-"
        lines.append(f"{scene_id:<16} {scene['frames']:>6} {scene['valid']:>6} "
                     f"{scene['points']:>8}  {done}")
        if scene["lost_state"]:
            lines.append(f"{'':<16} {scene['lost_state']} done frames lost their valid flag "
                         "(a missing chunk): run with --verify")
        if scene["not_processed"]:
            lines.append(f"{'':<16} {scene['not_processed']} frames not processed yet (rerun "
                         "extract-clip to finish them)")
        for frame, reason in list(scene["invalid"].items())[:5]:
            lines.append(f"{'':<16} invalid frame {frame}: {reason}")
        if len(scene["invalid"]) > 5:
            lines.append(f"{'':<16} ... and {len(scene['invalid']) - 5} more invalid frames")
    return "\n".join(lines)


def format_problems(problems: list[Problem], store_url: str) -> str:
    """One line per missing or corrupt file, then what to run."""
    if not problems:
        return "verify: every chunk is present and decodes; features are finite"
    frames = {(p.scene_id, p.frame) for p in problems if p.frame is not None}
    return "\n".join([f"verify: {len(problems)} missing or corrupt files ({len(frames)} frames):",
                      *(f"  {problem.line()}" for problem in problems),
                      f"repair: {repair_command(store_url)} redoes those frames "
                      "(and rewrites a scene's damaged points or frame table)"])


def format_bytes(n_bytes: float) -> str:
    """A size as people read it, in SI units (1 KB = 1000 bytes, 1 MB = 10^6, 1 GB = 10^9, as
    disks and cloud bills count): every size this project prints goes through here."""
    for unit in ("B", "KB", "MB", "GB"):
        if n_bytes < 1000 or unit == "GB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1000
    return f"{n_bytes:.1f} GB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m storage.inspect",
        description="Print a feature store's scenes (frames valid/done), feature sets, size on "
        "disk, compression ratio, and the conventions and dimension names it records.",
    )
    parser.add_argument("store", help="store path or fsspec URL (e.g. storage/scannet.zarr)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--verify", action="store_true",
                        help="read every chunk back and list the missing or corrupt ones by scene, "
                        "frame and file (exit status 1 when there are any); reads the whole store")
    add_storage_options_argument(parser)
    args = parser.parse_args(argv)

    def inspect_command() -> int:
        store = open_store(args.store, storage_options=parse_storage_options(args.storage_options),
                           consolidated=not args.verify)  # --verify: every zarr.json as it is
        problems = store_problems(store) if args.verify else []
        report = ({**summarise(store), "conventions": found_in(store)} if not problems
                  else {"store": store.url})
        if args.verify:
            report["problems"] = [problem.__dict__ for problem in problems]
        if args.json:
            print(json.dumps(report, indent=2, default=_jsonable))
        else:
            print(format_problems(problems, store.url) if problems else format_report(report))
            if args.verify and not problems:
                print(format_problems(problems, store.url))
        return 1 if problems else 0

    return run_command(inspect_command, error_status=2)


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot serialise {type(value)}")


if __name__ == "__main__":
    sys.exit(main())
