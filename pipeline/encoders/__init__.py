"""The frozen image encoders of stage 1, by family: `ENCODERS[config.encoder](config)`.

An encoder implements `pipeline.encoders.base.ImageEncoder` (prepare frames, encode a batch
into a spatial grid and a global embedding, describe the feature set as a
`storage.featureset.FeatureSetSpec`). Adding a family is one module with such a class, taking an
`EncoderConfig`, and one line below; `--encoder NAME` then extracts with it, and the store keeps
its features as a feature set of their own beside the others.
"""

from __future__ import annotations

from collections.abc import Callable

from pipeline.encoders.base import EncoderConfig, EncoderError, ImageEncoder
from pipeline.encoders.clip import FrozenClipEncoder
from pipeline.encoders.dinov2 import TimmViTEncoder

ENCODERS: dict[str, Callable[[EncoderConfig], ImageEncoder]] = {
    "open_clip": FrozenClipEncoder,  # CLIP: text-aligned with --spatial-kind maskclip
    "timm": TimmViTEncoder,  # DINOv2 (vit_small_patch14_dinov2, ...): not text-aligned
}
"""Encoder family -> its class, called with the EncoderConfig."""


def build_encoder(config: EncoderConfig) -> ImageEncoder:
    """The encoder of `config.encoder`; an unknown family is a one-line EncoderError."""
    if config.encoder not in ENCODERS:
        raise EncoderError(f"no encoder family {config.encoder!r}: choose one of "
                           f"{', '.join(ENCODERS)} (--encoder)")
    return ENCODERS[config.encoder](config)
