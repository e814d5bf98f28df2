"""Cached text embeddings of a feature set: prompts encoded once by the feature set's own CLIP.

Layout, beside the feature set's spec::

    featuresets/<featureset_id>/text/<key>   (D,) float32, unit norm, NaN until written
                                             attrs: prompt, templates

key: 16 hex characters of the sha256 of the prompt and its templates, so the same prompt with
other templates is another entry. The feature set pins the model (its id hashes architecture,
weights and open_clip version), so an entry never goes stale and is never rewritten.
`pipeline.text_embeddings` computes and writes them (it runs CLIP's text tower); stage 2 reads
them here without importing open_clip.

Writes go through the store's zarr group only (no local paths), so a store opened by fsspec URL
works. An entry is one chunk: its metadata (with the prompt) is written first and its data
after, and a reader takes an entry whose data is not finite yet as missing; two writers of the
same entry write the same numbers.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from storage.conventions import DIMENSIONS, array_attributes
from storage.errors import StoreError
from storage.store import FeatureStore


ENCODING = "mean-of-unit-sentence-embeddings/1"
"""How pipeline.text_embeddings turns a prompt and templates into one embedding; part of every
key, so that a change of recipe (a new version here) never reads an entry of the old one."""


def text_key(prompt: str, templates: Sequence[str]) -> str:
    """16 hex characters identifying a prompt encoded with `templates` (order counts) by the
    current ENCODING."""
    canonical = json.dumps({"prompt": prompt, "templates": list(templates), "encoding": ENCODING},
                           sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def missing_prompts(store: FeatureStore, featureset: str, prompts: Sequence[str],
                    templates: Sequence[str]) -> list[str]:
    """The prompts (in the given order, without repeats) that have no cached embedding."""
    return [prompt for prompt, row in _read(store, featureset, prompts, templates).items()
            if row is None]


def read_text_embeddings(store: FeatureStore, featureset: str, prompts: Sequence[str],
                         templates: Sequence[str]) -> np.ndarray:
    """(K, D) float32 unit-norm embeddings of `prompts`, row k for prompts[k] (one read each).

    Raises StoreError naming the missing prompts; a caller that can say which command computes
    them calls `missing_prompts` after catching it.
    """
    rows = _read(store, featureset, prompts, templates)
    missing = [prompt for prompt, row in rows.items() if row is None]
    if missing:
        raise StoreError(f"{store.url} has no text embeddings of {', '.join(map(repr, missing))} "
                         f"for feature set {featureset}: compute them with "
                         "`python -m pipeline.text_embeddings`")
    return np.stack([rows[prompt] for prompt in prompts])


def _read(store: FeatureStore, featureset: str, prompts: Sequence[str],
          templates: Sequence[str]) -> dict[str, np.ndarray | None]:
    """Prompt (without repeats) -> its cached embedding, or None when it is not (completely)
    written."""
    store.featureset_spec(featureset)  # a StoreError listing the store's feature sets
    rows: dict[str, np.ndarray | None] = {}
    for prompt in dict.fromkeys(prompts):
        try:  # through the store's node(): also entries written after its metadata snapshot
            row = store.node(f"featuresets/{featureset}/text/{text_key(prompt, templates)}")[:]
        except KeyError:
            row = None
        rows[prompt] = row if row is not None and np.isfinite(row).all() else None
    return rows


def write_text_embeddings(store: FeatureStore, featureset: str, prompts: Sequence[str],
                          templates: Sequence[str], embeddings: np.ndarray) -> None:
    """Cache `embeddings` (K, D), row k the embedding of prompts[k] with `templates`, and
    re-consolidate the store's metadata so that the snapshot lists them."""
    store._require_writable()
    store.featureset_spec(featureset)
    embeddings = np.asarray(embeddings, np.float32)
    if embeddings.shape[0] != len(prompts) or not np.isfinite(embeddings).all():
        raise ValueError(f"need {len(prompts)} finite embeddings, got shape {embeddings.shape}")
    group = store.root["featuresets"][featureset].require_group("text")
    for prompt, embedding in zip(prompts, embeddings):
        key = text_key(prompt, templates)
        try:
            array = group.create_array(
                key, shape=embedding.shape, chunks=embedding.shape, dtype="float32",
                fill_value=np.nan, compressors=(ZstdCodec(level=3, checksum=True),),
                dimension_names=DIMENSIONS["text"],
                attributes={**array_attributes("text"), "prompt": prompt,
                            "templates": list(templates)})
        except zarr.errors.ContainsArrayError:  # cached already, or another writer is at it
            array = group[key]
        array[:] = embedding
    store.consolidate()  # plain xarray / zarr readers, which trust the snapshot, see them too
