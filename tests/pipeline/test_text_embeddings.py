"""pipeline.text_embeddings: the feature set's own text tower, prompt ensembles, caching, CLI."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import xarray as xr

import pipeline.text_embeddings as text_module
from pipeline.encoders.base import EncoderConfig, EncoderError
from pipeline.encoders.clip import FrozenClipEncoder, build_clip
from pipeline.prompts import DEFAULT_TEMPLATES, SCANNET20_PROMPTS, resolve_templates, templates_flag
from pipeline.text_embeddings import (build_text_encoder, encode_prompts, encoder_config,
                                      ensure_text_embeddings, main)
from storage import UserError, open_store
from storage.text import missing_prompts, read_text_embeddings
from tests.conftest import write_store


def tiny(**options) -> EncoderConfig:
    """The shipped tiny test CLIP with seeded random weights (nothing is downloaded)."""
    return EncoderConfig(**{"model": "test-ViT-tiny", "pretrained": "none", **options})


REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def maskclip_store(synthetic_root, tmp_path_factory) -> Path:
    """The two synthetic scenes with a maskclip feature set of the tiny ViT (random weights)."""
    path = tmp_path_factory.mktemp("maskclip") / "store.zarr"
    write_store(synthetic_root, path, spatial_kind="maskclip")
    return path


@pytest.fixture
def store_copy(maskclip_store, tmp_path) -> Path:
    shutil.copytree(maskclip_store, tmp_path / "store.zarr")
    return tmp_path / "store.zarr"


def test_templates_resolve_by_name_or_as_strings():
    assert resolve_templates(None) == DEFAULT_TEMPLATES and templates_flag(DEFAULT_TEMPLATES) == []
    assert resolve_templates(["plain"]) == ("{}",)
    assert templates_flag(("{}",)) == ["--templates", "plain"]
    assert resolve_templates(["a {}.", "the {}"]) == ("a {}.", "the {}")
    assert templates_flag(("a {}.",)) == ["--templates", "a {}."]
    with pytest.raises(UserError, match="exactly once"):
        resolve_templates(["a photo"])
    assert len(SCANNET20_PROMPTS) == 20 and SCANNET20_PROMPTS[19] == "other furniture"


def test_prompt_ensemble_is_the_mean_of_normalised_sentence_embeddings():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_clip(tiny())
    tokenizer = open_clip.get_tokenizer("test-ViT-tiny")
    templates = ("a photo of a {}.", "a {} in a scene.", "{}")
    embeddings = encode_prompts(model, tokenizer, ["chair", "table"], templates,
                                torch.device("cpu"), batch_size=4)  # 6 sentences, 2 batches
    assert embeddings.shape == (2, 64) and embeddings.dtype == np.float32
    with torch.no_grad():
        sentences = model.encode_text(tokenizer([t.format("table") for t in templates]))
    expected = torch.nn.functional.normalize(sentences, dim=-1).mean(0)
    np.testing.assert_allclose(embeddings[1], (expected / expected.norm()).numpy(), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-6)
    assert not np.allclose(embeddings[0], embeddings[1], atol=1e-3)


def test_embeddings_come_from_the_feature_sets_own_model_and_are_cached(store_copy, monkeypatch):
    store = open_store(store_copy, mode="a")
    (featureset, spec), = store.featuresets().items()
    assert ensure_text_embeddings(store, featureset, ["chair", "table"], DEFAULT_TEMPLATES,
                                  device="cpu") == 2
    stored = read_text_embeddings(store, featureset, ["chair", "table"], DEFAULT_TEMPLATES)
    # the very model stage 1 used (same seed: same random text tower), built independently
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_clip(tiny(spatial_kind="maskclip"))
        other_seed = build_clip(tiny(spatial_kind="maskclip", seed=1))
    tokenizer = open_clip.get_tokenizer("test-ViT-tiny")
    cpu = torch.device("cpu")
    np.testing.assert_allclose(
        stored, encode_prompts(model, tokenizer, ["chair", "table"], DEFAULT_TEMPLATES, cpu),
        atol=1e-6)
    assert not np.allclose(
        stored, encode_prompts(other_seed, tokenizer, ["chair", "table"], DEFAULT_TEMPLATES, cpu),
        atol=1e-3)
    assert stored.shape[1] == spec.global_dim
    # plain xarray, which opens the consolidated snapshot, sees the cached prompts too
    text = xr.open_zarr(store_copy, group=f"featuresets/{featureset}/text")
    assert sorted(text[name].attrs["prompt"] for name in text.data_vars) == ["chair", "table"]

    def no_model(*args, **kwargs):
        raise AssertionError("a cached prompt was encoded again")

    monkeypatch.setattr(text_module, "build_text_encoder", no_model)
    assert ensure_text_embeddings(store, featureset, ["table", "chair"], DEFAULT_TEMPLATES) == 0


def test_a_model_that_differs_from_the_feature_set_is_refused(maskclip_store):
    (featureset, spec), = open_store(maskclip_store).featuresets().items()
    older = dataclasses.replace(spec, library_versions=(("open_clip", "0.1"),))
    with pytest.raises(EncoderError, match="open_clip_version: stored '0.1'"):
        build_text_encoder(featureset, older, device="cpu")
    with pytest.raises(EncoderError, match="drop --pretrained"):
        encoder_config(spec, pretrained="weights.bin")


def test_a_checkpoint_file_feature_set_needs_that_very_file(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_clip(tiny())
    weights, other = tmp_path / "tiny.pt", tmp_path / "other.pt"
    torch.save(model.state_dict(), weights)
    torch.save({**model.state_dict(), "logit_scale": torch.tensor(1.0)}, other)
    spec = FrozenClipEncoder(tiny(pretrained=str(weights), device="cpu")).describe()
    assert spec.pretrained == "file:tiny.pt"
    with pytest.raises(EncoderError, match="file tiny.pt: pass its path with --pretrained"):
        encoder_config(spec)
    with pytest.raises(EncoderError, match="SHA-256 differs"):
        encoder_config(spec, pretrained=str(other))
    assert encoder_config(spec, pretrained=str(weights)).pretrained == str(weights)


def test_cli_encodes_then_reports_cached_and_errors_in_one_line(store_copy, capsys):
    assert main(["--store", str(store_copy), "--prompts", "chair", "--scannet20",
                 "--device", "cpu"]) == 0
    assert "20 prompts x 7 templates" in capsys.readouterr().out  # chair is a class name
    assert main(["--store", str(store_copy), "--scannet20", "--templates", "plain"]) == 0
    assert "20 encoded" in capsys.readouterr().out
    assert main(["--store", str(store_copy), "--scannet20"]) == 0
    assert "0 encoded, 20 cached already" in capsys.readouterr().out
    store = open_store(store_copy)
    (featureset,), = [store.featuresets()]
    assert missing_prompts(store, featureset, SCANNET20_PROMPTS, ("{}",)) == []
    assert main(["--store", str(store_copy), "--featureset", "nope", "--prompts", "x"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {store_copy} has no feature set nope (it has: {featureset}: ")
    assert err.count("\n") == 1
    assert main(["--store", str(store_copy.parent / "none.zarr"), "--prompts", "x"]) == 1
    assert "no feature store at" in capsys.readouterr().err
    assert not (store_copy.parent / "none.zarr").exists()  # a typo creates no empty store


def test_help_explains_every_flag():
    result = subprocess.run([sys.executable, "-m", "pipeline.text_embeddings", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("usage: python -m pipeline.text_embeddings")
    for flag in ("--store", "--featureset", "--prompts", "--scannet20", "--templates",
                 "--pretrained", "--device", "--storage-options"):
        assert flag in result.stdout
