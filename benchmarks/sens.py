"""`python -m benchmarks.sens`: stage 1 on raw ScanNet (`<scene>.sens`) against the export route
on the same scene; rewrites its section of BENCHMARKS.md.

The scene: a synthetic scan at ScanNet's sizes (1296x968 JPEG at quality 92, 640x480 depth),
written as ScanNet distributes scans: `<scene>.sens` beside the mesh and annotation files (the
.sens by the tests' writer, tests/sens_writer.py, so run this from the repository root).

- export route: what ScanNet's SensReader (python) does for every frame, then stage 1 on the
  files: decode the JPEG and encode it again (Pillow, quality 75: imageio's default, which
  SensReader writes through), inflate the depth and write it as a 16-bit PNG (Pillow's default
  compression), write the pose as text (`%f`), plus the four intrinsic files; then
  `pipeline.extraction.extract_scene` on the export (`--dataset scannet`). Not imitated: that
  SensReader first loads the whole .sens into memory.
- .sens route: `extract_scene` straight from the .sens (`--dataset scannet-sens`).

Both routes extract with the same encoder object, one store per run, without Prefect (whose
start-up is the same for both and not what is compared). Medians of repeated runs after a
warm-up, on whatever else the machine is doing (its load average is printed with the figures).
It also reports how far the two stores agree (poses, depth, valid flags, features).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.common import machine, repeat
from benchmarks.common import update_markdown

REPO = Path(__file__).resolve().parents[1]
SECTION = "scannet-sens"
"""BENCHMARKS.md's markers of this script's table: <!-- results:scannet-sens -->."""
SENSREADER_JPEG_QUALITY = 75
"""imageio's default JPEG quality, with which SensReader's python export writes colour."""
SCANNET_FRAMES = 2_500_000
"""ScanNet v2's frames (1,513 scans), for the extrapolated rows."""

FULL = {"frames": 64, "models": ["test-ViT-tiny", "ViT-B-16"], "repeats": 3,
        "color_size": (968, 1296), "depth_size": (480, 640), "points": 20000}
QUICK = {"frames": 6, "models": ["test-ViT-tiny"], "repeats": 1,
         "color_size": (242, 324), "depth_size": (240, 320), "points": 3000}


def write_raw_scan(root: Path, sizes: dict) -> Path:
    """A synthetic scene written as ScanNet distributes it: root/raw/scene0000_00/ with the
    .sens holding the synthetic export's JPEG bytes (the export itself is deleted)."""
    from pipeline.synthetic import write_scene
    from tests.sens_writer import sens_from_export

    export = write_scene(root / "synthetic" / "scene0000_00", seed=(0, 21),
                         n_frames=sizes["frames"], color_size=sizes["color_size"],
                         depth_size=sizes["depth_size"], n_points=sizes["points"])
    raw = sens_from_export(export, root / "raw")
    shutil.rmtree(root / "synthetic")
    return raw


def export_like_sensreader(raw: Path, out: Path) -> dict:
    """SensReader's export of `raw/<scene>.sens` into `out/<scene>/` (color/, depth/, pose/,
    intrinsic/) beside copies of the scan's other files; returns its file count and bytes."""
    from pipeline.readers.scannet_sens import SensScene
    from pipeline.readers.sens_format import read_payload

    scene = SensScene(raw)
    target = out / scene.scene_id
    for folder in ("color", "depth", "pose", "intrinsic"):
        (target / folder).mkdir(parents=True)
    header, index = scene.header, scene.index
    for frame in range(index.readable):
        offset = int(index.color_offset[frame])
        color_bytes, depth_bytes = int(index.color_bytes[frame]), int(index.depth_bytes[frame])
        payload = read_payload(scene.sens_path, offset, color_bytes + depth_bytes)
        with Image.open(io.BytesIO(payload[:color_bytes])) as image:
            image.convert("RGB").save(target / "color" / f"{frame}.jpg",
                                      quality=SENSREADER_JPEG_QUALITY)
        depth = np.frombuffer(zlib.decompress(payload[color_bytes:]), dtype="<u2")
        Image.fromarray(depth.reshape(header.depth_size).astype(np.uint16)).save(
            target / "depth" / f"{frame}.png")
        np.savetxt(target / "pose" / f"{frame}.txt", index.pose[frame], fmt="%f")
    for name in ("color", "depth"):
        np.savetxt(target / "intrinsic" / f"intrinsic_{name}.txt",
                   getattr(header, f"intrinsic_{name}"), fmt="%f")
        np.savetxt(target / "intrinsic" / f"extrinsic_{name}.txt",
                   getattr(header, f"extrinsic_{name}"), fmt="%f")
    files = [p for folder in ("color", "depth", "pose", "intrinsic")
             for p in (target / folder).iterdir()]
    for path in raw.iterdir():  # the export lands beside the mesh files: link them
        if path.suffix != ".sens":
            (target / path.name).symlink_to(path.resolve())
    by_folder = {folder: sum(p.stat().st_size for p in (target / folder).iterdir())
                 for folder in ("color", "depth", "pose", "intrinsic")}
    return {"files": len(files), "bytes": sum(by_folder.values()), "bytes_by_folder": by_folder}


