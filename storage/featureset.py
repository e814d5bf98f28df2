"""The feature-set spec: everything stage 2 knows of stage 1, typed and frozen.

Stage 1 describes the features it writes with a `FeatureSetSpec` (which encoder, which weights,
how a frame became the model input, what the arrays hold); the store keeps it as the attributes
of `featuresets/<id>/` (`to_attrs` / `from_attrs`), and every reader of a store (training,
queries, text embeddings, `storage.inspect`) works from the spec. Its id is a short hash of
everything that changes the cached numbers, so two runs that ask for the same features share
them and a different request never reads the wrong arrays.

Stores written before the spec had its encoder family, text alignment and library versions
open as they are: those fields are derived from what such stores recorded (open_clip, text-aligned
when the spatial kind is `maskclip` with the embedding's width), and their ids do not change.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from storage.errors import StoreError

OPEN_CLIP = "open_clip"
"""The encoder family of CLIP models built by open_clip (and of every store older than the
spec's `encoder` field)."""

IDENTITY_KEYS = (
    "model",
    "pretrained",
    "pretrained_sha256",
    "seed",
    "image_size",
    "resize",
    "decode",
    "mean",
    "std",
    "spatial_kind",
    "dtype",
    "open_clip_version",
)
"""Attributes that enter every feature set's id. Other attributes (grid size, widths, notes)
follow from these and are recorded beside them for readers."""

FAMILY_IDENTITY_KEYS = ("encoder", "library_versions")
"""Attributes that also enter the id of a feature set of another family than open_clip (ids of
open_clip feature sets predate them and stay as they were)."""

IDENTITY_DEFAULTS = {"decode": "full"}
"""Values that count as a missing attribute: what a feature set written before the attribute
existed meant (every frame was decoded whole), so those feature sets keep their ids and a run
with that value resumes them."""



def featureset_id(attrs: Mapping[str, Any]) -> str:
    """12 hex characters of the sha256 of the identity attributes, as canonical JSON.

    Two sets of attributes with the same identity give the same id whatever their key order; a
    missing key counts as null, and so does a key at its IDENTITY_DEFAULTS value.
    """
    canonical = json.dumps(identity(attrs), sort_keys=True, separators=(",", ":"), default=list)
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def identity(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The identity attributes' values, None for a missing one or one at its IDENTITY_DEFAULTS
    value: two descriptions of the same feature set give equal dicts."""
    keys = IDENTITY_KEYS + (FAMILY_IDENTITY_KEYS if attrs.get("encoder", OPEN_CLIP) != OPEN_CLIP
                            else ())
    values = {key: attrs.get(key) for key in keys}
    return {key: None if key in IDENTITY_DEFAULTS and value == IDENTITY_DEFAULTS[key] else value
            for key, value in values.items()}


def _pair(value: Any) -> tuple[int, int]:
    return (int(value[0]), int(value[1]))


@dataclass(frozen=True)
class FeatureSetSpec:
    """One feature set: the encoder that made it, its input policy and what its arrays hold.

    encoder: the encoder family (a key of `pipeline.encoders.ENCODERS`: "open_clip", "timm").
    model: the model's name in its family ("ViT-B-16", "vit_small_patch14_dinov2").
    pretrained: the weights: a tag ("openai"), "file:<name>" for a checkpoint file, or "none"
        for seeded random weights. pretrained_sha256: SHA-256 of a checkpoint file, else None.
    seed: the seed of random weights, else None. random_weights: the features carry no meaning.
    image_size: (H, W) model input, pixels. patch_size: (ph, pw) pixels per grid cell.
    grid_size: (gh, gw) spatial grid, image_size / patch_size exactly.
    resize: "squash" (whole frame to the input size) or "crop" (shortest side, centre crop).
    decode: "scaled" (JPEGs decoded at the smallest DCT scale at least the input, then resized)
        or "full" (decoded whole; what every feature set written before the attribute used).
    interpolation: of the resize. mean, std: per-channel normalisation of [0, 1] RGB.
    spatial_kind: which spatial features: "tokens" (last block's tokens) or "maskclip" (CLIP's
        dense features in its image-text space).
    spatial_dim: C of `spatial` (F, gh, gw, C). global_dim: D of `global` (F, D).
    text_aligned: the spatial features live in the text tower's embedding space, so a point's
        feature can be compared with a prompt's embedding (maskclip).
    has_text_tower: the encoder has a text tower whose embeddings share the space of `global`
        (CLIP), so prompts can be encoded for this feature set (pipeline.text_embeddings).
    dtype: of the stored features. library_versions: {library: version} that computed them.
    quick_gelu: CLIP built with QuickGELU. compute: precision of the forward pass.
    notes: attributes that are no part of the spec (e.g. "planted", "storage"); kept as read.
    """

    model: str
    pretrained: str
    image_size: tuple[int, int]
    patch_size: tuple[int, int]
    grid_size: tuple[int, int]
    resize: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    spatial_kind: str
    spatial_dim: int
    global_dim: int
    encoder: str = OPEN_CLIP
    pretrained_sha256: str | None = None
    seed: int | None = None
    random_weights: bool = False
    interpolation: str = "bicubic"
    decode: str = IDENTITY_DEFAULTS["decode"]
    text_aligned: bool = False
    has_text_tower: bool = True
    dtype: str = "float16"
    library_versions: tuple[tuple[str, str], ...] = ()
    quick_gelu: bool = False
    compute: str = ""
    notes: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @property
    def id(self) -> str:
        """The feature set's id in a store: `featureset_id` of its attributes."""
        return featureset_id(self.to_attrs())

    @property
    def versions(self) -> dict[str, str]:
        return dict(self.library_versions)

    def describe(self, fid: str | None = None) -> str:
        """One line a person can pick a feature set by: id (`fid`, the id the store files it
        under, or this spec's), family, model, weights, kind, width, input."""
        family = "" if self.encoder == OPEN_CLIP else f" ({self.encoder})"
        return (f"{fid or self.id}: {self.model}{family} / {self.pretrained}, {self.spatial_kind} "
                f"{self.spatial_dim}-d{', text-aligned' if self.text_aligned else ''}, input "
                f"{self.image_size[0]}x{self.image_size[1]}")

    def to_attrs(self) -> dict[str, Any]:
        """The store attributes of `featuresets/<id>/`: JSON types only (tuples as lists)."""
        attrs: dict[str, Any] = {
            "encoder": self.encoder,
            "model": self.model,
            "pretrained": self.pretrained,
            "pretrained_sha256": self.pretrained_sha256,
            "seed": self.seed,
            "random_weights": self.random_weights,
            "quick_gelu": self.quick_gelu,
            "image_size": list(self.image_size),
            "patch_size": list(self.patch_size),
            "grid_size": list(self.grid_size),
            "resize": self.resize,
            "decode": self.decode,
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
            "spatial_kind": self.spatial_kind,
            "spatial_dim": self.spatial_dim,
            "global_dim": self.global_dim,
            "text_aligned": self.text_aligned,
            "has_text_tower": self.has_text_tower,
            "dtype": self.dtype,
            "compute": self.compute,
            "library_versions": dict(self.library_versions),
            # the key ids have always hashed: null for the families open_clip does not build
            "open_clip_version": self.versions.get(OPEN_CLIP),
        }
        return {**dict(self.notes), **attrs}

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> FeatureSetSpec:
        """The spec of a store's `featuresets/<id>/` attributes, written by this version or an
        older one (which had no encoder, text_aligned, has_text_tower or library_versions)."""
        required = ("model", "pretrained", "image_size", "grid_size", "resize", "mean", "std",
                    "spatial_kind", "spatial_dim", "global_dim")
        missing = [key for key in required if attrs.get(key) is None]
        if missing:
            raise StoreError(f"feature-set attributes lack {', '.join(missing)}: not written by "
                             "extract-clip; extract the feature set again")
        names = {f.name for f in dataclasses.fields(cls)}
        known = names | {"open_clip_version"}
        encoder = attrs.get("encoder", OPEN_CLIP)
        versions = dict(attrs.get("library_versions") or {})
        if attrs.get("open_clip_version") and OPEN_CLIP not in versions:
            versions[OPEN_CLIP] = attrs["open_clip_version"]
        spatial_dim, global_dim = int(attrs["spatial_dim"]), int(attrs["global_dim"])
        image_size = _pair(attrs["image_size"])
        grid_size = _pair(attrs["grid_size"])
        patch_size = attrs.get("patch_size") or (image_size[0] // grid_size[0],
                                                 image_size[1] // grid_size[1])
        return cls(
            encoder=encoder,
            model=str(attrs["model"]),
            pretrained=str(attrs["pretrained"]),
            pretrained_sha256=attrs.get("pretrained_sha256"),
            seed=attrs.get("seed"),
            random_weights=bool(attrs.get("random_weights", False)),
            quick_gelu=bool(attrs.get("quick_gelu", False)),
            image_size=image_size,
            patch_size=_pair(patch_size),
            grid_size=grid_size,
            resize=str(attrs["resize"]),
            interpolation=str(attrs.get("interpolation", "bicubic")),
            decode=str(attrs.get("decode") or IDENTITY_DEFAULTS["decode"]),
            mean=tuple(float(v) for v in attrs["mean"]),
            std=tuple(float(v) for v in attrs["std"]),
            spatial_kind=str(attrs["spatial_kind"]),
            spatial_dim=spatial_dim,
            global_dim=global_dim,
            text_aligned=bool(attrs.get(
                "text_aligned", attrs["spatial_kind"] == "maskclip" and spatial_dim == global_dim)),
            has_text_tower=bool(attrs.get("has_text_tower", encoder == OPEN_CLIP)),
            dtype=str(attrs.get("dtype", "float16")),
            library_versions=tuple(sorted(versions.items())),
            compute=str(attrs.get("compute", "")),
            notes={key: value for key, value in attrs.items() if key not in known},
        )

    def with_notes(self, **notes: Any) -> FeatureSetSpec:
        """The same spec with more notes (attributes outside the identity)."""
        return dataclasses.replace(self, notes={**dict(self.notes), **notes})
