"""What 2D fusion costs a training step once the features are cached: `model.train`'s step with
the store's features fused (the default) against the 3D-only model (`--no-use-2d`), same
scenes, same backbone initialisation, same loss settings as `model.train` gives each.

The scenes are read and projected once (the scene cache of `model.train`'s later epochs); both
models then step over them in alternating order (A B, B A, ...), so that other work on a shared
machine weighs on both. ratio = fused step / 3D-only step (smaller is better, 1 = free).
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from benchmarks.common import sync
from model.checkpoint import build_model
from model.config import TrainConfig
from model.dataset import CachedScenes, collate
from model.network.losses import LOSS_TERMS, LossConfig
from model.train import train_step
from storage import open_store

EPOCH = 30
"""The epoch the steps claim: past the CLIP term's warm-up, so every loss term is computed."""


def bench_fusion_overhead(store_path: str, steps: int, device: str) -> dict:
    target = torch.device(device)
    store = open_store(store_path)
    (featureset, spec), = store.featuresets().items()
    ids = store.scenes()
    scenes = CachedScenes({s: store for s in ids}, featureset, target)
    batches = [collate([scenes.get(s)]) for s in ids]
    runs = {}
    for use_2d in (True, False):
        config = TrainConfig(device=device, use_2d=use_2d)
        torch.manual_seed(0)
        model = build_model(config, spec).to(target)
        loss = LossConfig(semantic_weight=0.4 if use_2d else 0.5)  # model.train's defaults
        runs["fused" if use_2d else "3d_only"] = {
            "model": model, "optimizer": torch.optim.AdamW(model.parameters(), lr=1e-3),
            "loss": loss, "seconds": []}
    amp = target.type == "cuda"
    scaler = torch.amp.GradScaler(target.type, enabled=amp)

    def step(run: dict, batch) -> None:
        result = train_step(run["model"], batch, run["optimizer"], scaler, EPOCH, run["loss"],
                            grad_clip=1.0, amp=amp)
        assert result is not None and all(np.isfinite(result[0][k]) for k in LOSS_TERMS)

    names = list(runs)
    for name in names:  # warm-up
        step(runs[name], batches[0])
    for index in range(steps):
        batch = batches[index % len(batches)]
        for name in (names if index % 2 == 0 else names[::-1]):
            sync()
            start = time.perf_counter()
            step(runs[name], batch)
            sync()
            runs[name]["seconds"].append(time.perf_counter() - start)
    fused, plain = runs["fused"]["seconds"], runs["3d_only"]["seconds"]
    ratios = [a / b for a, b in zip(fused, plain)]
    parameters = {name: sum(p.numel() for p in run["model"].parameters())
                  for name, run in runs.items()}
    return {
        "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
        "smaller_is_better": True,
        "goal": 1.15,
        "fused_step_s": statistics.median(fused), "3d_only_step_s": statistics.median(plain),
        "steps": steps, "scenes": len(ids),
        "views_per_step": statistics.median(int(b.num_views) for b in batches),
        "points_per_step": statistics.median(int(b.num_points) for b in batches),
        "fused_parameters": parameters["fused"], "3d_only_parameters": parameters["3d_only"],
    }
