"""The baseline this project replaces: CLIP inside the training step, as BiFusion runs it.

Benchmarks only, never a default. Both modes run model.train's own `train_step` on the same
scenes, views and model; they differ in where the 2D features come from:

- cached: projected features of the store, kept in memory after the first read (what
  `python -m model.train` does from its second epoch on);
- online: every step runs the frozen CLIP encoder over every view of the batch's scenes, then
  projects, as a training loop with CLIP in it must (colour frames are decoded and resized
  once, ahead of time, which favours this baseline: its steps time CLIP, not JPEG decoding).

`python -m benchmarks.online_clip --store S --scenes-root R --mode online` prints one JSON line:
median step seconds, peak memory, CLIP forward passes. One mode per process, so that the peak
memory of one does not hide the other's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from model.dataset import CachedScenes, collate
from model.network.losses import LossConfig
from model.checkpoint import build_model
from model.network.losses import LOSS_TERMS
from model.train import train_step
from model.config import TrainConfig
from storage import open_store


class OnlineClipScenes(CachedScenes):
    """CachedScenes whose 2D features are computed by CLIP at every load, never cached."""

    def __init__(self, *args, encoder, scenes_root: Path, **kwargs):
        super().__init__(*args, cache_bytes=0, **kwargs)
        from pipeline.readers.synthetic import SyntheticScene# the raw frames of the same scenes

        self.encoder = encoder
        self.forward_passes = 0
        self._inputs: dict[str, torch.Tensor] = {}
        for scene_id, store in self.sources.items():
            raw = SyntheticScene.open(scenes_root / scene_id)
            frame_ids = store.scene(scene_id, with_depth=False).frame_id
            self._inputs[scene_id] = torch.stack(
                [encoder.preprocess(raw.read_frame(int(f), depth=False).color) for f in frame_ids])

    def get(self, scene_id: str):
        return self.load(scene_id)

    def load(self, scene_id: str):
        store = self.sources[scene_id]
        scene = store.scene(scene_id)
        usable = scene.valid
        with torch.no_grad():
            spatial, global_ = self.encoder.encode(self._inputs[scene_id][usable])
        self.forward_passes += int(usable.sum())
        return self.attach(scene_id, scene, usable, spatial, global_, self.encoder.describe())


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: peak allocated by torch. CPU: this process's peak resident memory (VmHWM; not
    getrusage's ru_maxrss, which a child process inherits from the parent that started it)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024  # kB


def measure(store_path: str, mode: str, scenes_root: Path | None, steps: int, device: str,
            model_name: str) -> dict:
    """Median seconds per training step (after one warm-up step) of one mode."""
    target = torch.device(device)
    store = open_store(store_path)
    (featureset, spec), = store.featuresets().items()
    sources = {scene_id: store for scene_id in store.scenes()}
    if mode == "online":
        from pipeline.encoders.base import EncoderConfig
        from pipeline.encoders.clip import FrozenClipEncoder

        encoder = FrozenClipEncoder(EncoderConfig(model=model_name, pretrained="none",
                                                  device=device))
        scenes = OnlineClipScenes(sources, featureset, target, encoder=encoder,
                                  scenes_root=scenes_root)
    else:
        scenes = CachedScenes(sources, featureset, target)
    config = TrainConfig(device=device)
    torch.manual_seed(0)
    model = build_model(config, spec).to(target)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    amp = target.type == "cuda"
    scaler = torch.amp.GradScaler(target.type, enabled=amp)
    ids = list(sources)
    times = []
    for step in range(steps + 1):
        if target.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        batch = collate([scenes.get(ids[step % len(ids)])])
        result = train_step(model, batch, optimizer, scaler, 30, LossConfig(), grad_clip=1.0,
                            amp=amp)
        if target.type == "cuda":
            torch.cuda.synchronize()
        if step > 0:  # the first step reads the store / warms up kernels
            times.append(time.perf_counter() - start)
        assert result is not None and all(np.isfinite(result[0][k]) for k in LOSS_TERMS)
    return {
        "mode": mode,
        "step_seconds": float(np.median(times)),
        "step_seconds_min": min(times),
        "step_seconds_max": max(times),
        "steps": steps,
        "views_per_step": int(batch.num_views),
        "points_per_step": int(batch.num_points),
        "peak_memory_mb": peak_memory_mb(target),
        "clip_forward_passes": getattr(scenes, "forward_passes", 0),
        "open_clip_imported": "open_clip" in sys.modules,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.online_clip",
        description="Time training steps with cached CLIP features or with CLIP run in the step.")
    parser.add_argument("--store", required=True, help="store with one feature set")
    parser.add_argument("--mode", choices=["cached", "online"], required=True,
                        help="cached: features from the store; online: CLIP in every step")
    parser.add_argument("--scenes-root", type=Path, default=None,
                        help="the scenes' raw frames (online mode; synthetic layout)")
    parser.add_argument("--model", default="ViT-B-16",
                        help="open_clip model of the online mode, the store's (default %(default)s)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args(argv)
    if args.mode == "online" and args.scenes_root is None:
        parser.error("--mode online needs --scenes-root")
    print(json.dumps(measure(args.store, args.mode, args.scenes_root, args.steps, args.device,
                             args.model)))


if __name__ == "__main__":
    main()
