"""`python -m benchmarks.stability`: BiFusion's configuration against the cached pipeline, on the
same scenes, steps, model initialisation and optimiser; rewrites the "Stability" section of
BENCHMARKS.md (`--quick`: small, BENCHMARKS.md untouched; `--json FILE`: the figures).

Routes:

- BiFusion: CLIP (the tiny test ViT, random weights) run in every step with gradient_flow_ratio
  0.02, BiFusion's CLIP loss (T = 0.07, log(sigmoid + 1e-8)) at weight 0.05 from the first epoch,
  no clamp before the per-view mean (benchmarks/seed_clip.py);
- cached, weight 0.05: `model.train`'s step on the store's features, with its fixes (features
  are constants, T floored at 0.1, -logsigmoid, fused features clamped to +-10, a finite-loss
  guard), at BiFusion's weight from the first epoch;
- cached, default schedule: the same with the default warm-up (0, then 0.001 from epoch 11 and
  0.01 from epoch 21).

Every route gets the same planted extreme activations (+-50 in 4 channels of the 2D features;
random weights have none). Measured per step: the gradient norm of each module group before
clipping (3D backbone with its projection, 2D projection, gate, heads, CLIP head; CLIP's own
weights for BiFusion's route), whether the loss was finite, and loss spikes: steps whose loss exceeds
twice the median of the 10 steps before.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import machine
from benchmarks.common import update_markdown
from benchmarks.seed_clip import (GRADIENT_FLOW_RATIO, PLANTED_CHANNELS, PLANTED_MAGNITUDE,
                                  SEED_CLIP_WEIGHT, SEED_TEMPERATURE, SeedClipScenes,
                                  frame_inputs, seed_train_step, with_planted_activations)
from model.config import TrainConfig
from model.dataset import CachedScenes, collate
from model.network.losses import DEFAULT_CLIP_SCHEDULE, LossConfig
from model.checkpoint import build_model
from model.train import GRADIENT_GROUPS, lr_lambda, train_step
from pipeline.synthetic import SMALL_COLOR_SIZE, SMALL_DEPTH_SIZE, write_scenes
from storage import open_store

REPO = Path(__file__).resolve().parents[1]
SECTION = "stability"
"""BENCHMARKS.md's markers of this script's table: <!-- results:stability -->."""
MODEL = {"voxel_size": 0.05, "channels": (16, 32, 48), "width": 64, "device": "cpu"}
"""A small fusion model (the zero-shot benchmark's), the same for every route."""
FULL = {"scenes": 3, "frames": 8, "points": 5000, "epochs": 30}
QUICK = {"scenes": 2, "frames": 4, "points": 2000, "epochs": 2}
SPIKE_FACTOR, SPIKE_WINDOW = 2.0, 10
ROUTES = ("BiFusion", "cached, weight 0.05", "cached, default schedule")


def build_store(workdir: Path, sizes: dict[str, int]) -> tuple[Path, Path]:
    """Synthetic scenes and their store of test-ViT-tiny `tokens` features (random weights)."""
    from pipeline.encoders.base import EncoderConfig
    from pipeline.encoders.clip import FrozenClipEncoder
    from pipeline.extraction import extract_scene
    from pipeline.readers.synthetic import SyntheticScene

    scenes_root, store_path = workdir / "scenes", workdir / "store.zarr"
    write_scenes(scenes_root, sizes["scenes"], sizes["frames"], seed=0,
                 color_size=SMALL_COLOR_SIZE, depth_size=SMALL_DEPTH_SIZE,
                 n_points=sizes["points"])
    store = open_store(store_path, mode="a")
    encoder = FrozenClipEncoder(EncoderConfig(model="test-ViT-tiny", pretrained="none"))
    featureset = store.register_featureset(encoder.describe())
    for scene_dir in sorted(p for p in scenes_root.iterdir() if p.is_dir()):
        extract_scene(SyntheticScene.open(scene_dir), store, encoder, featureset, batch_size=4)
    return scenes_root, store_path


def run_route(route: str, scenes_root: Path, store_path: Path, epochs: int) -> list[dict]:
    """Train one route from the same initialisation over the same scene order; a record per
    step: loss terms, finite, gradient norms."""
    from pipeline.encoders.base import EncoderConfig
    from pipeline.encoders.clip import FrozenClipEncoder

    device = torch.device("cpu")
    store = open_store(store_path)
    ((featureset, spec),) = store.featuresets().items()
    scene_ids = store.scenes()
    config = TrainConfig(**MODEL, instance_head=True)
    torch.manual_seed(0)
    model = build_model(config, spec).to(device)
    if route == "BiFusion":  # no clamp before the per-view mean
        model.config = dataclasses.replace(model.config, view_feature_clamp=math.inf)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr,
                                  weight_decay=config.weight_decay)
    steps = epochs * len(scene_ids)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(
        config.schedule, config.warmup_steps, steps))
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    if route == "BiFusion":
        encoder = FrozenClipEncoder(EncoderConfig(model="test-ViT-tiny", pretrained="none"))
        scenes = SeedClipScenes(store, encoder, frame_inputs(encoder, scenes_root, store), device)
    else:
        cached = CachedScenes({s: store for s in scene_ids}, featureset, device)
        schedule = ((0, SEED_CLIP_WEIGHT),) if route == "cached, weight 0.05" \
            else DEFAULT_CLIP_SCHEDULE
        loss_config = LossConfig(semantic_weight=0.4, clip_schedule=schedule)
    records = []
    for epoch in range(epochs):
        order = list(scene_ids)
        np.random.default_rng(epoch).shuffle(order)
        for scene_id in order:
            if route == "BiFusion":
                record = seed_train_step(model, scenes.visual, scenes.batch(scene_id),
                                         optimizer, scaler, amp=False)
            else:
                batch = with_planted_activations(collate([cached.get(scene_id)]))
                result = train_step(model, batch, optimizer, scaler, epoch, loss_config,
                                    grad_clip=config.grad_clip, amp=False)
                record = ({**result[0], "finite": True} if result is not None
                          else {"finite": False})
            scheduler.step()
            records.append({"epoch": epoch, "scene": scene_id, **record})
    return records


