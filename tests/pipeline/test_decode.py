"""The scaled decode path: JPEGs decoded at the smallest DCT scale at least the model input.

Correctness only (the speed is measured by `python -m benchmarks.run`): the scale chosen, the
model input against the full decode's on a camera-like JPEG, the flag that selects the full
decode, and the feature-set description and id that record it.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from benchmarks.decode import jpeg_bytes, psnr, textured_image
from pipeline.preprocess import Preprocess, decode_color, decode_color_scaled
from pipeline.synthetic import write_scenes
from pipeline.readers.synthetic import SyntheticScene
from storage.featureset import FeatureSetSpec, featureset_id, identity

SCANNET = (968, 1296)


@pytest.fixture(scope="module")
def camera_jpeg() -> bytes:
    """A ScanNet-size JPEG with natural images' 1/f spectrum and hard edges (quality 92)."""
    return jpeg_bytes(textured_image(SCANNET, seed=3))


@pytest.mark.parametrize("min_size, reduction", [
    ((224, 224), 4),    # 968 // 224 = 4, 1296 // 224 = 5: 1/4 (242x324), 1/8 would be 121 high
    ((240, 320), 4),    # 242x324 still covers 240x320
    ((243, 320), 2),    # one row more than 1/4 gives: 1/2
    ((121, 162), 8),    # exactly 1/8
    ((122, 162), 4),
    ((500, 700), 1),    # more than half the frame: whole
    ((2000, 2000), 1),  # larger than the frame: whole
])
def test_the_scale_is_the_smallest_at_or_above_the_input(camera_jpeg, min_size, reduction):
    color, size, r = decode_color_scaled(io.BytesIO(camera_jpeg), min_size)
    assert size == SCANNET and r == reduction
    expected = tuple(-(-side // reduction) for side in SCANNET)  # ceil
    assert color.shape == (*expected, 3) and color.dtype == np.uint8
    if reduction > 1:  # at or above the input on both sides
        assert all(got >= want for got, want in zip(color.shape, min_size))
    if reduction < 8:  # the next scale down would be smaller than the input on some side
        assert any(side // (2 * reduction) < want for side, want in zip(SCANNET, min_size))


def test_png_and_no_min_size_decode_whole(camera_jpeg):
    whole = decode_color(io.BytesIO(camera_jpeg))
    assert whole.shape == (*SCANNET, 3)
    buffer = io.BytesIO()
    Image.fromarray(whole).save(buffer, format="PNG")
    color, size, reduction = decode_color_scaled(io.BytesIO(buffer.getvalue()), (224, 224))
    assert reduction == 1 and size == SCANNET and np.array_equal(color, whole)


def test_a_truncated_jpeg_still_fails_on_the_scaled_path(camera_jpeg):
    with pytest.raises(OSError):
        decode_color_scaled(io.BytesIO(camera_jpeg[: len(camera_jpeg) // 2]), (224, 224))


@pytest.mark.parametrize("resize", ["squash", "crop"])
@pytest.mark.parametrize("input_size", [(224, 224), (240, 320)])
def test_the_model_input_matches_the_full_decode(camera_jpeg, resize, input_size):
    preprocess = Preprocess(input_size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), resize)
    full = preprocess.resized(decode_color(io.BytesIO(camera_jpeg)))
    color, size, reduction = decode_color_scaled(io.BytesIO(camera_jpeg), input_size)
    scaled = preprocess.resized(color, reduction, size)
    assert reduction == 4 and scaled.shape == full.shape == (3, *input_size)
    assert psnr(scaled, full) >= 35
    # the geometry is the full path's: a box misplaced by one reduced pixel (4 frame pixels)
    # falls below the bound
    shifted = Preprocess(input_size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), resize)
    wrong = shifted.resized(color[:, 1:], reduction, (size[0], size[1] - 4))
    assert psnr(wrong, full) < psnr(scaled, full) - 5


def test_a_reduced_frame_needs_its_size():
    preprocess = Preprocess((224, 224), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="color_size"):
        preprocess.resized(np.zeros((242, 324, 3), np.uint8), 4)


def test_readers_return_the_reduction_and_check_the_encoded_size(tmp_path):
    (scene_dir,) = write_scenes(tmp_path, n_scenes=1, n_frames=2, n_points=500)
    scene = SyntheticScene.open(scene_dir)
    whole = scene.read_frame(0)
    scaled = scene.read_frame(0, color_min_size=(224, 224))
    assert whole.color_reduction == 1 and whole.color.shape == (*SCANNET, 3)
    assert scaled.valid and scaled.color_reduction == 4 and scaled.color.shape == (242, 324, 3)
    assert np.array_equal(scaled.depth_mm, whole.depth_mm)
    # a colour file of another size is still invalid, named by its encoded size
    Image.fromarray(whole.color[:960]).save(scene_dir / "color" / "1.jpg", quality=92)
    odd = scene.read_frame(1, color_min_size=(224, 224))
    assert not odd.valid and "960x1296, expected 968x1296" in odd.reason


def test_extraction_uses_the_configured_path_and_records_it(tmp_path):
    from pipeline.encoders.base import EncoderConfig
    from pipeline.encoders.clip import FrozenClipEncoder
    from pipeline.extraction import extract_scene
    from storage import open_store

    (scene_dir,) = write_scenes(tmp_path / "scenes", n_scenes=1, n_frames=2, n_points=500)
    scene = SyntheticScene.open(scene_dir)
    store = open_store(tmp_path / "store.zarr", mode="a")
    ids, features, encoders = {}, {}, {}
    for decode in ("scaled", "full"):
        encoder = FrozenClipEncoder(EncoderConfig(model="test-ViT-tiny", pretrained="none",
                                                  device="cpu", decode=decode))
        spec = encoder.describe()
        assert spec.decode == decode and spec.to_attrs()["decode"] == decode
        ids[decode] = store.register_featureset(spec)
        extract_scene(scene, store, encoder, ids[decode], batch_size=2)
        features[decode] = store.features(scene.scene_id, ids[decode]).global_.astype(np.float32)
        encoders[decode] = encoder
    assert ids["scaled"] != ids["full"]
    assert {spec.decode for spec in store.featuresets().values()} == {"scaled", "full"}
    # each feature set holds what its own path gives (float16 in the store)
    for decode, encoder in encoders.items():
        frame = scene.read_frame(0, color_min_size=encoder.preprocess.decode_size)
        x = encoder.preprocess(frame.color, frame.color_reduction, scene.color_size)
        _, expected = encoder.encode(x[None])
        np.testing.assert_allclose(features[decode][0], expected[0].numpy(), rtol=2e-3,
                                   atol=2e-3)
    full_frame = scene.read_frame(0)
    direct = encoders["full"].preprocess(full_frame.color)  # the path before this option
    _, expected = encoders["full"].encode(direct[None])
    np.testing.assert_allclose(features["full"][0], expected[0].numpy(), rtol=2e-3, atol=2e-3)
    assert not np.allclose(features["scaled"], features["full"], rtol=1e-4, atol=1e-4)


def test_descriptions_without_the_key_are_full_decode_and_keep_their_id():
    old = {"model": "ViT-B-16", "pretrained": "openai", "image_size": [224, 224],
           "grid_size": [14, 14], "resize": "squash", "mean": [0.5] * 3, "std": [0.5] * 3,
           "spatial_kind": "tokens", "spatial_dim": 768, "global_dim": 512, "dtype": "float16"}
    assert FeatureSetSpec.from_attrs(old).decode == "full"
    assert FeatureSetSpec.from_attrs(old).id == featureset_id(old)
    assert featureset_id(old) == featureset_id({**old, "decode": "full"})
    assert identity(old) == identity({**old, "decode": "full"})
    assert featureset_id({**old, "decode": "scaled"}) != featureset_id(old)


def test_the_cli_flag_reaches_the_flow():
    from flows.extract_clip import build_parser

    parser = build_parser()
    assert parser.parse_args(["--root", "r"]).decode == "scaled"
    assert parser.parse_args(["--root", "r", "--decode", "full"]).decode == "full"
    assert "--decode" in parser.format_help()
    with pytest.raises(SystemExit):
        parser.parse_args(["--root", "r", "--decode", "half"])
