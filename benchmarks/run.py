"""`python -m benchmarks.run`: measure the pipeline against its baselines, write BENCHMARKS.md.

Rows (each a ratio measured in one run where a ratio makes sense, bigger is better):

- extraction: frames/s of the whole extract-clip flow (decode + model + store writes, over the
  scene tasks' wall time) vs the bare model forward on pre-decoded tensors, same encoder object
  and batch size; plus the machine's JPEG+PNG decode rate on the flow's decode path, the
  ceiling of a decode-bound flow, measured round by round beside the flow (`flow_vs_decode`).
- decode: stage 1's scaled (DCT) decode against the full decode, per core, with the model
  input's PSNR and the features' cosine between the two paths (benchmarks.decode).
- fusion_overhead: the cached training step over the 3D-only step (benchmarks.fusion_overhead).
- fuse_features: training's projection against a per-view numpy loop, same answer
  (benchmarks.fuse).
- run_overhead: seconds before a run's first frames are encoded, with Prefect's temporary
  server and with a running one (benchmarks.run_overhead).
- scannet_scale: stage 2's data path on a 150k-point, 2,000-frame scene written directly into
  a store (benchmarks.scannet_scale).
- cached_vs_online: training step time and peak memory with cached features vs CLIP run inside
  the step (benchmarks.online_clip, one process per mode); CLIP passes of a second experiment.
- projection: point-view pairs/s of pipeline.projection.project vs the per-view numpy loop of
  OpenScene's fusion script, and how far their visibility masks agree.
- store: bytes per frame and compression per feature set, scenes/s of the training data path
  (store read + projection), and the data-wait fraction of real training epochs.
- scaling: extraction time vs frames and projection time vs points x views, three sizes each.
- backbone: U-Net forward + backward with convolutions over active pairs vs the all-27-neighbours
  baseline on a 100k-voxel room, peak memory, one convolution per width against spconv's CPU
  forward when installed (benchmarks.backbone; its own table and BENCHMARKS.md section).

--quick uses the tiny model, small sizes and 2 repeats, and leaves BENCHMARKS.md alone;
--no-backbone leaves the backbone's rows out.
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
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from benchmarks import backbone, decode, fuse, fusion_overhead, run_overhead, scannet_scale
from benchmarks.common import MARKDOWN, machine, repeat, update_markdown

REPO = Path(__file__).resolve().parents[1]


def _quietly(function, *args, **kwargs):
    """Run a flow without its console logs and progress bars (the table is the output)."""
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        return function(*args, **kwargs)


def write_dataset(root: Path, scenes: int, frames: int, points: int = 20000) -> Path:
    """Synthetic scenes at ScanNet's sizes (1296x968 JPEG, 640x480 depth)."""
    from pipeline.synthetic import write_scenes

    if not root.exists():
        write_scenes(root, n_scenes=scenes, n_frames=frames, n_points=points)
    return root


