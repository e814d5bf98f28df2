"""pipeline.extraction without Prefect: what a run skips, and how it shares a store."""

from __future__ import annotations

import numpy as np

from pipeline.encoders.base import EncoderConfig
from pipeline.encoders.clip import FrozenClipEncoder
from pipeline.extraction import _batches_in_random_order, extract_scene
from pipeline.readers.synthetic import SyntheticScene
from storage import open_store


class AnotherRunMeanwhile:
    """The tiny encoder, plus another run that finishes every other frame during the first batch."""

    def __init__(self, encoder, store, scene_id, featureset):
        self.encoder, self.store, self.scene_id, self.featureset = encoder, store, scene_id, featureset
        self.preprocess, self.device, self.describe = encoder.preprocess, encoder.device, encoder.describe
        self.calls = 0

    def encode(self, x):
        self.calls += 1
        if self.calls == 1:
            done = self.store.done(self.scene_id, self.featureset)
            others = [int(p) for p in np.flatnonzero(~done)]
            spatial, global_ = (a.float().numpy() for a in self.encoder.encode(x[:1]))
            for position in others:
                self.store.write_features(self.scene_id, self.featureset, [position],
                                          spatial=spatial, global_=global_)
        return self.encoder.encode(x)


def test_frames_another_run_did_meanwhile_are_skipped(synthetic_root, tmp_path):
    store = open_store(tmp_path / "store.zarr", mode="a")
    tiny = FrozenClipEncoder(EncoderConfig(model="test-ViT-tiny", pretrained="none"))
    featureset = store.register_featureset(tiny.describe())
    scene = SyntheticScene.open(synthetic_root / "scene0000_00")
    encoder = AnotherRunMeanwhile(tiny, store, scene.scene_id, featureset)
    report = extract_scene(scene, store, encoder, featureset, batch_size=2)
    assert encoder.calls == 1 and report.encoded == 2
    assert report.skipped_concurrent == report.frames - 2
    assert store.done(scene.scene_id, featureset).all()


def test_random_order_keeps_the_batches():
    pending = np.arange(10)
    firsts = set()
    for _ in range(30):
        batches = _batches_in_random_order(pending, 4)
        firsts.add(batches[0][0])
        assert sorted(map(tuple, batches)) == [(0, 1, 2, 3), (4, 5, 6, 7), (8, 9)]
    assert firsts == {0, 4, 8}  # 30 draws of 3 first batches: each seen (fails with p < 1e-5)


def test_progress_is_reported_after_every_batch(synthetic_root, tmp_path):
    scene = SyntheticScene.open(synthetic_root / "scene0000_00")
    store = open_store(tmp_path / "store.zarr", mode="a")
    encoder = FrozenClipEncoder(EncoderConfig(model="test-ViT-tiny", pretrained="none",
                                              device="cpu"))
    featureset = store.register_featureset(encoder.describe())
    calls = []
    extract_scene(scene, store, encoder, featureset, batch_size=3,
                  on_progress=lambda done, total: calls.append((done, total)))
    frames = len(scene.frame_ids)
    assert calls[0] == (0, frames)  # before the first batch: a bar has its total from the start
    done = [done for done, _ in calls]  # then 8 frames in batches of 3, 3 and 2, any order
    assert len(calls) == 4 and done[-1] == frames
    assert sorted(b - a for a, b in zip(done, done[1:])) == [2, 3, 3]
    assert all(total == frames for _, total in calls)
