"""The frozen encoder against open_clip's own outputs, on the shipped tiny ViT (random weights)."""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch

from pipeline.encoders.base import EncoderConfig, EncoderError, parse_image_size
from pipeline.encoders.clip import FrozenClipEncoder, build_clip
from pipeline.preprocess import Preprocess
from pipeline.projection import GridMapping


def tiny(**options) -> EncoderConfig:
    """The shipped tiny test CLIP with seeded random weights (nothing is downloaded)."""
    return EncoderConfig(**{"model": "test-ViT-tiny", "pretrained": "none", **options})


pytestmark = pytest.mark.filterwarnings("ignore:.*random weights")


def frames(n: int, size=(96, 128), seed=0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(n)]


@pytest.fixture(scope="module")
def encoder() -> FrozenClipEncoder:
    return FrozenClipEncoder(tiny(device="cpu"))


def test_parse_image_size():
    assert parse_image_size("224") == (224, 224)
    assert parse_image_size("240x320") == (240, 320)
    assert parse_image_size(None) is None and parse_image_size("") is None
    assert parse_image_size([240, 320]) == (240, 320)
    for bad in ("big", "0", "240x320x3", "-5"):
        with pytest.raises(EncoderError, match="not N or HxW"):
            parse_image_size(bad)


def test_global_is_encode_image_and_spatial_is_last_block(encoder):
    x = encoder.prepare(frames(3))
    spatial, global_ = encoder.encode(x)
    assert spatial.shape == (3, 14, 14, 96) and global_.shape == (3, 64)
    with torch.no_grad():
        expected_global = encoder.model.encode_image(x)
        expected_tokens = encoder.visual.forward_intermediates(
            x, indices=1, output_fmt="NLC", intermediates_only=True)["image_intermediates"][0]
    torch.testing.assert_close(global_, expected_global)
    torch.testing.assert_close(spatial.reshape(3, 196, 96), expected_tokens)
    # What the store keeps (fp16) is within fp16 rounding of the model's output.
    torch.testing.assert_close(spatial.half().float(), expected_tokens.reshape(3, 14, 14, 96),
                               rtol=1e-3, atol=1e-3)


def test_spatial_tokens_come_from_the_last_block(encoder):
    """A hook on the last block sees exactly the tokens we return: not ln_post'ed, not an earlier block."""
    seen = []
    hook = encoder.visual.transformer.resblocks[-1].register_forward_hook(
        lambda m, args, out: seen.append(out))
    try:
        spatial, _ = encoder.encode(encoder.prepare(frames(2)))
    finally:
        hook.remove()
    torch.testing.assert_close(spatial.reshape(2, -1, 96), seen[0][:, 1:])


def test_no_gradients_anywhere(encoder):
    assert not any(p.requires_grad for p in encoder.model.parameters())
    assert not encoder.model.training
    spatial, global_ = encoder.encode(encoder.prepare(frames(1)).requires_grad_(True))
    assert not spatial.requires_grad and not global_.requires_grad


def test_non_square_input_gives_15_by_20_grid():
    enc = FrozenClipEncoder(tiny(image_size=(240, 320), device="cpu"))
    spatial, global_ = enc.encode(enc.prepare(frames(2, size=(120, 160))))
    assert spatial.shape == (2, 15, 20, 96) and global_.shape == (2, 64)
    assert enc.describe().grid_size == (15, 20)
    assert enc.describe().image_size == (240, 320)