def summarise(records: list[dict]) -> dict[str, Any]:
    """Percentiles of each group's gradient norm (finite steps), non-finite steps, spikes."""
    groups = [g for g in (*GRADIENT_GROUPS, "clip")
              if any(f"grad_norm/{g}" in r for r in records)]
    norms = {}
    for group in groups:
        values = np.array([r[f"grad_norm/{group}"] for r in records
                           if f"grad_norm/{group}" in r], dtype=np.float64)
        finite = values[np.isfinite(values)]
        norms[group] = ({"p50": float(np.percentile(finite, 50)),
                         "p90": float(np.percentile(finite, 90)),
                         "p99": float(np.percentile(finite, 99)), "max": float(finite.max()),
                         "nonfinite": int((~np.isfinite(values)).sum())}
                        if finite.size else {"nonfinite": int(values.size)})
    totals = [r.get("total", math.nan) for r in records]
    spikes = 0
    for index in range(SPIKE_WINDOW, len(totals)):
        window = [t for t in totals[index - SPIKE_WINDOW:index] if math.isfinite(t)]
        if window and math.isfinite(totals[index]) and \
                totals[index] > SPIKE_FACTOR * float(np.median(window)):
            spikes += 1
    finite_totals = [t for t in totals if math.isfinite(t)]
    last = [r for r in records if r["epoch"] == records[-1]["epoch"]]
    return {
        "steps": len(records),
        "nonfinite_steps": sum(not r["finite"] for r in records),
        "loss_spikes": spikes,
        "first_loss": finite_totals[0] if finite_totals else None,
        "last_epoch_loss": float(np.mean([r["total"] for r in last if "total" in r]))
        if any("total" in r for r in last) else None,
        "clip_term_last_epoch": float(np.mean([r["clip"] for r in last if "clip" in r]))
        if any("clip" in r for r in last) else None,
        "grad_norm": norms,
    }


