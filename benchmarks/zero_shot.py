"""`python -m benchmarks.zero_shot`: zero-shot (open-vocabulary) mIoU of model.query on the
synthetic set; rewrites its own section of BENCHMARKS.md.

Prompts are the 20 ScanNet class names (the default template ensemble); mIoU is ScanNet's (over
the classes present or predicted, model.metrics), and points no view sees (the 2d route's
"unknown") count as misses. Rows:

- planted store (pipeline.planted): each labelled region's features are noisy copies of its class
  name's text embedding, so the 2d route has a known answer: the correctness figure. Its
  shuffled copy (the same cells, permuted) is what a broken alignment would give.
- the real pipeline on the same scenes with the tiny random-weight ViT (maskclip): near chance by
  construction (random weights carry no meaning), it exercises the plumbing.
- the fused route: model.train for a few CPU minutes on each store with its default losses (on
  a maskclip feature set these include the per-point distillation), queried on the held-out
  scenes.
- chance: a uniformly random prompt for every point, on the same scenes.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import machine
from benchmarks.common import update_markdown
from model.config import TrainConfig
from model.metrics import confusion_matrix, mean_iou
from model.query import Query, QueryConfig
from model.train import Trainer
from pipeline.planted import write_planted_store, write_tiny_store
from pipeline.prompts import DEFAULT_TEMPLATE_SET, SCANNET20_PROMPTS
from pipeline.synthetic import SMALL_COLOR_SIZE, SMALL_DEPTH_SIZE, write_scenes
from storage import open_store

REPO = Path(__file__).resolve().parents[1]
SECTION = "zero-shot"
"""BENCHMARKS.md's markers of this script's table: <!-- results:zero-shot -->."""
TRAIN = {"voxel_size": 0.05, "channels": (16, 32, 48), "width": 64, "device": "cpu",
         "plot": False, "instance_head": False, "batch_scenes": 1, "warmup_steps": 0,
         "val_fraction": 0.25}
"""The fused route's training: a small backbone, default losses (per-point distillation at
weight 1 on maskclip feature sets, the CLIP consistency schedule, semantic cross-entropy)."""

FULL = {"scenes": 4, "frames": 12, "points": 5000, "epochs": 30}
QUICK = {"scenes": 2, "frames": 4, "points": 2000, "epochs": 1}


def query(store: Path, scenes: list[str], checkpoint: Path | None = None) -> dict[str, Any]:
    """model.query --eval on `scenes`: route -> mIoU, per-class IoU, unknown and all points."""
    result = Query(QueryConfig(cache=str(store), scenes=tuple(scenes), evaluate=True,
                               checkpoint=str(checkpoint) if checkpoint else None,
                               device="cpu")).run()
    return {route: {**metrics,
                    "unknown": sum(s[route]["unknown"] for s in result["scenes"].values()),
                    "points": sum(s[route]["points"] for s in result["scenes"].values())}
            for route, metrics in result["metrics"].items()}


def train(store: Path, out: Path, epochs: int) -> tuple[Path, list[str], float]:
    """model.train on the store: (last checkpoint, held-out scene ids, seconds)."""
    start = time.perf_counter()
    trainer = Trainer(TrainConfig(cache=str(store), out=str(out), epochs=epochs, **TRAIN))
    trainer.fit()
    return out / "checkpoints" / "last.pt", trainer.val_ids, time.perf_counter() - start


def chance_miou(store: Path, scenes: list[str], seed: int = 0) -> float:
    """mIoU of a uniformly random prompt per point (mean of 5 draws)."""
    opened = open_store(store)
    truth = torch.cat([torch.from_numpy(opened.scene(s, with_depth=False).semantic).long()
                       for s in scenes])
    generator = torch.Generator().manual_seed(seed)
    num_classes = len(SCANNET20_PROMPTS)
    draws = [mean_iou(confusion_matrix(torch.randint(0, num_classes, truth.shape,
                                                     generator=generator), truth, num_classes))
             for _ in range(5)]
    return float(np.mean(draws))


def measure(workdir: Path, sizes: dict[str, int], noise: float) -> dict[str, Any]:
    """Every row: build the scenes and stores under `workdir`, train, query."""
    scenes_root = workdir / "scenes"
    write_scenes(scenes_root, sizes["scenes"], sizes["frames"], seed=0,
                 color_size=SMALL_COLOR_SIZE, depth_size=SMALL_DEPTH_SIZE,
                 n_points=sizes["points"])
    stores = {"planted": workdir / "planted.zarr", "shuffled": workdir / "shuffled.zarr",
              "random": workdir / "random.zarr"}
    write_planted_store(scenes_root, stores["planted"], noise=noise)
    write_planted_store(scenes_root, stores["shuffled"], noise=noise, shuffle=True)
    write_tiny_store(scenes_root, stores["random"])
    planted = open_store(stores["planted"])
    all_scenes = planted.scenes()
    (spec,) = planted.featuresets().values()
    figures: dict[str, Any] = {"scenes": all_scenes, "sizes": sizes, "noise": noise,
                               "grid_size": list(spec.grid_size),
                               "chance_all": chance_miou(stores["planted"], all_scenes)}
    for name in ("planted", "shuffled", "random"):
        figures[f"{name}_2d"] = query(stores[name], all_scenes)["2d"]
    for name in ("planted", "random"):
        checkpoint, val_ids, seconds = train(stores[name], workdir / f"run-{name}",
                                             sizes["epochs"])
        held_out = query(stores[name], val_ids, checkpoint)
        figures[f"{name}_held_out"] = {**held_out, "scenes": val_ids, "train_seconds": seconds}
    held_out = figures["planted_held_out"]["scenes"]
    figures["chance_held_out"] = chance_miou(stores["planted"], held_out)
    return figures


def per_class(result: dict[str, Any]) -> str:
    """"wall 0.96, floor 0.94, ...": the IoU of each class present."""
    return ", ".join(f"{name} {iou:.2f}" for name, iou in zip(SCANNET20_PROMPTS,
                                                              result["class_iou"])
                     if iou is not None)


def format_section(figures: dict[str, Any], command: str, where: str) -> str:
    sizes = figures["sizes"]
    all_n, val = len(figures["scenes"]), figures["planted_held_out"]["scenes"]
    epochs = f"{sizes['epochs']} epoch{'s' * (sizes['epochs'] != 1)}"
    rows = [
        ("planted", "2d (no training)", f"all {all_n}", figures["planted_2d"]),
        ("planted", "2d (no training)", f"held-out {len(val)}", figures["planted_held_out"]["2d"]),
        ("planted", f"fused ({epochs})", f"held-out {len(val)}",
         figures["planted_held_out"]["fused"]),
        ("planted, cells shuffled", "2d (no training)", f"all {all_n}", figures["shuffled_2d"]),
        ("tiny random-weight ViT", "2d (no training)", f"all {all_n}", figures["random_2d"]),
        ("tiny random-weight ViT", f"fused ({epochs})", f"held-out {len(val)}",
         figures["random_held_out"]["fused"]),
    ]
    lines = [
        f"Machine: {where}. Command: `{command}`. {all_n} synthetic scenes of {sizes['frames']} "
        f"frames ({SMALL_COLOR_SIZE[0]}x{SMALL_COLOR_SIZE[1]} colour, up to {sizes['points']} "
        f"points), test-ViT-tiny maskclip features ({'x'.join(map(str, figures['grid_size']))} "
        f"grid); prompts: the 20 ScanNet class names x the `{DEFAULT_TEMPLATE_SET}` templates; "
        f"planted noise {figures['noise']} (noise norm / smallest distance between two class "
        "embeddings).",
        "",
        "| store | route | scenes | mIoU | unknown points (seen by no view) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for store, route, scenes, result in rows:
        lines.append(f"| {store} | {route} | {scenes} | {result['miou']:.3f} | "
                     f"{result['unknown']} of {result['points']} |")
    lines += [
        f"| chance: a random prompt per point | - | all {all_n} / held-out {len(val)} | "
        f"{figures['chance_all']:.3f} / {figures['chance_held_out']:.3f} | - |",
        "",
        "Per-class IoU, planted, 2d, all scenes: " + per_class(figures["planted_2d"]) + ".",
        f"Per-class IoU, planted, fused, held-out: "
        + per_class(figures["planted_held_out"]["fused"]) + ".",
        "Fused route training (model.train, CPU): "
        f"{figures['planted_held_out']['train_seconds']:.0f} s on the planted store, "
        f"{figures['random_held_out']['train_seconds']:.0f} s on the random one; held-out "
        f"scenes: {', '.join(val)}.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.zero_shot",
        description="Zero-shot mIoU of model.query (2d and fused routes, ScanNet-20 class names "
        "as prompts) on synthetic scenes: a planted store with a known answer, its shuffled copy, "
        "and the real pipeline with the tiny random-weight ViT; rewrites the zero-shot section of "
        "BENCHMARKS.md (a few CPU minutes).")
    parser.add_argument("--quick", action="store_true",
                        help="2 scenes of 4 frames, 1 training epoch; BENCHMARKS.md untouched")
    parser.add_argument("--noise", type=float, default=0.5,
                        help="planted noise: its norm over the smallest distance between two "
                        "class embeddings (default 0.5)")
    parser.add_argument("--workdir", type=Path, default=REPO / "benchmarks" / "out" / "zero_shot",
                        help="scenes, stores and runs (replaced; default benchmarks/out/zero_shot)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", message=".*(random|RANDOM).*weights")  # known: tiny ViT
    shutil.rmtree(args.workdir, ignore_errors=True)
    figures = measure(args.workdir, QUICK if args.quick else FULL, args.noise)
    command = "python -m benchmarks.zero_shot" + (" --quick" if args.quick else "")
    section = format_section(figures, command, machine(torch.device("cpu")))
    print(section)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    if not args.quick:
        update_markdown(section, SECTION)  # the table between its markers, nothing else
    return 0


if __name__ == "__main__":
    sys.exit(main())