def bench_extraction(root: Path, work: Path, model: str, batch: int, device: str,
                     repeats: int) -> dict:
    from flows.extract_clip import _encoder, extract_clip
    from pipeline.encoders.base import EncoderConfig
    from pipeline.readers.synthetic import SyntheticScene

    config = EncoderConfig(model=model, pretrained="none", device=device)
    encoder = _encoder(json.dumps(config.__dict__, sort_keys=True))  # the flow's own instance
    scenes = [SyntheticScene.open(p) for p in sorted(root.iterdir()) if p.is_dir()]
    inputs = torch.stack([encoder.preprocess(s.read_frame(int(f)).color)
                          for s in scenes for f in s.frame_ids])
    n_frames = len(inputs)

    def bare() -> None:
        for start in range(0, n_frames, batch):
            encoder.encode(inputs[start:start + batch])

    def decode_all(preprocess=encoder.preprocess) -> None:
        """The flow's per-frame CPU work (JPEG, PNG and pose read, resize), on every core."""
        def one(scene, frame_id):
            frame = scene.read_frame(int(frame_id), color_min_size=preprocess.decode_size)
            return preprocess(frame.color, frame.color_reduction, scene.color_size)

        with ThreadPoolExecutor(os.cpu_count()) as pool:
            list(pool.map(lambda a: one(*a), [(s, f) for s in scenes for f in s.frame_ids]))

    bare()  # warm-up
    _quietly(extract_clip, root=str(root), store=str(work / "warmup.zarr"), dataset="synthetic",
             model=model, pretrained="none", batch_size=batch, device=device, workers=1)
    decode_all()  # warm-up
    flow_fps, bare_fps, decode_fps, ratios = [], [], [], []
    for index in range(repeats):  # the three side by side, round after round
        bare_fps.append(n_frames / repeat(bare, 1, warmup=0).median)
        summary = _quietly(extract_clip, root=str(root), store=str(work / f"run{index}.zarr"),
                           dataset="synthetic", model=model, pretrained="none",
                           batch_size=batch, device=device, workers=1)
        flow_fps.append(summary["frames_per_second"])
        ratios.append(flow_fps[-1] / bare_fps[-1])
        decode_fps.append(n_frames / repeat(decode_all, 1, warmup=0).median)
    full = replace(encoder.preprocess, decode="full")
    decode_full = repeat(lambda: decode_all(full), 1)
    over_decode = [f / d for f, d in zip(flow_fps, decode_fps)]
    return {
        "model": model, "frames": n_frames, "batch": batch, "repeats": repeats,
        "flow_fps": statistics.median(flow_fps), "bare_fps": statistics.median(bare_fps),
        "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
        "decode_fps": statistics.median(decode_fps),
        "decode_full_fps": n_frames / decode_full.median,
        "flow_over_decode": statistics.median(over_decode),
        "flow_over_decode_min": min(over_decode), "flow_over_decode_max": max(over_decode),
    }


def bench_cached_vs_online(store: str, root: Path, model: str, device: str, steps: int) -> dict:
    def run(mode: str) -> dict:
        command = [sys.executable, "-m", "benchmarks.online_clip", "--store", store, "--mode", mode,
                   "--scenes-root", str(root), "--model", model, "--steps", str(steps),
                   "--device", device]
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True)
        return json.loads(result.stdout.strip().splitlines()[-1])

    cached, online = run("cached"), run("online")
    return {
        "model": model, "steps": steps, "views_per_step": cached["views_per_step"],
        "cached_step_s": cached["step_seconds"], "online_step_s": online["step_seconds"],
        "ratio": online["step_seconds"] / cached["step_seconds"],
        "cached_peak_mb": cached["peak_memory_mb"], "online_peak_mb": online["peak_memory_mb"],
        "online_clip_passes_per_step": online["clip_forward_passes"] // (steps + 1),
        "second_experiment_clip_passes": cached["clip_forward_passes"],
        "cached_imports_open_clip": cached["open_clip_imported"],
    }


def bench_projection(store_path: str, device: str, repeats: int) -> dict:
    from pipeline.projection import project, project_loop_numpy
    from storage import open_store

    store = open_store(store_path)
    scene = store.scene(store.scenes()[0])
    points = torch.as_tensor(scene.xyz, device=device)
    args = (scene.pose, scene.intrinsic_depth, scene.depth)
    vectorised = repeat(lambda: project(points, *args, depth_scale=scene.depth_scale), repeats)
    loop = repeat(lambda: project_loop_numpy(scene.xyz, *args, depth_scale=scene.depth_scale),
                  repeats)
    _, fast = project(points, *args, depth_scale=scene.depth_scale)
    _, slow = project_loop_numpy(scene.xyz, *args, depth_scale=scene.depth_scale)
    fast = fast.cpu().numpy()
    pairs = fast.size
    return {
        "points": len(scene.xyz), "views": len(scene.pose), "repeats": repeats,
        "vectorised_pairs_per_s": pairs / vectorised.median, "loop_pairs_per_s": pairs / loop.median,
        "ratio": loop.median / vectorised.median,
        "mask_agreement": float((fast == slow).mean()),
        "visible_iou": float((fast & slow).sum() / max(1, (fast | slow).sum())),
    }