def test_maskclip_is_the_value_path_of_the_last_block():
    """Independent check: attention restricted to each token itself (a diagonal mask in
    PyTorch's own MultiheadAttention) is exactly the value path; then ln_post and proj."""
    enc = FrozenClipEncoder(tiny(spatial_kind="maskclip", device="cpu"))
    x = enc.prepare(frames(2))
    spatial, global_ = enc.encode(x)
    assert spatial.shape == (2, 14, 14, 64)
    visual = enc.visual
    with torch.no_grad():
        out = visual.forward_intermediates(x, indices=2, output_fmt="NLC", output_extra_tokens=True)
        block_input = torch.cat([out["image_intermediates_prefix"][0],
                                 out["image_intermediates"][0]], dim=1)
        block = visual.transformer.resblocks[-1]
        tokens = block.ln_1(block_input)
        n = tokens.shape[1]
        only_self = torch.full((n, n), float("-inf")).fill_diagonal_(0)
        value_path = block.attn(tokens, tokens, tokens, attn_mask=only_self, need_weights=False)[0]
        expected = visual.ln_post(value_path)[:, 1:] @ visual.proj
        torch.testing.assert_close(spatial.reshape(2, n - 1, 64), expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(global_, enc.model.encode_image(x))


def test_openai_tag_gets_quick_gelu():
    """OpenAI's weights were trained with QuickGELU; other tags and random weights use nn.GELU.
    load_weights=False builds the architecture each tag gets without the network."""
    def activation(pretrained: str, model: str = "ViT-B-16"):
        clip = build_clip(EncoderConfig(model=model, pretrained=pretrained), load_weights=False)
        return type(clip.visual.transformer.resblocks[0].mlp.gelu)

    assert activation("openai") is open_clip.transformer.QuickGELU
    assert activation("laion2b_s34b_b88k") is torch.nn.GELU
    assert activation("none") is torch.nn.GELU
    assert activation("none", model="ViT-B-16-quickgelu") is open_clip.transformer.QuickGELU


def test_checkpoint_file_loads_and_is_identified_by_its_hash(tmp_path, encoder):
    checkpoint = tmp_path / "tiny.pt"
    torch.save(encoder.model.state_dict(), checkpoint)
    from_file = FrozenClipEncoder(tiny(pretrained=str(checkpoint), device="cpu"))
    x = encoder.prepare(frames(2))
    torch.testing.assert_close(from_file.encode(x), encoder.encode(x))
    spec = from_file.describe()
    assert spec.pretrained == "file:tiny.pt" and not spec.random_weights
    assert len(spec.pretrained_sha256) == 64
    moved = tmp_path / "elsewhere.pt"
    checkpoint.rename(moved)
    same = FrozenClipEncoder(tiny(pretrained=str(moved), device="cpu")).describe()
    assert same.pretrained_sha256 == spec.pretrained_sha256


def test_random_weights_are_seeded_and_flagged():
    with pytest.warns(UserWarning, match="random weights"):
        a = FrozenClipEncoder(tiny(seed=3, device="cpu"))
    b = FrozenClipEncoder(tiny(seed=3, device="cpu"))
    c = FrozenClipEncoder(tiny(seed=4, device="cpu"))
    x = a.prepare(frames(1))
    torch.testing.assert_close(a.encode(x), b.encode(x))
    assert not torch.allclose(a.encode(x)[1], c.encode(x)[1])
    assert a.describe().random_weights
    assert a.describe().id == b.describe().id != c.describe().id


def test_feature_set_id_changes_with_what_changes_the_numbers(encoder):
    ids = {FrozenClipEncoder(tiny(device="cpu", **change)).describe().id
           for change in ({}, {"resize": "crop"}, {"spatial_kind": "maskclip"}, {"image_size": (240, 320)})}
    assert len(ids) == 4


def test_bad_configurations_say_what_to_do(tmp_path):
    with pytest.raises(EncoderError, match="unknown open_clip model 'ViT-Q-99'"):
        build_clip(EncoderConfig(model="ViT-Q-99"))
    with pytest.raises(EncoderError, match="does not exist"):
        build_clip(tiny(pretrained=str(tmp_path / "missing.pt")))
    bad = tmp_path / "broken.bin"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(EncoderError, match="could not load test-ViT-tiny weights"):
        build_clip(tiny(pretrained=str(bad)))
    with pytest.raises(EncoderError, match="spatial-kind"):
        tiny(spatial_kind="cls")


@pytest.mark.parametrize("resize", ["squash", "crop"])
@pytest.mark.parametrize("input_size", [(224, 224), (240, 320)])
def test_preprocess_agrees_with_grid_mapping(resize, input_size):
    """A ramp image (red = 2u, green = 2v) is resized; every interior input pixel must carry the
    colour coordinate that GridMapping sends to that pixel's normalised position."""
    color_h, color_w = 96, 128
    v, u = np.mgrid[0:color_h, 0:color_w]
    ramp = np.stack([2 * u * 255 / 256, 2 * v * 255 / 192, np.zeros_like(u)], -1).round().astype(np.uint8)
    resized = Preprocess(input_size, (0, 0, 0), (1, 1, 1), resize).resized(ramp) * 255
    red_per_u, green_per_v = 2 * 255 / 256, 2 * 255 / 192
    u_seen = resized[0] / red_per_u  # colour u each input pixel shows, (H_in, W_in)
    v_seen = resized[1] / green_per_v
    mapping = GridMapping((color_h, color_w), input_size, (input_size[0] // 16, input_size[1] // 16), resize)
    grid_uv, inside = mapping.color_to_grid(torch.stack([u_seen, v_seen], -1))
    h, w = input_size
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    expected = torch.stack([2 * (xs + 0.5) / w - 1, 2 * (ys + 0.5) / h - 1], -1)
    interior = (slice(8, -8), slice(8, -8))  # away from the clamped borders of the resampling
    assert inside[interior].all()
    # The ramp and the resized image are both 8-bit: up to ~0.7 colour px of quantisation each
    # way, 1.75 input px at 2.5x upscaling; one input pixel is 2/W_in in grid units. A shift of
    # the mapping would move the mean error, quantisation does not.
    err_x = (grid_uv[interior][..., 0] - expected[interior][..., 0]) * w / 2
    err_y = (grid_uv[interior][..., 1] - expected[interior][..., 1]) * h / 2
    assert err_x.abs().max() < 2.0 and err_y.abs().max() < 2.0, (err_x.abs().max(), err_y.abs().max())
    assert abs(err_x.mean()) < 0.1 and abs(err_y.mean()) < 0.1, (err_x.mean(), err_y.mean())