def measure(work: Path, sizes: dict) -> dict:
    """Per model, `repeats` rounds after a warm-up round; each round runs the export, the
    extraction from it and the extraction from the .sens, in alternating order, so that what
    else the machine does weighs on both routes alike. A round's ratio is its export route's
    time over its .sens route's time."""
    from pipeline.encoders.base import EncoderConfig
    from pipeline.encoders.clip import FrozenClipEncoder
    from pipeline.extraction import extract_scene
    from pipeline.readers.scannet import ScanNetScene
    from pipeline.readers.scannet_sens import SensScene
    from storage import open_store

    raw = write_raw_scan(work, sizes)
    runs = iter(range(10**6))
    export_info: dict = {}

    def export() -> Path:
        out = work / f"export-{next(runs)}"
        export_info.update(export_like_sensreader(raw, out))
        return out / raw.name

    def extract(scene, encoder) -> tuple:
        store = open_store(work / f"store-{next(runs)}.zarr", mode="a")
        featureset = store.register_featureset(encoder.describe())
        extract_scene(scene, store, encoder, featureset)
        return store, featureset

    def seconds(function, *args):
        start = time.perf_counter()
        result = function(*args)
        return time.perf_counter() - start, result

    index = repeat(lambda: SensScene(raw), sizes["repeats"])
    figures: dict = {"frames": sizes["frames"], "color_size": sizes["color_size"],
                     "depth_size": sizes["depth_size"], "repeats": sizes["repeats"],
                     "sens_bytes": (raw / f"{raw.name}.sens").stat().st_size,
                     "index_seconds": index.median, "models": []}
    export_runs = []
    for model in sizes["models"]:
        encoder = FrozenClipEncoder(EncoderConfig(model=model, pretrained="none"))
        rounds = []
        for round_index in range(sizes["repeats"] + 1):  # round 0 warms up
            times: dict = {}
            steps = ["export", "sens"] if round_index % 2 else ["sens", "export"]
            for step in steps:
                if step == "sens":
                    times["sens"], sens_store = seconds(extract, SensScene(raw), encoder)
                else:
                    times["export"], exported = seconds(export)
                    times["export_extract"], export_store = seconds(
                        extract, ScanNetScene(exported), encoder)
            if round_index:
                rounds.append(times)
        export_runs += [r["export"] for r in rounds]
        route = [r["export"] + r["export_extract"] for r in rounds]
        ratios = [total / r["sens"] for total, r in zip(route, rounds)]
        median = lambda key: statistics.median(r[key] for r in rounds)  # noqa: E731
        spread = lambda values: f"{min(values):.3g}-{max(values):.3g}"  # noqa: E731
        figures["models"].append({
            "model": model,
            "sens_seconds": median("sens"), "sens_spread": spread([r["sens"] for r in rounds]),
            "export_seconds": median("export"),
            "export_extract_seconds": median("export_extract"),
            "export_extract_spread": spread([r["export_extract"] for r in rounds]),
            "export_route_seconds": statistics.median(route),
            "saved_seconds": statistics.median(t - r["sens"] for t, r in zip(route, rounds)),
            "ratio": statistics.median(ratios), "ratio_spread": spread(ratios),
            "agreement": agreement(sens_store, export_store, raw.name),
        })
    figures["export"] = {**export_info, "seconds": statistics.median(export_runs),
                         "spread": f"{min(export_runs):.3g}-{max(export_runs):.3g}"}
    figures["ratio"] = figures["models"][-1]["ratio"]
    return figures


def agreement(sens, export, scene_id: str) -> dict:
    """How far the two routes' stores differ: poses (the export writes them with %f), depth,
    valid flags, and the spatial features (relative L2 per frame: the export's JPEGs are
    encoded again)."""
    (store_a, featureset), (store_b, _) = sens, export
    a, b = store_a.scene(scene_id), store_b.scene(scene_id)
    fa = store_a.features(scene_id, featureset).spatial.astype(np.float32)
    fb = store_b.features(scene_id, featureset).spatial.astype(np.float32)
    flat = lambda x: x.reshape(len(x), -1)  # noqa: E731
    relative = np.linalg.norm(flat(fa - fb), axis=1) / np.linalg.norm(flat(fa), axis=1)
    return {"pose_max_abs": float(np.abs(a.pose - b.pose).max()),
            "depth_equal": bool(np.array_equal(a.depth, b.depth)),
            "valid_equal": bool(np.array_equal(a.valid, b.valid)),
            "feature_relative_median": float(np.median(relative)),
            "feature_relative_max": float(relative.max())}


