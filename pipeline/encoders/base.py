"""What every frozen image encoder of stage 1 shares: its settings (`EncoderConfig`), its
interface (`ImageEncoder`), its one-line error, and the input checks of all families."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import Tensor

from cli.errors import UserError
from pipeline.preprocess import (DECODE_PATHS, DEFAULT_DECODE, DecodePath, Preprocess,
                                 ResizePolicy)
from storage.featureset import OPEN_CLIP, FeatureSetSpec

DEFAULT_MODEL = "ViT-B-16"
DEFAULT_PRETRAINED = "openai"
"""The model and weights stage 1 extracts with unless told otherwise (CLIP ViT-B/16, OpenAI's)."""

SpatialKind = Literal["tokens", "maskclip"]
STORAGE_DTYPE = "float16"
"""dtype of the stored features."""


class ImageEncoder(Protocol):
    """A frozen image encoder: what stage 1 (pipeline.extraction) needs of one.

    device: where it runs. preprocess: a pipeline.preprocess.Preprocess (input size, resize
    policy, decode path, mean and std): one frame, (H, W, 3) uint8 RGB -> (3, H_in, W_in)
    float32 model input.
    encode(x): (B, 3, H_in, W_in) -> (spatial (B, gh, gw, C), global (B, D)), float32, under
    `torch.inference_mode()`. describe() -> the FeatureSetSpec of what it writes (its id is the
    feature set's). The spatial grid covers the model input exactly: H_in = gh * patch height.
    Optionally, static `check_model_name(model)` and `check_weights(model, pretrained)` raise
    EncoderError in seconds, loading nothing (flows.parameters runs them before a flow starts).
    """

    device: torch.device
    preprocess: Preprocess

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]: ...

    def describe(self) -> FeatureSetSpec: ...


class EncoderError(UserError):
    """The encoder cannot be built as asked (unknown model, weights not available, ...)."""


def parse_image_size(text: str | int | tuple[int, int] | None) -> tuple[int, int] | None:
    """'224' -> (224, 224); '240x320' -> (240, 320) as (H, W); None or '' -> the model's own."""
    if text is None or text == "":
        return None
    if isinstance(text, int):
        return (text, text)
    if isinstance(text, (tuple, list)):
        return (int(text[0]), int(text[1]))
    parts = str(text).lower().split("x")
    try:
        size = tuple(int(p) for p in parts)
    except ValueError:
        size = ()
    if len(size) not in (1, 2) or min(size) <= 0:
        raise EncoderError(f"image size {text!r} is not N or HxW (e.g. 224 or 240x320)")
    return (size[0], size[0]) if len(size) == 1 else size


@dataclass(frozen=True)
class EncoderConfig:
    """What to build: by default CLIP ViT-B/16 with OpenAI's weights (DEFAULT_MODEL,
    DEFAULT_PRETRAINED), as the flow; tests and the demo use `test-ViT-tiny` with `none`.

    model: the model's name in its family: an open_clip model (`ViT-B-16`,
        `ViT-B-16-quickgelu`, or `test-ViT-tiny`, shipped) or a timm one
        (`vit_small_patch14_dinov2`).
    pretrained: a tag of the family (open_clip: `openai`, `laion2b_s34b_b88k`; timm: `lvd142m`;
        from the local cache or the hub), a path to a checkpoint file, or `none` (real
        architecture, random weights, seeded).
    image_size: (H, W) of the model input in pixels; None = the model's own (224 for ViT-B-16).
        Other sizes resize the positional embedding on load.
    resize: `squash` (whole frame to H x W) or `crop` (shortest side, centre crop).
    decode: `scaled` (JPEGs decoded at the smallest DCT scale at least the input size, then
        resized: several times faster) or `full` (decoded whole, then resized).
    spatial_kind: `tokens` (last block's residual tokens, width-d) or `maskclip` (last block's
        value path through ln_post and proj, embed-d, text-aligned).
    device: `auto` (CUDA when available), `cpu`, `cuda`, `cuda:1`, ...
    seed: seeds the random weights of `pretrained=none`.
    encoder: the family, a key of pipeline.encoders.ENCODERS: open_clip (CLIP) or timm (DINOv2).
    """

    model: str = DEFAULT_MODEL
    pretrained: str = DEFAULT_PRETRAINED
    image_size: tuple[int, int] | None = None
    resize: ResizePolicy = "squash"
    decode: DecodePath = DEFAULT_DECODE
    spatial_kind: SpatialKind = "tokens"
    device: str = "auto"
    seed: int = 0
    encoder: str = OPEN_CLIP

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_size", parse_image_size(self.image_size))
        if self.resize not in ("squash", "crop"):
            raise EncoderError(f"--resize must be squash or crop, got {self.resize!r}")
        if self.decode not in DECODE_PATHS:
            raise EncoderError(f"--decode must be scaled or full, got {self.decode!r}")
        if self.spatial_kind not in ("tokens", "maskclip"):
            raise EncoderError(
                f"--spatial-kind must be tokens or maskclip, got {self.spatial_kind!r}")

    @property
    def random_weights(self) -> bool:
        return self.pretrained.lower() in ("none", "")

    @property
    def pretrained_path(self) -> Path | None:
        """The checkpoint file when `pretrained` names one, else None (a tag or none)."""
        if self.random_weights:
            return None
        path = Path(self.pretrained).expanduser()
        looks_like_path = path.suffix or "/" in self.pretrained or "\\" in self.pretrained
        if path.is_file():
            return path
        if looks_like_path:
            raise EncoderError(f"checkpoint {self.pretrained} does not exist: pass an existing "
                               "file, a tag of the model's weights (e.g. openai) or none")
        return None


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read 1 MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_and_compute(config: EncoderConfig, device: torch.device,
                        pretrained_sha256: str | None) -> dict[str, Any]:
    """The FeatureSetSpec fields every family fills alike: which weights (a tag,
    `file:<name>` of a checkpoint with its SHA-256, or `none` with the seed of the random
    weights), the stored dtype, and the precision of the forward pass."""
    path = config.pretrained_path
    return {
        "pretrained": (f"file:{path.name}" if path else config.pretrained.lower()
                       if config.random_weights else config.pretrained),
        "pretrained_sha256": pretrained_sha256,
        "seed": config.seed if config.random_weights else None,
        "random_weights": config.random_weights,
        "dtype": STORAGE_DTYPE,
        "compute": "fp16 autocast (CUDA)" if device.type == "cuda" else "fp32 (CPU)",
    }
