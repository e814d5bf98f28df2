"""A feature beyond float16's range (65504) is stored clamped to it, counted per frame in the
store and in the run's summary, never stored as inf (which would mark the frame done forever
and make stage 2 refuse the scene); an encoder output that is not finite is an invalid frame."""

from __future__ import annotations

import asyncio

import numpy as np
import torch
from prefect.client.orchestration import get_client

from model.dataset import CachedScenes
from pipeline.encoders.clip import FrozenClipEncoder
from pipeline.extraction import extract_scene
from pipeline.readers.synthetic import SyntheticScene
from storage import open_store
from storage.inspect import format_report, summarise
from storage.store import FLOAT16_MAX, to_float16
from tests.flows.test_extract_clip import run


def test_to_float16_clamps_and_counts():
    values = np.array([[1.0, 65504.0, 65519.0, 1e5], [-3e38, 2.0, -1.0, 0.0]], np.float32)
    stored, clamped = to_float16(values)
    assert np.isfinite(stored).all() and stored.dtype == np.float16
    assert stored[0].tolist() == [1.0, FLOAT16_MAX, FLOAT16_MAX, FLOAT16_MAX]
    assert stored[1, 0] == -FLOAT16_MAX and clamped.tolist() == [2, 1]


def overflowing(encode):
    """FrozenClipEncoder.encode, with one spatial value of every frame at 1e5 and one global
    value at -7e4 (as an unnormalised ViT's outlier tokens can be)."""
    def encode_overflowing(self, images):
        spatial, global_ = encode(self, images)
        spatial, global_ = spatial.clone(), global_.clone()
        spatial[:, 0, 0, 0] = 1e5
        global_[:, 0] = -7e4
        return spatial, global_
    return encode_overflowing


def test_a_run_clamps_counts_and_records_it(prefect_api, synthetic_root, tmp_path, monkeypatch):
    monkeypatch.setattr(FrozenClipEncoder, "encode", overflowing(FrozenClipEncoder.encode))
    summary = run(synthetic_root, tmp_path / "store.zarr")
    frames = sum(scene["frames"] for scene in summary["scenes"].values())
    assert summary["values_clamped"] == 2 * frames and summary["failed"] == []
    store = open_store(tmp_path / "store.zarr")
    (fid,) = store.featuresets()
    for scene_id in store.scenes():
        features = store.features(scene_id, fid)  # finite: stage 2 reads it
        assert (features.spatial[:, 0, 0, 0] == FLOAT16_MAX).all()
        assert (features.global_[:, 0] == -FLOAT16_MAX).all()
        assert store.clamped(scene_id, fid).tolist() == [2] * 8
    report = summarise(store)
    assert report["featuresets"][fid]["storage"]["clamped"] == 2 * frames
    assert f"{2 * frames} feature values were beyond float16's range" in format_report(report)

    async def artifact():
        async with get_client() as client:
            return (await client.read_latest_artifacts())

    texts = [a.data for a in asyncio.run(artifact()) if a.key == "extract-clip-summary"]
    assert any(f"{2 * frames} feature values clamped" in text for text in texts)
    again = run(synthetic_root, tmp_path / "store.zarr")  # done for good, nothing to redo
    assert again["frames_encoded"] == 0 and again["frames_repaired"] == 0
    sample = CachedScenes({"scene0000_00": store}, fid, torch.device("cpu")).load("scene0000_00")
    assert torch.isfinite(sample.feat2d).all()


def test_a_non_finite_encoder_output_is_an_invalid_frame(synthetic_root, tiny_encoder, tmp_path,
                                                         monkeypatch):
    encode = FrozenClipEncoder.encode

    def nan_in_the_sixth(self, images):
        spatial, global_ = encode(self, images)
        spatial = spatial.clone()
        spatial[5, 1, 1, 1] = float("nan")
        return spatial, global_

    monkeypatch.setattr(FrozenClipEncoder, "encode", nan_in_the_sixth)
    store = open_store(tmp_path / "store.zarr", mode="a")
    fid = store.register_featureset(tiny_encoder.describe())
    scene = SyntheticScene.open(synthetic_root / "scene0000_00")
    report = extract_scene(scene, store, tiny_encoder, fid, batch_size=8)  # one batch, in order
    assert report.invalid == {5: "the encoder's output is not finite (NaN or inf features)"}
    assert store.done("scene0000_00", fid).all()
    assert store.valid("scene0000_00").tolist() == [True] * 5 + [False] + [True] * 2
    assert store.features("scene0000_00", fid).spatial.shape[0] == 8  # no StoreError
