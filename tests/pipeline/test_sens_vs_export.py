"""A scene extracted from its `.sens` and from its export gives the same store: the same frames,
poses, depth, valid flags, points and alignment, and the same features when the export holds the
recorded JPEG bytes (close ones when the export encoded them again, as SensReader does)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

import pipeline.readers.scannet_sens
from pipeline.encoders.base import EncoderConfig
from pipeline.encoders.clip import FrozenClipEncoder
from pipeline.extraction import extract_scene
from pipeline.readers.scannet import ScanNetScene
from pipeline.readers.scannet_sens import SensScene
from pipeline.readers.synthetic import SyntheticScene
from storage import open_store
from tests.sens_writer import jpeg_bytes, sens_from_export

SCENE = "scene0000_00"
BROKEN = {1: "pose", 3: "colour", 5: "depth"}
"""Frames broken alike in both copies: a -inf pose, a cut JPEG, a depth map of another size."""


@pytest.fixture(scope="module")
def scans(synthetic_root, tmp_path_factory):
    """The synthetic scene in the export layout, three frames broken, and the raw scan made
    from it: its .sens holds the export's JPEG bytes, depth pixels and poses."""
    root = tmp_path_factory.mktemp("scans")
    export = root / "export" / SCENE
    shutil.copytree(synthetic_root / SCENE, export)
    (export / "pose" / "1.txt").write_text("-inf -inf -inf -inf\n" * 4)
    jpeg = (export / "color" / "3.jpg").read_bytes()
    (export / "color" / "3.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    depth = np.asarray(Image.open(export / "depth" / "5.png"))
    Image.fromarray(depth[:-2]).save(export / "depth" / "5.png")
    raw = sens_from_export(export, root / "raw")
    return export, raw


@pytest.fixture(scope="module")
def encoder():
    return FrozenClipEncoder(EncoderConfig(model="test-ViT-tiny", pretrained="none"))


def extract(scene, path, encoder, stride=1):
    store = open_store(path, mode="a")
    featureset = store.register_featureset(encoder.describe())
    report = extract_scene(scene, store, encoder, featureset, stride=stride, batch_size=4)
    return store, featureset, report


def test_sens_and_export_give_the_same_store(scans, encoder, tmp_path):
    export, raw = scans
    sens_scene = ScanNetScene.open(raw)
    assert isinstance(sens_scene, SensScene)  # detected: no color/, a .sens
    sens, fid, sens_report = extract(sens_scene, tmp_path / "sens.zarr", encoder)
    exported, fid_export, export_report = extract(SyntheticScene.open(export),
                                                  tmp_path / "export.zarr", encoder)
    assert fid == fid_export
    a, b = sens.scene(SCENE), exported.scene(SCENE)
    np.testing.assert_array_equal(a.frame_id, b.frame_id)
    np.testing.assert_array_equal(a.valid, b.valid)
    assert sorted(sens_report.invalid) == sorted(export_report.invalid) == sorted(BROKEN)
    for frame_id, what in BROKEN.items():
        assert what in sens_report.invalid[frame_id] and f"frame {frame_id}" in \
            sens_report.invalid[frame_id]
    np.testing.assert_array_equal(a.depth, b.depth)
    # The .sens stores poses as float32: the export's poses, rounded to float32, exactly.
    np.testing.assert_array_equal(a.pose, b.pose.astype(np.float32).astype(np.float64))
    np.testing.assert_array_equal(a.intrinsic_color,
                                  b.intrinsic_color.astype(np.float32).astype(np.float64))
    np.testing.assert_array_equal(a.intrinsic_depth,
                                  b.intrinsic_depth.astype(np.float32).astype(np.float64))
    assert (a.color_size, a.depth_size, a.depth_scale) == (b.color_size, b.depth_size,
                                                           b.depth_scale)
    for field in ("xyz", "rgb", "semantic", "instance", "segment", "axis_alignment"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert a.has_axis_alignment and b.has_axis_alignment
    assert a.axis_alignment[0, 3] < 0  # the synthetic room's centre moved to the origin
    features_a, features_b = sens.features(SCENE, fid), exported.features(SCENE, fid)
    # The same JPEG bytes through the same decode: the same features, bit for bit.
    np.testing.assert_array_equal(features_a.spatial, features_b.spatial)
    np.testing.assert_array_equal(features_a.global_, features_b.global_)
    np.testing.assert_array_equal(features_a.done, features_b.done)
    assert np.abs(features_a.spatial[a.valid].astype(np.float32)).sum(axis=(1, 2, 3)).min() > 0


def test_an_export_with_re_encoded_jpegs_gives_close_features(scans, encoder, tmp_path):
    """SensReader's export decodes every JPEG and encodes it again (imageio, quality 75): the
    features move a little, far less than from one frame to the next."""
    export, raw = scans
    re_encoded = tmp_path / "re-encoded" / SCENE
    shutil.copytree(export, re_encoded)
    psnr = []
    for frame_id in range(8):
        if frame_id == 3:
            continue  # the cut JPEG stays cut
        path = re_encoded / "color" / f"{frame_id}.jpg"
        original = np.asarray(Image.open(path).convert("RGB"))
        path.write_bytes(jpeg_bytes(original, quality=75))
        again = np.asarray(Image.open(path).convert("RGB")).astype(np.float64)
        psnr.append(10 * np.log10(255**2 / np.mean((again - original) ** 2)))
    sens, fid, _ = extract(SensScene(raw), tmp_path / "sens.zarr", encoder)
    exported, _, _ = extract(ScanNetScene(re_encoded), tmp_path / "export.zarr", encoder)
    a, b = sens.scene(SCENE), exported.scene(SCENE)
    np.testing.assert_array_equal(a.valid, b.valid)
    np.testing.assert_array_equal(a.depth, b.depth)
    valid = a.valid
    spatial_a = sens.features(SCENE, fid).spatial[valid].astype(np.float32)
    spatial_b = exported.features(SCENE, fid).spatial[valid].astype(np.float32)
    relative = (np.linalg.norm((spatial_a - spatial_b).reshape(len(spatial_a), -1), axis=1)
                / np.linalg.norm(spatial_a.reshape(len(spatial_a), -1), axis=1))
    neighbours = (np.linalg.norm((spatial_a[1:] - spatial_a[:-1]).reshape(len(spatial_a) - 1, -1),
                                 axis=1)
                  / np.linalg.norm(spatial_a[1:].reshape(len(spatial_a) - 1, -1), axis=1))
    assert min(psnr) > 30  # what re-encoding at quality 75 costs these images
    assert relative.min() > 0  # re-encoding did change the features...
    assert relative.max() < 0.15 < 0.5 < neighbours.min()  # ...by far less than another frame


def test_the_stride_reads_only_the_frames_it_keeps(scans, encoder, tmp_path, monkeypatch):
    _, raw = scans
    scene = SensScene(raw)
    reads = []
    real_read = pipeline.readers.scannet_sens.read_payload

    def counting_read(path, offset, size):
        reads.append((offset, size))
        return real_read(path, offset, size)

    monkeypatch.setattr(pipeline.readers.scannet_sens, "read_payload", counting_read)
    store, fid, report = extract(scene, tmp_path / "strided.zarr", encoder, stride=3)
    np.testing.assert_array_equal(store.scene(SCENE).frame_id, [0, 3, 6])
    expected = {(int(scene.index.color_offset[i]),
                 int(scene.index.color_bytes[i] + scene.index.depth_bytes[i])) for i in (0, 6)}
    # Frame 3 has a cut JPEG: read and found invalid; frame 1 and 5 are never read.
    expected.add((int(scene.index.color_offset[3]),
                  int(scene.index.color_bytes[3] + scene.index.depth_bytes[3])))
    assert sorted(reads) == sorted(expected)
    assert report.encoded == 2 and list(report.invalid) == [3]