def bench_store(store_path: str, work: Path, repeats: int, device: str) -> dict:
    from model.config import TrainConfig
    from model.dataset import CachedScenes
    from model.train import Trainer
    from storage import open_store
    from storage.inspect import featureset_sizes

    store = open_store(store_path)
    (featureset,) = store.featuresets()
    ids = store.scenes()
    loader = CachedScenes({s: store for s in ids}, featureset, torch.device(device), cache_bytes=0)
    load = repeat(lambda: [loader.load(s) for s in ids], repeats)

    def data_wait(cache_gb: float) -> float:
        config = TrainConfig(cache=store_path, out=str(work / f"train-{cache_gb}"), epochs=3,
                             batch_scenes=1, val_fraction=0.3, plot=False, device=device,
                             scene_cache_gb=cache_gb)
        history = _quietly(Trainer(config).fit)
        return statistics.median(r["data_wait_fraction"] for r in history[1:])

    sizes = featureset_sizes(store, store.scenes())
    featuresets = {fid: {"model": spec.model, "bytes_per_frame": sizes[fid]["bytes_per_frame"],
                         "compression": sizes[fid]["compression_ratio"]}
                   for fid, spec in store.featuresets().items()}
    return {
        "featuresets": featuresets,
        "scenes_per_s": len(ids) / load.median,
        "data_wait_fraction": data_wait(2.0),
        "data_wait_fraction_uncached": data_wait(0.0),
    }


def bench_scaling(root_of, work: Path, device: str, repeats: int, sizes) -> dict:
    from pipeline.encoders.base import EncoderConfig
    from pipeline.encoders.clip import FrozenClipEncoder
    from pipeline.extraction import extract_scene
    from pipeline.projection import project
    from pipeline.readers.synthetic import SyntheticScene
    from storage import open_store

    encoder = FrozenClipEncoder(EncoderConfig(model="test-ViT-tiny", pretrained="none",
                                              device=device))
    extraction = []
    for frames in sizes["frames"]:
        scene = SyntheticScene.open(root_of(frames) / "scene0000_00")

        def extract(frames=frames, scene=scene) -> None:
            path = work / f"scaling-{frames}.zarr"
            shutil.rmtree(path, ignore_errors=True)
            store = open_store(path, mode="a")
            extract_scene(scene, store, encoder, store.register_featureset(encoder.describe()))

        extraction.append({"frames": frames, "seconds": repeat(extract, repeats).median})
    projection = []
    generator = torch.Generator().manual_seed(0)
    for n_points, n_views in sizes["projection"]:
        points = torch.rand(n_points, 3, generator=generator) * 4
        poses = torch.eye(4).repeat(n_views, 1, 1)
        poses[:, :3, 3] = torch.rand(n_views, 3, generator=generator) * 4 - torch.tensor([0, 0, 3])
        depth = torch.full((n_views, 480, 640), 3000, dtype=torch.int16)
        intrinsic = torch.tensor([[577.0, 0, 320], [0, 577.0, 240], [0, 0, 1]])
        args = (points.to(device), poses, intrinsic, depth)
        seconds = repeat(lambda: project(*args), repeats).median
        projection.append({"points": n_points, "views": n_views, "seconds": seconds,
                           "ns_per_pair": 1e9 * seconds / (n_points * n_views)})
    return {"extraction": extraction, "projection": projection}


