"""`TrainConfig`: every setting of a training run, with defaults that work, and its CLI.

Each field carries its help text; `build_parser` turns the dataclass into argparse flags
(`--batch-scenes` for `batch_scenes`), so the config and the CLI cannot drift apart.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Literal

from cli.arguments import STORAGE_OPTIONS_HELP, add_dataclass_arguments, option
from model.network.backbones import BACKBONES, DEFAULT_BACKBONE
from model.network.losses import DEFAULT_CLIP_SCHEDULE, ClipLossMode
from pipeline.projection import DEPTH_THRESHOLD, RELATIVE_THRESHOLD


@dataclass(frozen=True)
class TrainConfig:
    """One training run of the fusion model on cached CLIP features."""

    cache: str = option("storage/", "a store (path or fsspec URL) or a folder of *.zarr stores")
    storage_options: str | None = option(None, STORAGE_OPTIONS_HELP)
    featureset: str | None = option(
        None, "feature set id to train on (default: the only one; with several, they are listed)")
    out: str | None = option(None, "run folder for checkpoints, metrics and plots "
                              "(default runs/<date>-<time>; with --resume, the resumed run's)")
    resume: str | None = option(None, "continue a run exactly: its folder or a checkpoint file; "
                                 "the run goes on in that folder (or --out), on the same store, "
                                 "feature set and scenes (checked)")
    allow_different_store: bool = option(
        False, "with --resume: continue on a store other than the run's (moved, copied or "
        "extracted again); its feature set and scenes must still match")
    val_list: str | None = option(None, "text file of validation scene ids, one per line "
                                   "(default: a seeded --val-fraction of the scenes)")
    val_fraction: float = option(0.2, "fraction of scenes held out for validation when there "
                                  "is no --val-list")
    epochs: int | None = option(None, "epochs to train (default 30; with --resume, the run's own)")
    batch_scenes: int = option(2, "scenes per training step; under torchrun the global batch, "
                                "split across the processes (a multiple of their number)")
    lr: float = option(2e-3, "peak learning rate of AdamW")
    weight_decay: float = option(0.05, "AdamW weight decay")
    schedule: Literal["cosine", "poly"] = option(
        "cosine", "learning-rate decay after warm-up: cosine to 1%% of --lr, or poly (power 0.9)")
    warmup_steps: int = option(20, "steps of linear learning-rate warm-up")
    grad_clip: float = option(1.0, "clip the gradient norm to this (0 = off)")
    seed: int = option(0, "seed of model init, split, shuffling and augmentation")
    device: str = option("auto", "cpu, cuda, cuda:1 or auto (cuda when there is one)")
    deterministic: bool = option(True, "bitwise-repeatable runs and resumes (deterministic "
                                  "scatter kernels; --no-deterministic is faster on CUDA)")
    amp: bool | None = option(None, "float16 autocast with loss scaling (default: on CUDA only)")
    augment: bool = option(True, "random z-rotation, flip, scale and jitter of training points")
    backbone: str = option(DEFAULT_BACKBONE, "3D backbone, by name: "
                           + ", ".join(BACKBONES) + " (model.network.backbones)")
    voxel_size: float = option(0.02, "backbone voxel edge, metres")
    channels: tuple[int, ...] = option((32, 64, 96, 128), "backbone width per level, finest first")
    norm: Literal["batch", "layer"] = option(
        "batch", "backbone normalisation: batch (BatchNorm, synchronised across GPUs under "
        "torchrun; per process on CPUs) or layer (independent of the batch)")
    width: int = option(256, "width of the projected 2D, 3D and fused features")
    use_2d: bool = option(True, "fuse the cached 2D features (--no-use-2d: the 3D-only model)")
    instance_head: bool = option(True, "train the instance branch (offsets to instance centres)")
    semantic_weight: float | None = option(
        None, "weight of the semantic loss (default: BiFusion's 0.4, or 0.5 with --no-use-2d)")
    offset_weight: float = option(1.0, "weight of the instance offset L1 loss")
    direction_weight: float = option(1.0, "weight of the instance offset direction loss")
    cluster_radius: float = option(0.03, "instance clustering: grid cell of shifted points, metres")
    min_instance_points: int = option(50, "instance clustering: smallest instance kept, points")
    min_region_size: int = option(100, "instance AP: ground truth under this many points is "
                                   "ignored (ScanNet's 100)")
    distill_weight: float | None = option(
        None, "weight of the per-point distillation loss (1 - cosine between each seen point's "
        "CLIP-space embedding and its 2D feature, as OpenScene): what lets model.query ask a "
        "trained model for text; default 1 on text-aligned (maskclip) feature sets, else 0")
    clip_schedule: tuple[tuple[int, float], ...] = option(
        DEFAULT_CLIP_SCHEDULE,
        "CLIP consistency weight steps as epoch:weight, e.g. 0:0,11:0.001,21:0.01")
    clip_loss: ClipLossMode = option(
        "positive", "CLIP consistency loss: positive (each view's pooled feature toward its own "
        "global CLIP embedding, BiFusion's term) or contrastive (also an InfoNCE term whose "
        "negatives are the views of the other scenes of the step; under torchrun, of the "
        "process's share of it)")
    temperature: float = option(0.1, "CLIP consistency temperature (floored at 0.1)")
    depth_threshold: float = option(DEPTH_THRESHOLD,
                                    "occlusion test: |z - depth| under this many metres")
    relative_threshold: float = option(RELATIVE_THRESHOLD,
                                       "occlusion test: or under this fraction of depth")
    scene_cache_gb: float = option(2.0, "projected scenes kept in memory between epochs, GB")
    plot: bool = option(True, "write curves.png after every epoch")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m model.train",
        description="Stage 2: train the 2D-3D fusion model on CLIP features cached by extract-clip. "
        "CLIP is never run: features come from the store and are projected onto each scene's points.",
    )
    add_dataclass_arguments(parser, TrainConfig)
    return parser


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    return TrainConfig(**vars(build_parser().parse_args(argv)))
