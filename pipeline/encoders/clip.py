"""The frozen CLIP image encoder (open_clip): one forward pass, spatial grid and global embedding.

Wraps `open_clip.create_model`. Everything that changes the numbers (model, weights, input size,
resize policy, normalisation, which tokens are kept) goes into `describe()`, the feature set's
spec, whose id the store files the features under. Stage 2 never imports this module.
"""

from __future__ import annotations

import difflib
import logging
import os
import socket
import threading
import warnings
from pathlib import Path

import numpy as np
import open_clip
import open_clip.pretrained
import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.devices import resolve_device
from pipeline.encoders.base import EncoderConfig, EncoderError, file_sha256, weights_and_compute
from pipeline.preprocess import Preprocess
from storage.featureset import OPEN_CLIP, FeatureSetSpec

log = logging.getLogger(__name__)

MODEL_CONFIGS = Path(__file__).parent / "model_configs"
for _config in sorted(MODEL_CONFIGS.glob("*.json")):
    open_clip.add_model_config(_config)  # registers "test-ViT-tiny" and friends by file stem

def uses_quick_gelu(model: str, pretrained: str) -> bool:
    """Whether the weights were trained with QuickGELU (OpenAI's were): building them with
    nn.GELU gives silently wrong features. Model names ending in -quickgelu carry it already."""
    if pretrained.lower() in ("none", "") or model.endswith("-quickgelu"):
        return False
    try:
        return bool(open_clip.get_pretrained_cfg(model, pretrained).get("quick_gelu", False))
    except Exception:  # not a known tag (a checkpoint path): the model config decides
        return False


def check_model_name(model: str) -> None:
    """Raise EncoderError unless open_clip knows `model` (or it is an `hf-hub:org/repo` name),
    suggesting the closest known names (case and typos: ViT-B-61 -> ViT-B-16)."""
    known = open_clip.list_models()
    if model in known or model.startswith("hf-hub:"):
        return
    by_lower = {name.lower(): name for name in known}
    close = [by_lower[name] for name in
             difflib.get_close_matches(model.lower(), list(by_lower), n=3, cutoff=0.75)]
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    raise EncoderError(f"unknown open_clip model {model!r}: {hint}open_clip.list_models() has "
                       f"{len(known)} names (ViT-B-16, ViT-L-14, ...; test-ViT-tiny ships with this "
                       "project)")


def check_image_size(model: str, image_size: tuple[int, int] | None) -> None:
    """Raise EncoderError when `image_size` (H, W) is smaller than one of `model`'s patches
    (its grid would be empty); None, the model's own size, always fits."""
    if image_size is None:
        return
    vision = (open_clip.get_model_config(model) or {}).get("vision_cfg", {})
    patch = vision.get("patch_size")
    if patch is None:  # not a ViT (or an hf-hub model): the encoder checks once built
        return
    patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
    if image_size[0] < patch[0] or image_size[1] < patch[1]:
        raise smaller_than_a_patch(image_size, patch, model)


def smaller_than_a_patch(image_size: tuple[int, int], patch: tuple[int, int],
                         model: str) -> EncoderError:
    """The error for an input (H, W) smaller than one (h, w)-pixel patch of `model`."""
    return EncoderError(f"{image_size[0]}x{image_size[1]} is smaller than one "
                        f"{patch[0]}x{patch[1]}-pixel patch of {model}: give at least "
                        f"{patch[0]}x{patch[1]} (or leave --image-size out: the model's own size)")


WEIGHTS_HOST_TIMEOUT = 5.0
"""Seconds to wait for the weights' host to answer before calling the machine offline."""


