"""The extract-clip parameters: declared once (`ExtractParameters`) and checked before anything
starts (`check_parameters`).

`ExtractParameters` is the single declaration: the flow's signature (what Prefect shows and a
deployment run takes as `--param name=value`) and the command line (`--name value`) are both
generated from it, as model.config.TrainConfig does for stage 2, so they cannot drift apart.
Defaults that belong to a part of the pipeline come from there (the model and weights from
pipeline.encoders.base, the encoder families and readers from their registries).

One parameter has two names: `--image-size` on the command line, `image_size` in a deployment
run (`prefect deployment run 'extract-clip/local' --param image_size=...`). A message names it
the way the user typed it: `main` checks inside `flag_names()`, a deployment run outside.

`check_parameters` runs every check of `PARAMETER_CHECKS` in order, before Prefect starts (the
command line) or at the start of the flow (a deployment), and before any store is created: a
typo costs seconds and leaves nothing behind. A check is `(parameter, function)`: the function
takes all parameters and raises UserError; the message is prefixed with the parameter's name.
The whole numbers (stride, batch size, workers) are checked first, by `check_numbers`. Add
checks there; they must be cheap and load no model.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cli.arguments import STORAGE_OPTIONS_HELP, option
from cli.errors import UserError
from pipeline.encoders import ENCODERS
from pipeline.encoders.base import (DEFAULT_MODEL, DEFAULT_PRETRAINED, EncoderConfig, SpatialKind,
                                    parse_image_size)
from pipeline.extraction import DEFAULT_BATCH_SIZE, DEFAULT_STRIDE
from pipeline.preprocess import DecodePath, ResizePolicy
from pipeline.readers import SCENE_READERS
from pipeline.readers.discovery import list_scenes, not_scenes
from storage.featureset import OPEN_CLIP
from storage.store import check_store_location

_AS_FLAGS = contextvars.ContextVar("extract_clip_names_as_flags", default=False)


def name(parameter: str) -> str:
    """`--image-size` inside `flag_names()` (the command line), else `image_size`."""
    return "--" + parameter.replace("_", "-") if _AS_FLAGS.get() else parameter


@contextlib.contextmanager
def flag_names() -> Iterator[None]:
    """Within this context (and the flow run it starts) messages name parameters as flags."""
    token = _AS_FLAGS.set(True)
    try:
        yield
    finally:
        _AS_FLAGS.reset(token)


def resolved(path: str | os.PathLike) -> str:
    """`path`, and for a relative one where it resolves: against the working directory of this
    process (for a deployment run, the folder `python -m flows.serve` was started in)."""
    if Path(path).expanduser().is_absolute() or "://" in str(path):
        return str(path)
    return f"{path} (relative to {Path.cwd()}, the working directory of the process running the flow)"


NUMBERS = {"stride": "keep every N-th frame", "batch_size": "frames per forward pass",
           "workers": "scenes processed at once"}
"""The whole-number parameters (at least 1) and what each means."""


def check_numbers(*, stride: int, batch_size: int, workers: int) -> None:
    """Raise a one-line UserError for a stride, batch size or worker count below 1 (a stride
    of 0 cannot step, a negative one would store the frames reversed)."""
    for parameter, value in (("stride", stride), ("batch_size", batch_size), ("workers", workers)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            example = f"{name(parameter)} 1" if _AS_FLAGS.get() else f"{parameter}=1"
            raise UserError(f"{parameter} {value!r}: must be a whole number of at least 1 "
                            f"({NUMBERS[parameter]}); e.g. {example}")


def _reader(parameters: Mapping[str, Any]):
    return SCENE_READERS[parameters.get("dataset", "scannet")]


def _root_holds_scenes(parameters: Mapping[str, Any]) -> None:
    root = Path(parameters["root"]).expanduser()
    if not root.is_dir():
        raise UserError(f"no folder {resolved(parameters['root'])}: give the dataset folder that "
                        "holds the scene folders (scene0000_00/, ...)")
    reader = _reader(parameters)
    if not list_scenes(root, reader=reader):
        folders = "; ".join(f"{folder}: {why}"
                            for folder, why in not_scenes(root, reader=reader).items())
        raise UserError(f"no scenes under {resolved(parameters['root'])}"
                        f"{f' (folders that are no scene: {folders})' if folders else ''}: give the "
                        f"folder above the scene folders of --dataset "
                        f"{parameters.get('dataset', 'scannet')}")


def _scenes_match(parameters: Mapping[str, Any]) -> None:
    if parameters.get("scenes") and not list_scenes(Path(parameters["root"]).expanduser(),
                                                    parameters["scenes"], _reader(parameters)):
        raise UserError(f"no scene folder under {parameters['root']} matches "
                        f"{parameters['scenes']!r}")


def _image_size(parameters: Mapping[str, Any]) -> None:
    size = parse_image_size(parameters.get("image_size"))
    encoder = ENCODERS[parameters.get("encoder", OPEN_CLIP)]
    getattr(encoder, "check_image_size", lambda model, size: None)(parameters["model"], size)


def _encoder_known(parameters: Mapping[str, Any]) -> None:
    family = parameters.get("encoder", OPEN_CLIP)
    if family not in ENCODERS:
        raise UserError(f"no encoder family {family!r}: choose one of {', '.join(ENCODERS)}")


def _model_known(parameters: Mapping[str, Any]) -> None:
    encoder = ENCODERS[parameters.get("encoder", OPEN_CLIP)]
    getattr(encoder, "check_model_name", lambda model: None)(parameters["model"])


def _weights_available(parameters: Mapping[str, Any]) -> None:
    encoder = ENCODERS[parameters.get("encoder", OPEN_CLIP)]
    getattr(encoder, "check_weights", lambda model, pretrained: None)(
        parameters["model"], parameters["pretrained"])


def _dataset_known(parameters: Mapping[str, Any]) -> None:
    dataset = parameters.get("dataset", "scannet")
    if dataset not in SCENE_READERS:
        raise UserError(f"no reader {dataset!r}: choose one of {', '.join(SCENE_READERS)}")


def _store_writable(parameters: Mapping[str, Any]) -> None:
    check_store_location(parameters["store"])


PARAMETER_CHECKS: list[tuple[str, Callable[[Mapping[str, Any]], None]]] = [
    ("dataset", _dataset_known),  # before root: the dataset's reader says what a scene is
    ("root", _root_holds_scenes),
    ("scenes", _scenes_match),
    ("encoder", _encoder_known),
    ("model", _model_known),
    ("image_size", _image_size),
    ("pretrained", _weights_available),
    ("store", _store_writable),
]
"""(parameter, check) in the order they run; the first failure is the one reported."""


def check_parameters(parameters: Mapping[str, Any]) -> None:
    """Check the numbers (check_numbers), then run every check of PARAMETER_CHECKS; raise the
    first failure as a UserError that starts with the parameter's name (`stride 0: must be
    ...`, `--model: unknown open_clip model 'ViT-B-61': did you mean ...`)."""
    check_numbers(**{parameter: parameters[parameter] for parameter in NUMBERS})
    for parameter, check in PARAMETER_CHECKS:
        try:
            check(parameters)
        except UserError as error:
            raise UserError(f"{name(parameter)}: {error}") from None


def _resources(text: str) -> dict[str, float]:
    """`GPU=1,MEM=8e9` -> {"GPU": 1.0, "MEM": 8e9}."""
    try:
        return {name.strip(): float(value) for name, value in
                (part.split("=") for part in text.split(",") if part.strip())}
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=AMOUNT[,NAME=AMOUNT]") from None


@dataclass(frozen=True)
class ExtractParameters:
    """Every parameter of extract-clip, declared once: the flow's signature (what a deployment
    run takes as `--param name=value`) and the command line (`--name`) both derive from it
    (`cli.arguments.dataclass_signature`, `cli.arguments.add_dataclass_arguments`)."""

    root: str = field(metadata={"help": "dataset root: a folder of scene folders"})
    store: str = option("storage/features.zarr",
                        "store path or fsspec URL, created if missing")
    dataset: str = option(
        "scannet", "layout of the scenes, a reader of pipeline.readers: scannet, the SensReader "
        "export (color/, depth/, pose/), or for a folder with <scene>.sens and no color/ the "
        ".sens; scannet-sens, always the raw <scene>.sens; synthetic, ScanNet's layout plus "
        "exact ground truth", choices=lambda: list(SCENE_READERS))
    scenes: list[str] | str | None = option(
        None, "scene ids, or one glob such as 'scene00*' (default: all)", nargs="*", type=str)
    stride: int = option(DEFAULT_STRIDE, NUMBERS["stride"])
    encoder: str = option(OPEN_CLIP, "encoder family of pipeline.encoders: open_clip (CLIP) or "
                          "timm (DINOv2, e.g. --model vit_small_patch14_dinov2; not "
                          "text-aligned)", choices=lambda: list(ENCODERS))
    model: str = option(DEFAULT_MODEL, "model name in its family, e.g. ViT-B-16 or test-ViT-tiny")
    pretrained: str = option(DEFAULT_PRETRAINED,
                             "weights: a tag (open_clip: openai, laion2b_s34b_b88k; timm: "
                             "lvd142m), a checkpoint path, or none for seeded random weights")
    image_size: str | None = option(
        None, "model input size, S or HxW such as 240x320 (default: the model's own)")
    resize: ResizePolicy = option(
        EncoderConfig.resize,
        "squash: whole frame resized to the input; crop: shortest side then centre crop, as "
        "open_clip's preprocess")
    decode: DecodePath = option(
        EncoderConfig.decode,
        "scaled: decode each JPEG at the smallest DCT scale (1/2, 1/4, 1/8) still at least the "
        "model input, then resize (several times faster); full: decode every pixel, then resize. "
        "The feature set records which")
    spatial_kind: SpatialKind = option(
        EncoderConfig.spatial_kind,
        "tokens: last block's token grid (768-d for ViT-B-16); maskclip: text-aligned dense "
        "features (512-d, CLIP only)")
    batch_size: int = option(DEFAULT_BATCH_SIZE, NUMBERS["batch_size"])
    device: str = option(EncoderConfig.device, "cpu, cuda, cuda:1 or auto")
    task_runner: Literal["threads", "dask"] = option(
        "threads", "threads in this process, or dask: a LocalCluster of --workers processes")
    workers: int = option(2, "scenes processed at once: threads, or LocalCluster workers")
    dask_address: str | None = option(
        None, "run the scene tasks on an existing Dask cluster, its scheduler's address such "
        "as tcp://10.0.0.5:8786 (implies --task-runner dask)")
    dask_resources: dict[str, float] | None = option(
        None, "worker resources each scene task needs, e.g. GPU=1 for workers started with "
        "`dask worker ... --resources GPU=1` (one scene per GPU)", type=_resources)
    storage_options: dict[str, Any] | None = option(None, STORAGE_OPTIONS_HELP, type=str)
    verify: bool = option(
        False, "read every stored chunk of the scenes back and redo the frames whose chunks "
        "are corrupt (costs a read of the store; without it, frames whose chunks are missing "
        "are redone)")

    def encoder_config(self) -> EncoderConfig:
        """The encoder these parameters ask for."""
        return EncoderConfig(encoder=self.encoder, model=self.model, pretrained=self.pretrained,
                             image_size=parse_image_size(self.image_size), resize=self.resize,
                             decode=self.decode, spatial_kind=self.spatial_kind,
                             device=self.device)

    def __post_init__(self) -> None:
        # the command line gives `--scenes 'scene00*'` as a list of one glob: the glob itself
        scenes = self.scenes
        if isinstance(scenes, list) and len(scenes) == 1 and "*" in scenes[0]:
            object.__setattr__(self, "scenes", scenes[0])
