"""`TrainConfig`: every setting of a training run, with defaults that work, and its CLI.

Each field carries its help text; `build_parser` turns the dataclass into argparse flags
(`--batch-scenes` for `batch_scenes`), so the config and the CLI cannot drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin, get_type_hints

from storage.store import STORAGE_OPTIONS_HELP


def _option(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class TrainConfig:
    """One training run of the fusion model on cached CLIP features."""

    cache: str = _option("storage/", "a store (path or fsspec URL) or a folder of *.zarr stores")
    storage_options: str | None = _option(None, STORAGE_OPTIONS_HELP)
    featureset: str | None = _option(
        None, "feature set id to train on (default: the only one; with several, they are listed)")
    out: str | None = _option(None, "run folder for checkpoints, metrics and plots "
                              "(default runs/<date>-<time>; with --resume, the resumed run's)")
    resume: str | None = _option(None, "continue a run exactly: its folder or a checkpoint file")
    val_list: str | None = _option(None, "text file of validation scene ids, one per line "
                                   "(default: a seeded --val-fraction of the scenes)")
    val_fraction: float = _option(0.2, "fraction of scenes held out for validation when there "
                                  "is no --val-list")
    epochs: int | None = _option(None, "epochs to train (default 30; with --resume, the run's own)")
    batch_scenes: int = _option(2, "scenes per training step; under torchrun the global batch, "
                                "split across the processes (a multiple of their number)")
    lr: float = _option(2e-3, "peak learning rate of AdamW")
    weight_decay: float = _option(0.05, "AdamW weight decay")
    schedule: Literal["cosine", "poly"] = _option(
        "cosine", "learning-rate decay after warm-up: cosine to 1%% of --lr, or poly (power 0.9)")
    warmup_steps: int = _option(20, "steps of linear learning-rate warm-up")
    grad_clip: float = _option(1.0, "clip the gradient norm to this (0 = off)")
    seed: int = _option(0, "seed of model init, split, shuffling and augmentation")
    device: str = _option("auto", "cpu, cuda, cuda:1 or auto (cuda when there is one)")
    deterministic: bool = _option(True, "bitwise-repeatable runs and resumes (deterministic "
                                  "scatter kernels; --no-deterministic is faster on CUDA)")
    amp: bool | None = _option(None, "float16 autocast with loss scaling (default: on CUDA only)")
    augment: bool = _option(True, "random z-rotation, flip, scale and jitter of training points")
    voxel_size: float = _option(0.02, "backbone voxel edge, metres")
    channels: tuple[int, ...] = _option((32, 64, 96, 128), "backbone width per level, finest first")
    norm: Literal["batch", "layer"] = _option(
        "batch", "backbone normalisation: batch (BatchNorm, synchronised across GPUs under "
        "torchrun; per process on CPUs) or layer (independent of the batch)")
    width: int = _option(256, "width of the projected 2D, 3D and fused features")
    use_2d: bool = _option(True, "fuse the cached 2D features (--no-use-2d: the 3D-only model)")
    instance_head: bool = _option(True, "train the instance branch (offsets to instance centres)")
    semantic_weight: float | None = _option(
        None, "weight of the semantic loss (default: the seed's 0.4, or 0.5 with --no-use-2d)")
    offset_weight: float = _option(1.0, "weight of the instance offset L1 loss")
    direction_weight: float = _option(1.0, "weight of the instance offset direction loss")
    cluster_radius: float = _option(0.03, "instance clustering: grid cell of shifted points, metres")
    min_instance_points: int = _option(50, "instance clustering: smallest instance kept, points")
    min_region_size: int = _option(100, "instance AP: ground truth under this many points is "
                                   "ignored (ScanNet's 100)")
    distill_weight: float | None = _option(
        None, "weight of the per-point distillation loss (1 - cosine between each seen point's "
        "CLIP-space embedding and its 2D feature, as OpenScene): what lets model.query ask a "
        "trained model for text; default 1 on text-aligned (maskclip) feature sets, else 0")
    clip_schedule: tuple[tuple[int, float], ...] = _option(
        ((0, 0.0), (11, 0.001), (21, 0.01)),
        "CLIP consistency weight steps as epoch:weight, e.g. 0:0,11:0.001,21:0.01")
    temperature: float = _option(0.1, "CLIP consistency temperature (floored at 0.1)")
    depth_threshold: float = _option(0.05, "occlusion test: |z - depth| under this many metres")
    relative_threshold: float = _option(0.02, "occlusion test: or under this fraction of depth")
    scene_cache_gb: float = _option(2.0, "projected scenes kept in memory between epochs, GB")
    plot: bool = _option(True, "write curves.png after every epoch")


def _parse_value(kind: Any, text: str) -> Any:
    if kind == tuple[int, ...]:
        return tuple(int(part) for part in text.split(","))
    if kind == tuple[tuple[int, float], ...]:
        steps = []
        for part in text.split(","):
            epoch, _, weight = part.partition(":")
            steps.append((int(epoch), float(weight)))
        return tuple(steps)
    return kind(text)


def _format_default(value: Any) -> str:
    if isinstance(value, tuple) and value and isinstance(value[0], tuple):
        return ",".join(f"{a}:{b:g}" for a, b in value)
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m model.train",
        description="Stage 2: train the 2D-3D fusion model on CLIP features cached by extract-clip. "
        "CLIP is never run: features come from the store and are projected onto each scene's points.",
    )
    hints = get_type_hints(TrainConfig)
    for item in dataclasses.fields(TrainConfig):
        flag = "--" + item.name.replace("_", "-")
        kind = hints[item.name]
        help_text = item.metadata["help"]
        if kind is bool:
            help_text += f" (default {'on' if item.default else 'off'})"
        elif item.default is not None:
            help_text += f" (default {_format_default(item.default)})"
        if kind in (bool, bool | None):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=item.default,
                                help=help_text)
        elif get_origin(kind) is Literal:
            parser.add_argument(flag, choices=get_args(kind), default=item.default, help=help_text)
        else:
            base = next((a for a in get_args(kind) if a is not type(None)), kind) \
                if item.default is None else kind
            parser.add_argument(flag, type=lambda text, base=base: _parse_value(base, text),
                                default=item.default, help=help_text)
    return parser


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    return TrainConfig(**vars(build_parser().parse_args(argv)))
