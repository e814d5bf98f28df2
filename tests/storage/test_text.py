"""Text embeddings cached in the store: keys, round trip, missing entries, stores opened by URL."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from storage import StoreError, open_store
from storage.featureset import FeatureSetSpec
from storage.text import missing_prompts, read_text_embeddings, text_key, write_text_embeddings

SPEC = FeatureSetSpec(model="test-ViT-tiny", pretrained="none", image_size=(32, 32),
                      patch_size=(16, 16), grid_size=(2, 2), resize="squash", mean=(0.5,) * 3,
                      std=(0.5,) * 3, spatial_kind="maskclip", spatial_dim=4, global_dim=4,
                      text_aligned=True)

TEMPLATES = ("a photo of a {}.", "a {} in a scene.")


@pytest.fixture
def url_store():
    """A store opened by fsspec URL (in memory): nothing may assume a local path."""
    store = open_store(f"memory://{uuid.uuid4().hex}/store.zarr", mode="a")
    featureset = store.register_featureset(SPEC)
    return store, featureset


def unit_rows(count: int, dim: int = 4, seed: int = 0) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((count, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_keys_depend_on_prompt_and_templates():
    assert text_key("chair", TEMPLATES) == text_key("chair", list(TEMPLATES))
    keys = {text_key("chair", TEMPLATES), text_key("table", TEMPLATES),
            text_key("chair", TEMPLATES[::-1]), text_key("chair", TEMPLATES[:1])}
    assert len(keys) == 4 and all(len(key) == 16 for key in keys)


def test_round_trip_in_a_store_opened_by_url(url_store):
    store, featureset = url_store
    embeddings = unit_rows(3)
    assert missing_prompts(store, featureset, ["chair", "table"], TEMPLATES) == ["chair", "table"]
    write_text_embeddings(store, featureset, ["chair", "table", "door"], TEMPLATES, embeddings)
    reopened = open_store(store.url)
    assert missing_prompts(reopened, featureset, ["door", "sofa", "chair", "sofa"],
                           TEMPLATES) == ["sofa"]
    np.testing.assert_array_equal(
        read_text_embeddings(reopened, featureset, ["door", "chair"], TEMPLATES),
        embeddings[[2, 0]])
    # the same prompt with other templates is another entry
    assert missing_prompts(reopened, featureset, ["chair"], TEMPLATES[:1]) == ["chair"]
    with pytest.raises(StoreError, match="no text embeddings of 'sofa'.*pipeline.text_embeddings"):
        read_text_embeddings(reopened, featureset, ["chair", "sofa"], TEMPLATES)
    entry = reopened.root["featuresets"][featureset]["text"][text_key("chair", TEMPLATES)]
    assert entry.attrs["prompt"] == "chair" and entry.attrs["templates"] == list(TEMPLATES)
    assert reopened.featuresets()[featureset] == SPEC  # the text entries leave the spec as it was


def test_an_entry_whose_data_is_not_written_counts_as_missing(url_store):
    store, featureset = url_store
    write_text_embeddings(store, featureset, ["chair"], TEMPLATES, unit_rows(1))
    group = store.root["featuresets"][featureset]["text"]
    group.create_array(text_key("table", TEMPLATES), shape=(4,), dtype="float32",
                       fill_value=np.nan)  # a writer killed between metadata and data
    assert missing_prompts(store, featureset, ["chair", "table"], TEMPLATES) == ["table"]
    write_text_embeddings(store, featureset, ["table"], TEMPLATES, unit_rows(1, seed=1))
    assert missing_prompts(store, featureset, ["chair", "table"], TEMPLATES) == []


def test_writes_are_refused_where_they_cannot_be_right(url_store):
    store, featureset = url_store
    with pytest.raises(StoreError, match="no feature set nope"):
        write_text_embeddings(store, "nope", ["chair"], TEMPLATES, unit_rows(1))
    with pytest.raises(StoreError, match="no feature set nope"):
        missing_prompts(store, "nope", ["chair"], TEMPLATES)
    with pytest.raises(ValueError, match="finite"):
        write_text_embeddings(store, featureset, ["chair"], TEMPLATES, np.full((1, 4), np.nan))
    with pytest.raises(StoreError, match="read-only"):
        write_text_embeddings(open_store(store.url), featureset, ["chair"], TEMPLATES, unit_rows(1))