def natural_activation_range(store_path: Path) -> float:
    """The largest |value| of the tiny random-weight ViT's stored spatial features."""
    store = open_store(store_path)
    ((featureset, _),) = store.featuresets().items()
    return float(max(np.abs(store.features(s, featureset).spatial[:].astype(np.float32)).max()
                     for s in store.scenes()))


def measure(workdir: Path, sizes: dict[str, int]) -> dict[str, Any]:
    scenes_root, store_path = build_store(workdir, sizes)
    figures: dict[str, Any] = {"sizes": sizes, "natural_max_abs": natural_activation_range(store_path),
                               "routes": {}}
    for route in ROUTES:
        print(f"{route} ...", file=sys.stderr)
        figures["routes"][route] = summarise(run_route(route, scenes_root, store_path,
                                                       sizes["epochs"]))
    return figures


def format_section(figures: dict[str, Any], command: str, where: str) -> str:
    sizes = figures["sizes"]
    groups = [g for g in (*GRADIENT_GROUPS, "clip")
              if any(g in r["grad_norm"] for r in figures["routes"].values())]
    lines = [
        f"Machine: {where}. Command: `{command}`. {sizes['scenes']} synthetic scenes of "
        f"{sizes['frames']} frames (up to {sizes['points']} points), one scene a step, "
        f"{sizes['epochs']} epochs = {figures['routes']['BiFusion']['steps']} steps per route, the "
        "same model initialisation, scene order, AdamW and learning-rate schedule, gradients "
        "clipped at 1.0 (norms below are before clipping), CPU float32. CLIP: test-ViT-tiny, "
        f"random weights (largest |activation| of its spatial features: "
        f"{figures['natural_max_abs']:.1f}), so +-{PLANTED_MAGNITUDE:g} is planted in "
        f"{PLANTED_CHANNELS} channels of every route's 2D features. BiFusion: gradient_flow_ratio "
        f"{GRADIENT_FLOW_RATIO}, T = {SEED_TEMPERATURE}, weight {SEED_CLIP_WEIGHT} from epoch 1.",
        "",
        "Gradient norm per module group, median / 99th percentile / max over the steps:",
        "",
        "| route | " + " | ".join(groups) + " | non-finite steps | loss spikes | loss, first step "
        "-> last epoch | CLIP term, last epoch |",
        "| --- | " + " | ".join("---" for _ in groups) + " | --- | --- | --- | --- |",
    ]
    for route, result in figures["routes"].items():
        cells = []
        for group in groups:
            norm = result["grad_norm"].get(group)
            cells.append("-" if norm is None or "p50" not in norm else
                         f"{norm['p50']:.3g} / {norm['p99']:.3g} / {norm['max']:.3g}")
        first, last = result["first_loss"], result["last_epoch_loss"]
        clip = result["clip_term_last_epoch"]
        lines.append(f"| {route} | " + " | ".join(cells) + f" | {result['nonfinite_steps']} of "
                     f"{result['steps']} | {result['loss_spikes']} | "
                     f"{_number(first)} -> {_number(last)} | {_number(clip)} |")
    return "\n".join(lines)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.stability",
        description="Gradient norms per module group, non-finite steps and loss spikes of "
        "BiFusion's configuration (CLIP in the step, gradient_flow_ratio 0.02, T = 0.07, weight "
        "0.05 from the first epoch, +-50 activations planted) against the cached pipeline on "
        "the same scenes and steps; rewrites the Stability section of BENCHMARKS.md (a few CPU "
        "minutes).")
    parser.add_argument("--quick", action="store_true",
                        help="2 scenes of 4 frames, 2 epochs; BENCHMARKS.md untouched")
    parser.add_argument("--workdir", type=Path, default=REPO / "benchmarks" / "out" / "stability",
                        help="scenes and store (replaced; default benchmarks/out/stability)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", message=".*(random|RANDOM).*weights")  # known: tiny ViT
    shutil.rmtree(args.workdir, ignore_errors=True)
    figures = measure(args.workdir, QUICK if args.quick else FULL)
    command = "python -m benchmarks.stability" + (" --quick" if args.quick else "")
    section = format_section(figures, command, machine(torch.device("cpu")))
    print(section)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    if not args.quick:
        update_markdown(section, SECTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())
