"""Feature-set identity: a short, stable id of everything that changes the cached numbers."""

from __future__ import annotations

import hashlib
import json
from typing import Any

IDENTITY_KEYS = (
    "model",
    "pretrained",
    "pretrained_sha256",
    "seed",
    "image_size",
    "resize",
    "mean",
    "std",
    "spatial_kind",
    "dtype",
    "open_clip_version",
)
"""Keys of a feature-set description that enter its id. Other keys (grid size, dims, notes)
follow from these and are recorded beside them for readers."""


def featureset_id(description: dict[str, Any]) -> str:
    """12 hex characters of the sha256 of the identity keys, as canonical JSON.

    Two descriptions with the same identity keys give the same id whatever their key order;
    a missing key counts as null, so adding an unset key later does not change old ids.
    """
    identity = {key: description.get(key) for key in IDENTITY_KEYS}
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=list)
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]
