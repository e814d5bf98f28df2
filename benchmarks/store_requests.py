"""`python -m benchmarks.store_requests`: HTTP requests (and seconds) to open a store on S3 and
read one scene, as earlier versions read it and as this one does (consolidated metadata, s3fs
without a size request before each read); rewrites its section of BENCHMARKS.md.

The store: S synthetic scenes (default 100) of a few frames each, written locally with the
store's own writer (no CLIP: the number of arrays, not their content, sets the requests),
uploaded to moto's S3 server on 127.0.0.1, measured as written before consolidated metadata
existed, read as earlier versions read it (s3fs's default max_concurrency, 10: a HEAD before
each GET) and with this version's default (storage.store._S3_DEFAULTS), then consolidated in
place (`FeatureStore.consolidate`, what the flow does at the end of a run) and measured again.
Requests are counted from the server's own request log.

Measured, each in a fresh S3 client (no fsspec cache carried over):
- open: `open_cache(url)`, `.scenes()` and `.featuresets()`: what a training script does first;
- read one scene: `.point_features(scene)` after that: its geometry, depth maps and feature
  grids, projected onto its points (what one training item costs).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

from benchmarks.common import machine
from benchmarks.common import update_markdown

SECTION = "store-requests"
"""BENCHMARKS.md's markers of this script's table: <!-- results:store-requests -->."""
FULL = {"scenes": 100, "frames": 8, "points": 2000, "repeats": 5}
QUICK = {"scenes": 4, "frames": 4, "points": 500, "repeats": 1}
DESCRIPTION = {"model": "synthetic", "pretrained": "none", "image_size": [56, 56],
               "grid_size": [4, 4], "patch_size": [14, 14], "resize": "squash",
               "spatial_kind": "tokens", "spatial_dim": 32, "global_dim": 16,
               "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "dtype": "float16"}
"""The feature set of the synthetic store (small grids: the requests do not depend on them)."""
S3FS_DEFAULT = 10
"""s3fs's own default max_concurrency, with which earlier versions read."""
_REQUEST = re.compile(r'"(GET|HEAD|PUT|POST|DELETE) (\S+) HTTP')


def write_store(path: Path, scenes: int, frames: int, points: int) -> str:
    """A local store of `scenes` complete scenes with one finished feature set; its id."""
    from storage import open_store

    store = open_store(path, mode="a")
    fid = store.register_featureset(DESCRIPTION)
    rng = np.random.default_rng(0)
    intrinsic = np.array([[40.0, 0, 31.5], [0, 40.0, 23.5], [0, 0, 1]])
    for index in range(scenes):
        scene_id = f"scene{index:04d}_00"
        xyz = rng.uniform([-1, -1, 2], [1, 1, 3], (points, 3)).astype(np.float32)
        store.create_scene(
            scene_id, frame_id=np.arange(frames), intrinsic_color=intrinsic,
            intrinsic_depth=intrinsic, color_size=(48, 64), depth_size=(48, 64), depth_scale=0.001,
            points=_Points(xyz, rng.integers(0, 255, (points, 3)), rng.integers(-1, 20, points),
                           rng.integers(-1, 5, points), rng.integers(0, 50, points)))
        store.create_features(scene_id, fid, tuple(DESCRIPTION["grid_size"]),
                              DESCRIPTION["spatial_dim"], DESCRIPTION["global_dim"])
        positions = list(range(frames))
        store.write_frames(scene_id, positions, pose=np.repeat(np.eye(4)[None], frames, 0),
                           valid=np.ones(frames, bool), reason=[""] * frames,
                           depth=np.full((frames, 48, 64), 2500, np.uint16))
        store.write_features(
            scene_id, fid, positions,
            spatial=rng.normal(size=(frames, *DESCRIPTION["grid_size"], DESCRIPTION["spatial_dim"])),
            global_=rng.normal(size=(frames, DESCRIPTION["global_dim"])))
    return fid


class _Points:
    def __init__(self, xyz, rgb, semantic, instance, segment):
        self.xyz, self.rgb, self.semantic, self.instance, self.segment = (
            xyz, rgb, semantic, instance, segment)


