"""DINOv2 through timm as a frozen image encoder: patch tokens on an exact 14-pixel grid and the
class token as the global embedding.

DINOv2 features are strong for geometry and correspondence but live in no text space, so its
feature sets are not text-aligned and have no text tower: stage 2 trains on them
(`--featureset`), text queries refuse them. The model's input must be a whole number of
patches (224 = 16 x 14) so that the grid covers the input exactly and
`pipeline.projection.GridMapping` maps colour pixels onto it without rounding.

Weights: `pretrained=none` builds the architecture with seeded random weights (tests), a tag
such as `lvd142m` loads timm's published weights (from the Hugging Face cache or the hub), a
file path loads a state dict (`.safetensors`, or a `.pt`/`.pth`/`.bin` read with
`torch.load(weights_only=True)`).
"""

from __future__ import annotations

import difflib
import logging
import warnings

import timm
import torch
from torch import Tensor

from pipeline.devices import resolve_device
from pipeline.encoders.base import EncoderConfig, EncoderError, file_sha256, weights_and_compute
from pipeline.preprocess import Preprocess
from storage.featureset import FeatureSetSpec

log = logging.getLogger(__name__)

TIMM = "timm"
"""The encoder family name of this module in pipeline.encoders.ENCODERS."""


def build_timm_vit(config: EncoderConfig) -> torch.nn.Module:
    """The timm ViT of `config`, in eval mode with no gradients, on CPU. Raises EncoderError."""
    if config.spatial_kind != "tokens":
        raise EncoderError(f"{config.model} gives patch tokens only: drop --spatial-kind "
                           f"{config.spatial_kind} (maskclip is CLIP's)")
    TimmViTEncoder.check_model_name(config.model)
    kwargs = {"num_classes": 0}
    if config.image_size is not None:
        kwargs["img_size"] = config.image_size
    path = config.pretrained_path
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            if path is not None or config.random_weights:
                model = timm.create_model(config.model, pretrained=False, **kwargs)
            else:
                model = timm.create_model(f"{config.model}.{config.pretrained}", pretrained=True,
                                          **kwargs)
        if path is not None:
            model.load_state_dict(_state_dict(path), strict=False)
    except EncoderError:
        raise
    except Exception as error:  # timm raises RuntimeError/OSError/HF errors; say what to do
        raise EncoderError(
            f"could not load {config.model} weights {config.pretrained!r}: "
            f"{' '.join(str(error).split())[:200]}. Without network, pass a local weights file "
            "(--pretrained /path/to/model.safetensors) or --pretrained none for random weights"
        ) from None
    if config.random_weights:
        warnings.warn(f"{config.model} has random weights (seed {config.seed}): its features "
                      "are meaningless, fine for tests and plumbing only", stacklevel=2)
    return model.eval().requires_grad_(False)


def _state_dict(path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


class TimmViTEncoder:
    """A frozen timm ViT (DINOv2): `preprocess` a frame, `encode` a batch, `describe` the
    feature set.

    encode(x): x (B, 3, H_in, W_in) float32 normalised -> spatial (B, gh, gw, C) float32, the
    last block's normalised patch tokens (C = embed_dim, 384 for ViT-S/14), and global (B, C)
    float32, the normalised class token. Runs under `torch.inference_mode()`; fp16 autocast on
    CUDA, fp32 on CPU.
    """

    @staticmethod
    def check_model_name(model: str) -> None:
        """Raise EncoderError unless timm knows `model` (without building it)."""
        if not timm.list_models(model):
            close = difflib.get_close_matches(model, timm.list_models(), n=5, cutoff=0.6)
            raise EncoderError(f"unknown timm model {model!r}"
                               + (f"; did you mean {', '.join(close)}?" if close else "")
                               + "; timm.list_models('*dinov2*') lists the DINOv2 ones")

    def __init__(self, config: EncoderConfig) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.model = build_timm_vit(config).to(self.device)
        patch = tuple(int(s) for s in self.model.patch_embed.patch_size)
        self.input_size = tuple(int(s) for s in self.model.patch_embed.img_size)
        (height, width), (patch_h, patch_w) = self.input_size, patch
        if height % patch_h or width % patch_w:
            raise EncoderError(
                f"image size {height}x{width} is not a whole number of {config.model}'s "
                f"{patch_h}-pixel patches: pick a multiple such as "
                f"{height // patch_h * patch_h}x{width // patch_w * patch_w}")
        self.patch_size = patch
        self.grid_size = tuple(int(s) for s in self.model.patch_embed.grid_size)
        cfg = self.model.pretrained_cfg
        self.preprocess = Preprocess(self.input_size, tuple(cfg["mean"]), tuple(cfg["std"]),
                                     config.resize, config.decode)
        self.interpolation = str(cfg.get("interpolation", "bicubic"))
        self.dim = int(self.model.embed_dim)
        self.pretrained_sha256 = (file_sha256(config.pretrained_path)
                                  if config.pretrained_path else None)

    @torch.inference_mode()
    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.to(self.device, non_blocking=True)
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.device.type == "cuda"):
            tokens, intermediates = self.model.forward_intermediates(
                x, indices=1, output_fmt="NCHW", norm=True)
            global_ = self.model.forward_head(tokens, pre_logits=True)
        spatial = intermediates[-1].permute(0, 2, 3, 1)
        return spatial.float(), global_.float()

    def describe(self) -> FeatureSetSpec:
        """The spec of the feature set this encoder writes (its id: storage.featureset)."""
        cfg = self.config
        return FeatureSetSpec(
            encoder=TIMM,
            model=cfg.model,
            image_size=self.input_size,
            patch_size=self.patch_size,
            grid_size=self.grid_size,
            resize=cfg.resize,
            decode=cfg.decode,
            interpolation=self.interpolation,
            mean=tuple(self.preprocess.mean),
            std=tuple(self.preprocess.std),
            spatial_kind=cfg.spatial_kind,
            spatial_dim=self.dim,
            global_dim=self.dim,
            text_aligned=False,
            has_text_tower=False,
            **weights_and_compute(cfg, self.device, self.pretrained_sha256),
            library_versions=((TIMM, timm.__version__),),
        )
