"""Text embeddings of prompts, computed by a feature set's own CLIP and cached in its store.

    python -m pipeline.text_embeddings --store storage/scannet.zarr --prompts chair table
    python -m pipeline.text_embeddings --store storage/scannet.zarr --scannet20

CLIP's text tower belongs with the image encoder: this module rebuilds exactly the model that
extracted the feature set (it checks that the rebuilt encoder gives the same feature-set id),
encodes every prompt with a template ensemble (pipeline.prompts) and writes the unit-norm
embeddings into the store (storage.text). Stage 2 (`model.query`) reads them from there and so
never runs CLIP. Prompts already cached are not encoded again.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from pipeline.encoders.base import EncoderConfig, EncoderError, file_sha256
from pipeline.encoders.clip import FrozenClipEncoder
from pipeline.prompts import SCANNET20_PROMPTS, add_templates_argument, resolve_templates
from cli.arguments import add_storage_options_argument
from cli.run import run_command
from storage.errors import StoreError
from storage.featureset import IDENTITY_KEYS, FeatureSetSpec
from storage.selection import choose_featureset
from storage.options import parse_storage_options
from storage.store import FeatureStore, open_store
from storage.text import missing_prompts, write_text_embeddings

log = logging.getLogger(__name__)


def encoder_config(spec: FeatureSetSpec, pretrained: str | None = None,
                   device: str = "auto") -> EncoderConfig:
    """The EncoderConfig that rebuilds the model of a feature set from its spec.

    pretrained: the checkpoint file, needed when the feature set was extracted from one (the
    store keeps its name and SHA-256, not its path); it must have the recorded SHA-256.
    """
    stored = spec.pretrained
    if stored.startswith("file:"):
        if pretrained is None:
            raise EncoderError(f"the feature set was extracted from the checkpoint file "
                               f"{stored.removeprefix('file:')}: pass its path with --pretrained")
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise EncoderError(f"checkpoint {pretrained} does not exist")
        if file_sha256(path) != spec.pretrained_sha256:
            raise EncoderError(f"{pretrained} is not the checkpoint the feature set was extracted "
                               f"from (its SHA-256 differs from the recorded one)")
        stored = str(path)
    elif pretrained is not None:
        raise EncoderError(f"the feature set uses {spec.encoder} weights {stored!r}, not a "
                           "checkpoint file: drop --pretrained")
    return EncoderConfig(encoder=spec.encoder, model=spec.model, pretrained=stored,
                         image_size=spec.image_size, resize=spec.resize, decode=spec.decode,
                         spatial_kind=spec.spatial_kind, device=device, seed=spec.seed or 0)


def build_text_encoder(featureset: str, spec: FeatureSetSpec, pretrained: str | None = None,
                       device: str = "auto") -> FrozenClipEncoder:
    """The feature set's CLIP, checked to be the same model: the rebuilt spec must have the
    stored identity, else EncoderError naming what differs. A feature set without a text tower
    (DINOv2) is refused with one line."""
    if not spec.has_text_tower:
        raise EncoderError(
            f"feature set {featureset} ({spec.model}, {spec.encoder}) is not text-aligned: its "
            "encoder has no text tower, so no prompt can be encoded for it; use a CLIP feature "
            "set (--encoder open_clip) for text")
    encoder = FrozenClipEncoder(encoder_config(spec, pretrained, device))
    rebuilt, stored = encoder.describe().to_attrs(), spec.to_attrs()
    differs = [key for key in IDENTITY_KEYS
               if key != "pretrained" and rebuilt.get(key) != stored.get(key)]
    if differs:
        detail = "; ".join(f"{key}: stored {stored.get(key)!r}, here {rebuilt.get(key)!r}"
                           for key in differs)
        raise EncoderError(f"cannot rebuild the model of feature set {featureset} ({detail}): "
                           "compute its text embeddings where it was extracted")
    return encoder


@torch.inference_mode()
def encode_prompts(model: torch.nn.Module, tokenizer: Callable, prompts: Sequence[str],
                   templates: Sequence[str], device: torch.device,
                   batch_size: int = 256) -> np.ndarray:
    """(K, D) float32 unit-norm embeddings: for each prompt, the normalised mean over templates
    of the normalised `model.encode_text` of the templated sentence (CLIP's prompt ensemble)."""
    sentences = [template.format(prompt) for prompt in prompts for template in templates]
    chunks = []
    for start in range(0, len(sentences), batch_size):
        tokens = tokenizer(sentences[start:start + batch_size]).to(device)
        chunks.append(F.normalize(model.encode_text(tokens).float(), dim=-1))
    per_sentence = torch.cat(chunks).reshape(len(prompts), len(templates), -1)
    return F.normalize(per_sentence.mean(dim=1), dim=-1).cpu().numpy()


def ensure_text_embeddings(store: FeatureStore, featureset: str, prompts: Sequence[str],
                           templates: Sequence[str], *, pretrained: str | None = None,
                           device: str = "auto") -> int:
    """Compute and cache the embeddings of the prompts the store lacks; returns how many were
    computed (0: all cached, and no model is built)."""
    spec = store.featuresets().get(featureset)
    if spec is None:
        raise StoreError(f"{store.url} has no feature set {featureset}")
    missing = missing_prompts(store, featureset, prompts, templates)
    if not missing:
        return 0
    log.info("encoding %d prompts x %d templates with %s (%s) of feature set %s", len(missing),
             len(templates), spec.model, spec.pretrained, featureset)
    encoder = build_text_encoder(featureset, spec, pretrained, device)
    embeddings = encode_prompts(encoder.model, open_clip.get_tokenizer(spec.model),
                                missing, templates, encoder.device)
    if embeddings.shape[1] != spec.global_dim:
        raise EncoderError(f"{spec.model} embeds text in {embeddings.shape[1]} dims but "
                           f"images in {spec.global_dim}: not a CLIP model")
    write_text_embeddings(store, featureset, missing, templates, embeddings)
    return len(missing)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.text_embeddings",
        description="Encode text prompts with the CLIP model of a feature set (its text tower, "
        "prompt-template ensemble) and cache the embeddings in the store, where "
        "`python -m model.query` reads them. Cached prompts are not encoded again.")
    parser.add_argument("--store", required=True,
                        help="the feature store (path or fsspec URL); it is written to")
    parser.add_argument("--featureset", default=None,
                        help="feature set id (default: the store's only one)")
    parser.add_argument("--prompts", nargs="+", default=[], metavar="PROMPT",
                        help="prompts to encode, e.g. chair \"coffee table\"")
    parser.add_argument("--scannet20", action="store_true",
                        help="also encode the 20 ScanNet class prompts (what `model.query "
                        "--eval` uses)")
    add_templates_argument(parser)
    parser.add_argument("--pretrained", default=None,
                        help="the checkpoint file, for a feature set extracted from one (the "
                        "store records its SHA-256, which must match)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    add_storage_options_argument(parser)
    args = parser.parse_args(argv)
    prompts = list(dict.fromkeys([*args.prompts, *(SCANNET20_PROMPTS if args.scannet20 else ())]))
    if not prompts:
        parser.error("give --prompts or --scannet20")

    def encode_command() -> None:
        templates = resolve_templates(args.templates)
        options = parse_storage_options(args.storage_options)
        store = open_store(args.store, storage_options=options)  # read only: a typo makes nothing
        featureset, _ = choose_featureset([store], args.featureset, "encode prompts for",
                                         usable=lambda spec: spec.has_text_tower)
        if missing_prompts(store, featureset, prompts, templates):
            store = open_store(args.store, mode="a", storage_options=options)
        computed = ensure_text_embeddings(store, featureset, prompts, templates,
                                          pretrained=args.pretrained, device=args.device)
        print(f"{len(prompts)} prompts x {len(templates)} templates, feature set {featureset} "
              f"in {store.url}: {computed} encoded, {len(prompts) - computed} cached already")

    return run_command(encode_command)


if __name__ == "__main__":
    sys.exit(main())