@contextlib.contextmanager
def s3_server(log: Path):
    """moto's S3 server on 127.0.0.1 with a bucket `bench`; yields its endpoint."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    binary = Path(sys.executable).parent / "moto_server"
    server = subprocess.Popen([str(binary), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=open(log, "w"), stderr=subprocess.STDOUT)
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1")
    try:
        for _ in range(300):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            time.sleep(0.1)
        endpoint = f"http://127.0.0.1:{port}"
        import s3fs

        s3fs.S3FileSystem(endpoint_url=endpoint).mkdir("bench")
        yield endpoint
    finally:
        server.terminate()
        server.wait(30)


class RequestLog:
    """Requests the server logged since `mark()`, by kind (GET, HEAD, LIST, PUT, ...)."""

    def __init__(self, path: Path):
        self.path, self.offset = path, 0

    def mark(self) -> None:
        time.sleep(0.3)  # the server writes its log line after answering
        self.offset = self.path.stat().st_size

    def since(self) -> Counter:
        time.sleep(0.3)
        with open(self.path) as log:
            log.seek(self.offset)
            text = log.read()
        kinds = Counter()
        for method, target in _REQUEST.findall(text):
            kinds["LIST" if method == "GET" and "list-type" in target else method] += 1
        return kinds


def measure(endpoint: str, url: str, log: RequestLog, repeats: int, **extra_options) -> dict:
    """Requests and seconds of opening the store and of reading one scene, `repeats` times."""
    from model.reader import open_cache

    options = {"endpoint_url": endpoint, "skip_instance_cache": True,
               "use_listings_cache": False, **extra_options}
    rows = {"open": [], "scene": []}
    for _ in range(repeats):
        log.mark()
        start = time.perf_counter()
        cache = open_cache(url, storage_options=options)
        scenes = cache.scenes()
        cache.featuresets()
        rows["open"].append((time.perf_counter() - start, log.since()))
        log.mark()
        start = time.perf_counter()
        points = cache.point_features(scenes[len(scenes) // 2])
        rows["scene"].append((time.perf_counter() - start, log.since()))
        assert points.seen.any()
    return {name: {"requests": statistics.median(sum(c.values()) for _, c in runs),
                   "requests_min": min(sum(c.values()) for _, c in runs),
                   "requests_max": max(sum(c.values()) for _, c in runs),
                   "by_kind": dict(runs[-1][1]),
                   "seconds": statistics.median(s for s, _ in runs),
                   "seconds_min": min(s for s, _ in runs), "seconds_max": max(s for s, _ in runs),
                   "scenes": len(scenes)}
            for name, runs in rows.items()}


def local_open_seconds(path: Path, repeats: int) -> dict:
    """Seconds to open a local store and list its scenes and feature sets, reading its zarr.json
    files or parsing its consolidated snapshot: why local stores are read without it."""
    from storage import open_store

    def seconds(consolidated: bool) -> list[float]:
        runs = []
        for _ in range(repeats + 1):  # the first warms the file system cache
            start = time.perf_counter()
            store = open_store(path, consolidated=consolidated)
            store.scenes(), store.featuresets()
            runs.append(time.perf_counter() - start)
        return runs[1:]

    return {name: {"seconds": statistics.median(runs), "seconds_min": min(runs),
                   "seconds_max": max(runs)}
            for name, runs in (("files", seconds(False)), ("snapshot", seconds(True)))}


def run(work: Path, sizes: dict) -> dict:
    import s3fs

    from storage import open_store

    local = work / "store.zarr"
    shutil.rmtree(local, ignore_errors=True)
    write_store(local, sizes["scenes"], sizes["frames"], sizes["points"])
    files = sum(1 for path in local.rglob("*") if path.is_file())
    metadata = sum(1 for _ in local.rglob("zarr.json"))
    with s3_server(work / "moto.log") as endpoint:
        log = RequestLog(work / "moto.log")
        s3fs.S3FileSystem(endpoint_url=endpoint).put(str(local), "bench/store.zarr",
                                                     recursive=True)
        url = "s3://bench/store.zarr"
        earlier = measure(endpoint, url, log, sizes["repeats"], max_concurrency=S3FS_DEFAULT)
        before = measure(endpoint, url, log, sizes["repeats"])
        log.mark()
        open_store(url, mode="a", storage_options={"endpoint_url": endpoint}).consolidate()
        consolidate = log.since()
        after = measure(endpoint, url, log, sizes["repeats"])
    open_store(local, mode="a").consolidate()
    local_open = local_open_seconds(local, sizes["repeats"])
    return {"sizes": sizes, "files": files, "metadata_files": metadata, "earlier": earlier,
            "local_open": local_open, "root_metadata_bytes": (local / "zarr.json").stat().st_size,
            "before": before,
            "after": after, "consolidate_requests": sum(consolidate.values()),
            "consolidate_by_kind": dict(consolidate)}


def format_section(figures: dict, command: str, where: str) -> str:
    sizes = figures["sizes"]
    lines = [
        f"Machine: {where}. Command: `{command}`. A store of {sizes['scenes']} synthetic scenes "
        f"({sizes['frames']} frames, {sizes['points']} points each; {figures['files']} objects, "
        f"{figures['metadata_files']} of them zarr.json) on moto's S3 server at 127.0.0.1; "
        f"{sizes['repeats']} runs each, a fresh S3 client per run; medians, min-max in brackets. "
        "Requests counted in the server's log.",
        "",
        "| step | earlier versions: no consolidated metadata, a HEAD before each GET | no "
        "consolidated metadata, this version's S3 defaults | this version: consolidated | "
        "earlier / this version |",
        "| --- | --- | --- | --- | --- |",
    ]
    names = {"open": "open the store, list scenes and feature sets",
             "scene": "read one scene: geometry, depth, features, projected onto its points"}
    for key, name in names.items():
        earlier, before, after = (figures[k][key] for k in ("earlier", "before", "after"))

        def cell(row: dict) -> str:
            kinds = ", ".join(f"{n} {k}" for k, n in sorted(row["by_kind"].items()))
            spread = (f" [{row['requests_min']:.0f}-{row['requests_max']:.0f}]"
                      if row["requests_min"] != row["requests_max"] else "")
            return (f"{row['requests']:.0f} requests{spread} ({kinds}); {row['seconds']:.3f} s "
                    f"[{row['seconds_min']:.3f}-{row['seconds_max']:.3f}]")

        lines.append(f"| {name} | {cell(earlier)} | {cell(before)} | {cell(after)} | "
                     f"{earlier['requests'] / max(1, after['requests']):.1f}x fewer requests |")
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(figures["consolidate_by_kind"].items()))
    lines.append(f"| consolidate at the end of a run (once) | - | - | "
                 f"{figures['consolidate_requests']} requests ({kinds}) | - |")
    files, snapshot = figures["local_open"]["files"], figures["local_open"]["snapshot"]
    lines += ["", f"On a local disk (same store, open and list): reading the zarr.json files "
              f"{files['seconds']:.3f} s [{files['seconds_min']:.3f}-{files['seconds_max']:.3f}], "
              f"parsing the consolidated snapshot ({figures['root_metadata_bytes'] / 1e6:.1f} MB) "
              f"{snapshot['seconds']:.3f} s [{snapshot['seconds_min']:.3f}-"
              f"{snapshot['seconds_max']:.3f}]; local stores are read without it."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.store_requests",
        description="Count the S3 requests (and time) to open a 100-scene store and read one "
        "scene, without and with consolidated metadata, on moto's S3 server at 127.0.0.1; "
        "print the table and (without --quick) rewrite its section of BENCHMARKS.md.")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK['scenes']} small scenes, {QUICK['repeats']} runs; "
                        "BENCHMARKS.md untouched")
    parser.add_argument("--scenes", type=int, default=None,
                        help=f"scenes in the store (default {FULL['scenes']})")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="scratch folder (default: a temporary one, deleted at the end)")
    args = parser.parse_args(argv)
    # a fresh S3 client per run leaves its HTTP session to the garbage collector, which says so
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    sizes = dict(QUICK if args.quick else FULL)
    if args.scenes:
        sizes["scenes"] = args.scenes
    with contextlib.ExitStack() as stack:
        work = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        work.mkdir(parents=True, exist_ok=True)
        figures = run(work, sizes)
    import torch

    load = os.getloadavg()[0]
    where = f"{machine(torch.device('cpu'))}, shared with other work (load average {load:.1f})"
    command = "python -m benchmarks.store_requests" + (" --quick" if args.quick else "")
    section = format_section(figures, command, where)
    print(section)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    if not args.quick:
        update_markdown(section, SECTION)
        print("\nwrote BENCHMARKS.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