def check_weights(model: str, pretrained: str) -> None:
    """Raise EncoderError, in seconds and without loading anything, unless `pretrained` can
    give `model` its weights: `none`, an existing checkpoint file, or an open_clip tag of that
    model whose weights are in the local cache or whose host answers (no 60 s of download
    retries on a machine without network). `model` must be known (check_model_name)."""
    config = EncoderConfig(model=model, pretrained=pretrained, device="cpu")
    if config.random_weights or config.pretrained_path is not None or model.startswith("hf-hub:"):
        return
    tags = open_clip.list_pretrained_tags_by_model(model)
    if not open_clip.pretrained.is_pretrained_cfg(model, pretrained):
        known = (f"its tags: {', '.join(tags)}" if tags
                 else "open_clip has no published weights for it")
        raise EncoderError(f"{model} has no open_clip weights tagged {pretrained!r} ({known}); "
                           "or give a checkpoint file, or none for random weights")
    if _weights_cached(open_clip.get_pretrained_cfg(model, pretrained)):
        return
    source = _weights_host(open_clip.get_pretrained_cfg(model, pretrained))
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if offline or not _answers(source):
        why = "HF_HUB_OFFLINE is set" if offline else f"{source[0]} does not answer (no network?)"
        raise EncoderError(
            f"the {model} weights {pretrained!r} are not in the local cache and {why}: without "
            "network, download them on a machine with network into the same cache (HF_HOME), "
            "give a local checkpoint file (open_clip_pytorch_model.bin), or none for random weights")


def _weights_cached(cfg: dict) -> bool:
    """Whether open_clip would load these weights without the network (HF cache or ~/.cache/clip)."""
    hub = cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(hub)
        filename = filename or open_clip.pretrained.HF_WEIGHTS_NAME
        names = [*open_clip.pretrained._get_safe_alternatives(filename), filename]
        return any(isinstance(try_to_load_from_cache(repo, name), str) for name in names)
    url = cfg.get("url", "")
    return bool(url) and (Path("~/.cache/clip").expanduser() / os.path.basename(url)).is_file()


def _weights_host(cfg: dict) -> tuple[str, int]:
    """(host, port) open_clip downloads these weights from: the Hugging Face endpoint, else the URL's."""
    from urllib.parse import urlsplit

    if cfg.get("hf_hub"):
        from huggingface_hub import constants

        url = urlsplit(constants.ENDPOINT)
    else:
        url = urlsplit(cfg.get("url", ""))
    return url.hostname or "", url.port or (80 if url.scheme == "http" else 443)


def _answers(address: tuple[str, int], timeout: float = WEIGHTS_HOST_TIMEOUT) -> bool:
    """Whether a TCP connection to (host, port) opens within `timeout` seconds, name lookup
    included (a thread, since getaddrinfo has no timeout of its own)."""
    result: list[bool] = []

    def connect() -> None:
        try:
            with socket.create_connection(address, timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def build_clip(config: EncoderConfig, *, load_weights: bool = True) -> torch.nn.Module:
    """The open_clip model, in eval mode with no gradients, on CPU. Raises EncoderError.

    load_weights=False builds the architecture the weights would get (QuickGELU included) with
    random weights and without touching the network or the cache: for tests.
    """
    check_model_name(config.model)
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

    check_model_name = staticmethod(check_model_name)
    check_weights = staticmethod(check_weights)
    check_image_size = staticmethod(check_image_size)

    def __init__(self, config: EncoderConfig) -> None:
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
        if 0 in self.grid_size:  # an input smaller than a patch: no token at all
            raise smaller_than_a_patch(self.input_size, self.patch_size, config.model)
        cfg = self.visual.preprocess_cfg
        self.preprocess = Preprocess(self.input_size, tuple(cfg["mean"]), tuple(cfg["std"]),
                                     config.resize, config.decode)
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

    def describe(self) -> FeatureSetSpec:
        """The spec of the feature set this encoder writes (its id: storage.featureset)."""
        cfg = self.config
        return FeatureSetSpec(
            encoder=OPEN_CLIP,
            model=cfg.model,
            quick_gelu=(uses_quick_gelu(cfg.model, cfg.pretrained)
                        or cfg.model.endswith("-quickgelu")),
            image_size=self.input_size,
            patch_size=self.patch_size,
            grid_size=self.grid_size,
            resize=cfg.resize,
            decode=cfg.decode,
            interpolation="bicubic",
            mean=tuple(self.preprocess.mean),
            std=tuple(self.preprocess.std),
            spatial_kind=cfg.spatial_kind,
            spatial_dim=self.spatial_dim,
            global_dim=self.global_dim,
            # MaskCLIP's dense features go through ln_post and proj into the text tower's space
            text_aligned=cfg.spatial_kind == "maskclip",
            has_text_tower=True,
            **weights_and_compute(cfg, self.device, self.pretrained_sha256),
            library_versions=((OPEN_CLIP, open_clip.__version__),),
        )