def bench_decode(root: Path, model: str, device: str, repeats: int, quick: bool) -> dict:
    """The decode row on the long scene's JPEGs (ScanNet's size) and on camera-like ones."""
    from pipeline.encoders.base import EncoderConfig
    from pipeline.encoders.clip import FrozenClipEncoder

    scene_dir = next(p for p in sorted(root.iterdir()) if p.is_dir())
    scene_jpegs = [path.read_bytes() for path in
                   sorted((scene_dir / "color").glob("*.jpg"), key=lambda p: int(p.stem))][:16]
    textured = [decode.jpeg_bytes(decode.textured_image((968, 1296), seed))
                for seed in range(2 if quick else 8)]
    encoder = FrozenClipEncoder(EncoderConfig(model=model, pretrained="none", device=device))
    return decode.bench_decode(scene_jpegs, textured, encoder, repeats)


def format_table(results: dict, device: str, command: str) -> str:
    e = results["extraction"]
    c, p, s, g = (results[k] for k in ("cached_vs_online", "projection", "store", "scaling"))
    lines = [
        _header(results, command),
        "",
        "| row | measured | baseline | ratio (bigger is better) |",
        "| --- | --- | --- | --- |",
    ]
    for row in e["models"]:
        lines.append(
            f"| extraction {row['model']}, {row['frames']} frames, batch {row['batch']} | flow "
            f"{row['flow_fps']:.1f} frames/s | bare model {row['bare_fps']:.1f} frames/s (decode "
            f"alone {row['decode_fps']:.0f} frames/s) | {row['ratio']:.2f} "
            f"[{row['ratio_min']:.2f}-{row['ratio_max']:.2f}] |")
    lines.append(
        f"| training step, {c['model']}, {c['views_per_step']} views | cached {c['cached_step_s']:.3f} s, "
        f"peak {c['cached_peak_mb']:.0f} MB | online CLIP {c['online_step_s']:.3f} s, peak "
        f"{c['online_peak_mb']:.0f} MB, {c['online_clip_passes_per_step']} CLIP passes/step | "
        f"{c['ratio']:.1f} |")
    lines.append(f"| CLIP passes of a second experiment on the store | "
                 f"{c['second_experiment_clip_passes']} (open_clip imported: "
                 f"{c['cached_imports_open_clip']}) | every view, every step | - |")
    lines.append(
        f"| projection, {p['points']} points x {p['views']} views | {p['vectorised_pairs_per_s']:.3g} "
        f"pairs/s | per-view numpy loop {p['loop_pairs_per_s']:.3g} pairs/s | {p['ratio']:.1f} "
        f"(masks agree on {100 * p['mask_agreement']:.3f}% of pairs, visible IoU "
        f"{p['visible_iou']:.4f}) |")
    for fid, figures in s["featuresets"].items():
        lines.append(f"| store, feature set {fid} ({figures['model']}) | "
                     f"{figures['bytes_per_frame'] / 1e3:.0f} KB/frame (spatial + global, float16) "
                     f"| compression {figures['compression']:.2f}x (zstd) | - |")
    lines.append(
        f"| training data path | {s['scenes_per_s']:.1f} scenes/s (read + project) | data wait "
        f"{100 * s['data_wait_fraction']:.1f}% of epoch time with the scene cache, "
        f"{100 * s['data_wait_fraction_uncached']:.1f}% without | - |")
    ext = ", ".join(f"{r['frames']} frames {r['seconds']:.2f} s" for r in g["extraction"])
    proj = ", ".join(f"{r['points']}x{r['views']} {r['seconds'] * 1e3:.1f} ms "
                     f"({r['ns_per_pair']:.1f} ns/pair)" for r in g["projection"])
    lines.append(f"| scaling, extraction test-ViT-tiny | {ext} | - | - |")
    lines.append(f"| scaling, projection | {proj} | - | - |")
    return "\n".join(lines)


def format_performance(results: dict, command: str) -> str:
    """The table of stage 1's decode, 2D fusion's cost, training's projection, a run's fixed
    overhead and a ScanNet-size scene (its own section of BENCHMARKS.md)."""
    return "\n".join([_header(results, command), "",
                      "| row | measured | baseline | ratio (bigger is better unless stated) |",
                      "| --- | --- | --- | --- |", *_performance_rows(results)])