def format_section(figures: dict, command: str, where: str, load: tuple[float, float]) -> str:
    export, frames = figures["export"], figures["frames"]
    h, w = figures["color_size"]
    dh, dw = figures["depth_size"]
    per_frame_files = (export["files"] - 4) / frames
    per_frame_bytes = export["bytes"] / frames
    lines = [
        f"Machine: {where}, shared with other work (load average {load[0]:.1f} before, "
        f"{load[1]:.1f} after). Command: `{command}`. One synthetic scan of {frames} frames "
        f"({w}x{h} JPEG, {dw}x{dh} depth); per model, {figures['repeats']} rounds after a warm-up "
        "round, each running both routes in alternating order; medians (min-max in brackets).",
        "",
        "| route | model | seconds | frames/s |",
        "| --- | --- | --- | --- |",
        f"| export alone (SensReader's work), all rounds | - | {export['seconds']:.2f} "
        f"[{export['spread']}] | {frames / export['seconds']:.1f} |",
    ]
    for row in figures["models"]:
        lines += [
            f"| export route: export + extraction from the files | {row['model']} | "
            f"{row['export_route_seconds']:.2f} ({row['export_seconds']:.2f} + "
            f"{row['export_extract_seconds']:.2f} [{row['export_extract_spread']}]) | "
            f"{frames / row['export_route_seconds']:.1f} |",
            f"| .sens route: extraction from `<scene>.sens` | {row['model']} | "
            f"{row['sens_seconds']:.2f} [{row['sens_spread']}] | "
            f"{frames / row['sens_seconds']:.1f} |",
        ]
    lines += [
        "",
        "| | .sens route | export route |",
        "| --- | --- | --- |",
    ]
    for row in figures["models"]:
        lines.append(f"| time, {row['model']} | {row['sens_seconds']:.2f} s | "
                     f"{row['ratio']:.2f}x [{row['ratio_spread']}] the .sens route's, "
                     f"{1e3 * row['saved_seconds'] / frames:+.0f} ms a frame |")
    lines += [
        f"| disk beyond the .sens ({figures['sens_bytes'] / 1e6:.1f} MB) | 0 | "
        f"{export['bytes'] / 1e6:.1f} MB in {export['files']} files ("
        + ", ".join(f"{name} {size / 1e6:.1f} MB" for name, size in
                    export["bytes_by_folder"].items()) + ") |",
        f"| ScanNet's {SCANNET_FRAMES / 1e6:.1f}M frames (extrapolated) | 0 files | "
        f"{per_frame_files * SCANNET_FRAMES / 1e6:.1f}M files, "
        f"{per_frame_bytes * SCANNET_FRAMES / 1e12:.2f} TB at these synthetic frames' sizes, "
        f"{export['seconds'] / frames * SCANNET_FRAMES / 3600:.0f} hours of export at this "
        "rate (one process) |",
        f"| indexing the .sens (header + 96 bytes a frame) | "
        f"{1e3 * figures['index_seconds']:.1f} ms ({1e6 * figures['index_seconds'] / frames:.0f} "
        "us a frame) | - |",
        "",
        "Agreement of the two stores: " + "; ".join(
            f"{row['model']}: poses within {row['agreement']['pose_max_abs']:.1e} m (the export's "
            f"`%f` text), depth {'equal' if row['agreement']['depth_equal'] else 'DIFFERENT'}, "
            f"valid flags {'equal' if row['agreement']['valid_equal'] else 'DIFFERENT'}, spatial "
            f"features {100 * row['agreement']['feature_relative_median']:.1f}% apart (median "
            f"relative L2 per frame, max {100 * row['agreement']['feature_relative_max']:.1f}%: "
            "the export's JPEGs are encoded again)" for row in figures["models"]) + ".",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.sens",
        description="Stage 1 on a raw ScanNet-style scan (<scene>.sens) against the export route "
        "(SensReader-style export to files, then extraction) on the same synthetic scene: time, "
        "files and bytes; rewrites the scannet-sens section of BENCHMARKS.md (a few CPU minutes). "
        "Run from the repository root.")
    parser.add_argument("--quick", action="store_true",
                        help="6 small frames, test-ViT-tiny only, 1 run; BENCHMARKS.md untouched")
    parser.add_argument("--frames", type=int, default=None,
                        help=f"frames of the scan (default {FULL['frames']}, {QUICK['frames']} "
                        "with --quick)")
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"timed runs per measurement (default {FULL['repeats']}, "
                        f"{QUICK['repeats']} with --quick)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="scratch folder (default: a temporary one, deleted at the end)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", message=".*(random|RANDOM).*weights")  # pretrained="none"
    sizes = dict(QUICK if args.quick else FULL)
    sizes.update({key: value for key, value in (("frames", args.frames),
                                                 ("repeats", args.repeats)) if value})
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        work = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        work.mkdir(parents=True, exist_ok=True)
        figures = measure(work, sizes)
    figures.update({"machine": machine(torch.device("cpu")), "load_average": [
        load_before, os.getloadavg()[0]], "seconds": time.perf_counter() - start})
    command = "python -m benchmarks.sens" + (" --quick" if args.quick else "")
    section = format_section(figures, command, figures["machine"], tuple(figures["load_average"]))
    print(section)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    if not args.quick:
        update_markdown(section, SECTION)
        print(f"\nwrote {REPO / 'BENCHMARKS.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
