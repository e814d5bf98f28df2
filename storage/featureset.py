"""Feature-set identity: a short, stable id of everything that changes the cached numbers."""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from storage.store import FeatureStore

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


def describe_featureset(fid: str, description: dict[str, Any]) -> str:
    """One line a person can pick a feature set by: id, model, weights, kind, width, input."""
    image = "x".join(map(str, description.get("image_size", ())))
    return (f"{fid}: {description.get('model')} / {description.get('pretrained')}, "
            f"{description.get('spatial_kind')} {description.get('spatial_dim')}-d, input {image}")


def choose_featureset(stores: Sequence[FeatureStore], requested: str | None,
                      purpose: str = "train on") -> tuple[str, dict[str, Any]]:
    """The feature set id and description a command works on (stage 2, queries, text).

    With `requested` None: the only feature set of the stores; with several, ask which to
    `purpose` on a terminal, otherwise raise a one-line UserError that lists them.
    """
    from storage.errors import StoreError, UserError

    available: dict[str, dict[str, Any]] = {}
    for store in stores:
        available.update(store.featuresets())
    listing = "; ".join(describe_featureset(f, d) for f, d in sorted(available.items())) or "none"
    where = stores[0].url if len(stores) == 1 else f"the {len(stores)} stores"
    if requested is not None:
        if requested not in available:
            raise StoreError(f"{where} has no feature set {requested} (it has: {listing}); "
                             "pick one of these with --featureset")
        return requested, available[requested]
    if not available:
        raise StoreError(f"{where} holds no feature set: run `python -m flows.extract_clip` "
                         "over your scenes first")
    if len(available) == 1:
        return next(iter(available.items()))
    ids = sorted(available)
    if sys.stdin.isatty():
        choices = "\n".join(f"  [{i}] {describe_featureset(f, available[f])}"
                            for i, f in enumerate(ids))
        answer = input(f"several feature sets:\n{choices}\n{purpose} which? [0-{len(ids) - 1}] ")
        if answer.strip().isdigit() and int(answer) < len(ids):
            return ids[int(answer)], available[ids[int(answer)]]
    raise UserError(f"several feature sets in {where} ({listing}): pick one with --featureset")