def _header(results: dict, command: str) -> str:
    return (f"Machine: {results['machine']}. Command: `{command}`. "
            f"Medians of {results['repeats']} repeats after warm-up (min-max in brackets). "
            f"Shared with other engineers' work (load average {results['load_average_before']:.1f} "
            f"before, {results['load_average_after']:.1f} after): ratios of runs side by side "
            "are the figures to read, absolute times are slow.")


def _range(figures: dict, key: str = "ratio") -> str:
    return f"{figures[key]:.2f} [{figures[key + '_min']:.2f}-{figures[key + '_max']:.2f}]"


def _performance_rows(results: dict) -> list[str]:
    """Rows of stage 1's decode, the cost of 2D fusion, training's projection, a run's fixed
    overhead and a ScanNet-size scene."""
    d, v, f, p, o, n = (results[k] for k in ("decode", "flow_vs_decode", "fusion_overhead",
                                             "fuse_features", "run_overhead", "scannet_scale"))
    t = d["textured"]
    one_thread = (f"; 1 thread {p['ratio_one_thread']:.2f}" if p.get("ratio_one_thread")
                  else "")
    peak = (f", peak +{p['fuse_features_peak_mb']:.0f} MB" if p["fuse_features_peak_mb"]
            is not None else "")
    loop_peak = f", peak +{p['loop_peak_mb']:.0f} MB" if p["loop_peak_mb"] is not None else ""
    scale_peak = (f", peak +{n['peak_above_start_mb']:.0f} MB (bound {n['bound_mb']:.0f} MB)"
                  if n["peak_above_start_mb"] is not None else "")
    return [
        f"| decode + resize to {d['input_size'][0]}x{d['input_size'][1]} ({d['resize']}), "
        f"1296x968 JPEG, one thread | scaled (DCT) {d['scaled_fps_per_core']:.0f} frames/s per "
        f"core; camera-like 1/f frames {t['scaled_fps_per_core']:.0f} | full decode "
        f"{d['full_fps_per_core']:.0f}; camera-like {t['full_fps_per_core']:.0f} | "
        f"{_range(d)}; camera-like {_range(t)} |",
        f"| model input, scaled vs full decode | PSNR >= {d['psnr_db_min']:.1f} dB (scene "
        f"frames), >= {d['textured_psnr_db_min']:.1f} dB (camera-like); {d['cosine_model']} "
        f"(random weights) cosine >= {d['global_cosine_min']:.4f} global, >= "
        f"{d['spatial_cosine_min']:.4f} spatial (mean over tokens; worst token "
        f"{d['spatial_token_cosine_min']:.3f}) | different frames' global cosine "
        f"{d['different_frames_global_cosine']:.3f} | - |",
        f"| stage 1 flow over its decode ceiling, {v['model']} | flow {v['flow_fps']:.1f} "
        f"frames/s | scaled decode on all cores {v['decode_fps']:.0f} frames/s (full decode "
        f"{v['decode_full_fps']:.0f}) | {_range(v)} |",
        f"| training step with 2D fusion, cached, {f['views_per_step']} views, 1 thread | "
        f"{f['fused_step_s']:.3f} s | 3D only (--no-use-2d) {f['3d_only_step_s']:.3f} s | "
        f"{_range(f)} (fused / 3D only: smaller is better) |",
        f"| fuse_features, {p['points']} points x {p['views']} views x {p['channels']} channels "
        f"| {p['threads'][0]['fuse_features_s'] * 1e3:.0f} ms{peak} | per-view numpy loop "
        f"{p['threads'][0]['loop_s'] * 1e3:.0f} ms{loop_peak} (same answer: view counts agree "
        f"on {100 * p['count_agreement']:.2f}% of points, features within "
        f"{p['max_feature_difference']:.1g}) | {_range(p)}{one_thread} |",
        f"| seconds before the first frames are encoded (4-frame scene, test-ViT-tiny) | running "
        f"server {o['server']['median_s']:.1f} s [{o['server']['min_s']:.1f}-"
        f"{o['server']['max_s']:.1f}] | temporary server {o['ephemeral']['median_s']:.1f} s "
        f"[{o['ephemeral']['min_s']:.1f}-{o['ephemeral']['max_s']:.1f}]"
        + (f"; importing the flow's module alone {o['import_s']:.1f} s" if o["import_s"] else "")
        + f" | {_range(o)} |",
        f"| ScanNet-size scene, {n['points'] // 1000}k points x {n['frames']} frames: store read "
        f"+ projection (CachedScenes.load) | {n['seconds']:.1f} s [{n['seconds_min']:.1f}-"
        f"{n['seconds_max']:.1f}]{scale_peak}; {100 * n['seen_fraction']:.0f}% of points seen | "
        f"store {n['store_mb']:.0f} MB, written directly (random features) | - |",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="Measure extraction, cached vs online CLIP training, projection, the store, "
        "scaling and the backbone's convolutions; print the tables and (without --quick) rewrite "
        "this device's tables in BENCHMARKS.md.")
    parser.add_argument("--quick", action="store_true",
                        help="tiny model, small sizes, 2 repeats; BENCHMARKS.md untouched")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed repeats per measurement (default 5, 2 with --quick)")
    parser.add_argument("--no-backbone", action="store_true",
                        help="leave out the backbone's rows (15-30 minutes on a 2-core CPU; "
                        "python -m benchmarks.backbone measures them alone) and its section of "
                        "BENCHMARKS.md")
    parser.add_argument("--performance-only", action="store_true",
                        help="only the rows of stage 1's decode, 2D fusion's cost, training's "
                        "projection, a run's fixed overhead and a ScanNet-size scene (their "
                        "section of BENCHMARKS.md); extraction with test-ViT-tiny only")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="scratch folder (default: a temporary one, deleted at the end)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from flows.extract_clip import extract_clip  # after argparse: --help stays instant
    from pipeline.synthetic import SMALL_COLOR_SIZE, SMALL_DEPTH_SIZE, write_scenes

    repeats = args.repeats or (2 if args.quick else 5)
    models = ["test-ViT-tiny"] if args.quick else ["test-ViT-tiny", "ViT-B-16"]
    frames_per_scene = 4 if args.quick else 16
    sizes = ({"frames": [4, 8, 16], "projection": [(2000, 4), (4000, 8), (8000, 16)]} if args.quick
             else {"frames": [16, 32, 64], "projection": [(10000, 16), (20000, 32), (40000, 64)]})
    with contextlib.ExitStack() as stack:
        work = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        work.mkdir(parents=True, exist_ok=True)
        # extraction: one long scene (fill and drain of the pipeline are per scene, ScanNet's
        # scenes have 1000+ frames); training and store rows: three shorter scenes
        long_root = write_dataset(work / "long", scenes=1, frames=12 if args.quick else 64,
                                  points=5000 if args.quick else 20000)
        root = write_dataset(work / "scenes", scenes=3, frames=frames_per_scene,
                             points=5000 if args.quick else 20000)
        results: dict = {"machine": machine(torch.device(args.device)), "repeats": repeats,
                         "device": args.device, "load_average_before": os.getloadavg()[0]}
        rows = []
        for model in (models[:1] if args.performance_only else models):
            print(f"extraction {model} ...", file=sys.stderr)
            rows.append(bench_extraction(long_root, work / f"extract-{model}", model, 16,
                                         args.device, repeats))
        # the row's ratio is the last model's: ViT-B-16, the one users run (tiny with --quick)
        results["extraction"] = {"ratio": rows[-1]["ratio"], "model": rows[-1]["model"],
                                 "models": rows}
        store = str(work / "training.zarr")
        _quietly(extract_clip, root=str(root), store=store, dataset="synthetic", model=models[-1],
                 pretrained="none", device=args.device)
        if not args.performance_only:
            print("cached vs online CLIP ...", file=sys.stderr)
            results["cached_vs_online"] = bench_cached_vs_online(store, root, models[-1],
                                                                 args.device, repeats)
            print("projection ...", file=sys.stderr)
            results["projection"] = bench_projection(store, args.device, repeats)
            print("store ...", file=sys.stderr)
            results["store"] = bench_store(store, work, repeats, args.device)
            print("scaling ...", file=sys.stderr)
            results["scaling"] = bench_scaling(
                lambda n: write_dataset(work / f"scaling-{n}", 1, n, points=5000), work,
                args.device, repeats, sizes)
        print("decode ...", file=sys.stderr)
        results["decode"] = bench_decode(long_root, models[-1], args.device, repeats, args.quick)
        tiny = results["extraction"]["models"][0]
        results["flow_vs_decode"] = {
            "ratio": tiny["flow_over_decode"], "ratio_min": tiny["flow_over_decode_min"],
            "ratio_max": tiny["flow_over_decode_max"],
            "what": "test-ViT-tiny flow frames/s over the scaled decode's frames/s on every "
                    "core, measured round by round (bigger is better, 1 = decode-bound)",
            "flow_fps": tiny["flow_fps"], "decode_fps": tiny["decode_fps"],
            "decode_full_fps": tiny["decode_full_fps"], "model": tiny["model"]}
        print("fusion overhead ...", file=sys.stderr)
        results["fusion_overhead"] = backbone._at_threads(
            1, lambda: fusion_overhead.bench_fusion_overhead(store, 2 * repeats, args.device))
        print("fuse_features ...", file=sys.stderr)
        results["fuse_features"] = fuse.bench_fuse_features(*fuse.scene_arrays(store), repeats)
        print("run overhead ...", file=sys.stderr)
        small = work / "overhead-scene"
        if not small.exists():
            write_scenes(small, n_scenes=1, n_frames=4, n_points=2000,
                         color_size=SMALL_COLOR_SIZE, depth_size=SMALL_DEPTH_SIZE)
        results["run_overhead"] = run_overhead.bench_run_overhead(
            small, work / "overhead", repeats=1 if args.quick else min(repeats, 2),
            warmup=not args.quick)
        print("ScanNet-size scene ...", file=sys.stderr)
        results["scannet_scale"] = scannet_scale.bench_scannet_scale(
            work, 1 if args.quick else 2, args.quick, args.device)
        if not (args.no_backbone or args.performance_only):
            print("backbone ...", file=sys.stderr)
            preset = backbone.QUICK if args.quick else backbone.FULL
            results["backbone"] = backbone.bench_backbone(preset["voxels"], repeats, args.device,
                                                          preset["widths"], work=work)
    results["load_average_after"] = os.getloadavg()[0]
    command = " ".join(["python -m benchmarks.run", f"--device {args.device}"]
                       + [flag for flag, on in (("--quick", args.quick),
                                                (f"--repeats {args.repeats}", args.repeats),
                                                ("--no-backbone", args.no_backbone),
                                                ("--performance-only", args.performance_only))
                          if on])
    table = "" if args.performance_only else format_table(results, args.device, command)
    performance = format_performance(results, command)
    backbone_table = ("" if "backbone" not in results else
                      backbone.format_table(results["backbone"], command, results["machine"]))
    print("\n\n".join(t for t in (table, performance, backbone_table) if t))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if not args.quick:
        if table:
            update_markdown(table, args.device)
        update_markdown(performance, f"performance-{args.device}")
        if backbone_table:
            update_markdown(backbone_table, f"backbone-{args.device}")
        print(f"\nwrote {MARKDOWN}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
