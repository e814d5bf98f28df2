"""The frozen CLIP image encoder of stage 1: one forward pass, spatial grid and global embedding.

Wraps `open_clip.create_model`. Everything that changes the numbers (model, weights, input size,
resize policy, normalisation, which tokens are kept) goes into `describe()`, which is what the
store turns into a feature-set id. Stage 2 never imports this module.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.devices import resolve_device
from pipeline.preprocess import Preprocess, ResizePolicy
from storage.errors import UserError

log = logging.getLogger(__name__)

MODEL_CONFIGS = Path(__file__).parent / "model_configs"
for _config in sorted(MODEL_CONFIGS.glob("*.json")):
    open_clip.add_model_config(_config)  # registers "test-ViT-tiny" and friends by file stem

SpatialKind = Literal["tokens", "maskclip"]
STORAGE_DTYPE = "float16"


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
    """What to build. Defaults give the tiny test model with seeded random weights.

    model: an open_clip model name (`ViT-B-16`, `ViT-B-16-quickgelu`, or `test-ViT-tiny`, shipped).
    pretrained: an open_clip tag (`openai`, `laion2b_s34b_b88k`: from the local cache or the hub),
        a path to a checkpoint file, or `none` (real architecture, random weights, seeded).
    image_size: (H, W) of the model input in pixels; None = the model's own (224 for ViT-B-16).
        Non-square sizes resize the positional embedding on load (`force_image_size`).
    resize: `squash` (whole frame to H x W) or `crop` (shortest side, centre crop).
    spatial_kind: `tokens` (last block's residual tokens, width-d) or `maskclip` (last block's
        value path through ln_post and proj, embed-d, text-aligned).
    device: `auto` (CUDA when available), `cpu`, `cuda`, `cuda:1`, ...
    seed: seeds the random weights of `pretrained=none`.
    """

    model: str = "test-ViT-tiny"
    pretrained: str = "none"
    image_size: tuple[int, int] | None = None
    resize: ResizePolicy = "squash"
    spatial_kind: SpatialKind = "tokens"
    device: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_size", parse_image_size(self.image_size))
        if self.resize not in ("squash", "crop"):
            raise EncoderError(f"--resize must be squash or crop, got {self.resize!r}")
        if self.spatial_kind not in ("tokens", "maskclip"):
            raise EncoderError(f"--spatial-kind must be tokens or maskclip, got {self.spatial_kind!r}")

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
            raise EncoderError(f"checkpoint {self.pretrained} does not exist: pass an existing file, "
                               "an open_clip tag (e.g. openai) or none")
        return None


def uses_quick_gelu(model: str, pretrained: str) -> bool:
    """Whether the weights were trained with QuickGELU (OpenAI's were): building them with
    nn.GELU gives silently wrong features. Model names ending in -quickgelu carry it already."""
    if pretrained.lower() in ("none", "") or model.endswith("-quickgelu"):
        return False
    try:
        return bool(open_clip.get_pretrained_cfg(model, pretrained).get("quick_gelu", False))
    except Exception:  # not a known tag (a checkpoint path): the model config decides
        return False


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_clip(config: EncoderConfig, *, load_weights: bool = True) -> torch.nn.Module:
    """The open_clip model, in eval mode with no gradients, on CPU. Raises EncoderError.

    load_weights=False builds the architecture the weights would get (QuickGELU included) with
    random weights and without touching the network or the cache: for tests.
    """
    if config.model not in open_clip.list_models() and ":" not in config.model:  # hf-hub:org/repo
        raise EncoderError(f"unknown open_clip model {config.model!r}: see open_clip.list_models(); "
                           f"shipped test config: test-ViT-tiny")
    path = config.pretrained_path
    pretrained = None if config.random_weights or not load_weights else str(path or config.pretrained)
    kwargs = dict(force_quick_gelu=uses_quick_gelu(config.model, config.pretrained),
                  force_image_size=config.image_size)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            model = open_clip.create_model(config.model, pretrained=pretrained, **kwargs)
    except Exception as error:  # open_clip raises RuntimeError/OSError/HF errors; say what to do
        raise EncoderError(
            f"could not load {config.model} weights {config.pretrained!r}: {error}. Without network, "
            "pass a local checkpoint file (--pretrained /path/to/open_clip_pytorch_model.bin), put the "
            "weights in the Hugging Face cache first, or use --pretrained none for random weights"
        ) from error
    if pretrained is None:
        warnings.warn(f"{config.model} has random weights (seed {config.seed}): "
                      "its features are meaningless, fine for tests and plumbing only", stacklevel=2)
    return model.eval().requires_grad_(False)


class FrozenClipEncoder:
    """Frozen CLIP image tower: `preprocess` one frame, `encode` a batch, `describe` the feature set.

    encode(x): x (B, 3, H_in, W_in) float32 normalised ->
        spatial (B, gh, gw, C) float32 (C = width for tokens, embed_dim for maskclip),
        global (B, D) float32, `model.encode_image(x)` (not L2-normalised).
    Runs under `torch.inference_mode()`; fp16 autocast on CUDA, fp32 on CPU.
    """

    def __init__(self, config: EncoderConfig = EncoderConfig()) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.model = build_clip(config).to(self.device)
        self.visual = self.model.visual
        if config.spatial_kind == "maskclip" and not isinstance(
                self.visual.transformer.resblocks[-1].attn, torch.nn.MultiheadAttention):
            raise EncoderError(f"--spatial-kind maskclip needs a ViT with standard attention; "
                               f"{config.model} has {type(self.visual.transformer.resblocks[-1].attn)}")
        self.input_size = tuple(int(s) for s in self.visual.image_size)
        self.patch_size = tuple(int(s) for s in self.visual.patch_size)
        self.grid_size = (self.input_size[0] // self.patch_size[0],
                          self.input_size[1] // self.patch_size[1])
        cfg = self.visual.preprocess_cfg
        self.preprocess = Preprocess(self.input_size, tuple(cfg["mean"]), tuple(cfg["std"]),
                                     config.resize)
        self.global_dim = int(self.model.visual.output_dim)
        width = int(self.visual.transformer.width)
        self.spatial_dim = width if config.spatial_kind == "tokens" else self.global_dim
        self.pretrained_sha256 = (file_sha256(config.pretrained_path)
                                  if config.pretrained_path else None)

    def prepare(self, colors: list[np.ndarray]) -> Tensor:
        """B frames of (H, W, 3) uint8 RGB -> (B, 3, H_in, W_in) float32 normalised."""
        return torch.stack([self.preprocess(color) for color in colors])

    @torch.inference_mode()
    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.to(self.device, non_blocking=True)
        autocast = torch.autocast("cuda", dtype=torch.float16, enabled=self.device.type == "cuda")
        captured: list[Tensor] = []
        hook = None
        if self.config.spatial_kind == "maskclip":
            hook = self.visual.transformer.resblocks[-1].register_forward_pre_hook(
                lambda module, args: captured.append(args[0]))
        try:
            with autocast:
                out = self.visual.forward_intermediates(x, indices=1, output_fmt="NCHW")
                global_ = out["image_features"]
                if self.config.spatial_kind == "tokens":
                    spatial = out["image_intermediates"][-1].permute(0, 2, 3, 1)
                else:
                    spatial = self._maskclip(captured[0])
        finally:
            if hook is not None:
                hook.remove()
        return spatial.float(), global_.float()

    def _maskclip(self, block_input: Tensor) -> Tensor:
        """MaskCLIP dense features: the last block's value path (no query-key attention, no
        residual, no MLP), through ln_post and proj. block_input: the last block's input tokens.
        Returns (B, gh, gw, embed_dim)."""
        if not self.visual.transformer.batch_first:
            block_input = block_input.transpose(0, 1)
        block = self.visual.transformer.resblocks[-1]
        attn: torch.nn.MultiheadAttention = block.attn
        width = attn.embed_dim
        value = F.linear(block.ln_1(block_input), attn.in_proj_weight[2 * width:],
                         attn.in_proj_bias[2 * width:] if attn.in_proj_bias is not None else None)
        tokens = self.visual.ln_post(attn.out_proj(value))[:, 1:]  # drop the class token
        if self.visual.proj is not None:
            tokens = tokens @ self.visual.proj
        return tokens.reshape(tokens.shape[0], *self.grid_size, tokens.shape[-1])

    def describe(self) -> dict:
        """The feature-set description the store records (identity keys: storage/featureset.py)."""
        cfg = self.config
        return {
            "model": cfg.model,
            "pretrained": (f"file:{cfg.pretrained_path.name}" if cfg.pretrained_path
                           else cfg.pretrained.lower() if cfg.random_weights else cfg.pretrained),
            "pretrained_sha256": self.pretrained_sha256,
            "seed": cfg.seed if cfg.random_weights else None,
            "random_weights": cfg.random_weights,
            "quick_gelu": uses_quick_gelu(cfg.model, cfg.pretrained) or cfg.model.endswith("-quickgelu"),
            "image_size": list(self.input_size),
            "patch_size": list(self.patch_size),
            "grid_size": list(self.grid_size),
            "resize": cfg.resize,
            "interpolation": "bicubic",
            "mean": list(self.preprocess.mean),
            "std": list(self.preprocess.std),
            "spatial_kind": cfg.spatial_kind,
            "spatial_dim": self.spatial_dim,
            "global_dim": self.global_dim,
            "dtype": STORAGE_DTYPE,
            "compute": "fp16 autocast (CUDA)" if self.device.type == "cuda" else "fp32 (CPU)",
            "open_clip_version": open_clip.__version__,
        }
