"""Colour frames -> normalised model input, under the two resize policies the store records.

The arithmetic matches `pipeline.projection.GridMapping` exactly (continuous scale, centred
crop), so a colour pixel lands on the grid cell whose patch it was resized into.
`decode_color` is the one colour decode of every reader (an exported JPEG file, or the JPEG
bytes of a `.sens` frame). With a minimum size it decodes a JPEG straight to the smallest of
libjpeg's DCT scales (1/1, 1/2, 1/4, 1/8) at or above that size, several times faster than
decoding it whole: the `scaled` decode path, stage 1's default; `full` decodes every pixel.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
import torch
from PIL import Image

ResizePolicy = Literal["squash", "crop"]

DecodePath = Literal["scaled", "full"]
DECODE_PATHS: tuple[DecodePath, ...] = ("scaled", "full")
DEFAULT_DECODE: DecodePath = "scaled"
"""The decode path stage 1 takes unless told otherwise (the encoders' and the flow's default)."""
"""scaled: JPEGs decoded at the smallest DCT scale whose size is at least the model input, then
resized as always; full: every frame decoded whole, then resized (the only path before the
`decode` key of a feature-set description existed: a description without it means full)."""

DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
"""What PIL raises on a missing, truncated, empty or corrupt image."""


def decode_color(source: Path | BinaryIO) -> np.ndarray:
    """An encoded colour image (JPEG, PNG), a file path or a binary stream such as
    `io.BytesIO(jpeg_bytes)` -> (H, W, 3) uint8 RGB at the size it was encoded at.

    The whole image is decoded, so a truncated JPEG fails here instead of in the model.
    Raises one of DECODE_ERRORS when it does not decode.
    """
    return decode_color_scaled(source, None)[0]


def decode_color_scaled(source: Path | BinaryIO, min_size: tuple[int, int] | None
                        ) -> tuple[np.ndarray, tuple[int, int], int]:
    """Decode an encoded colour image at the smallest size the model needs.

    min_size: (H_min, W_min) pixels, or None for the whole image. A JPEG is decoded at 1/r of
    its size, r the largest of 8, 4, 2, 1 with H // r >= H_min and W // r >= W_min (libjpeg's
    DCT-domain scaling through Pillow's `Image.draft`: each output pixel covers an r x r block,
    so a continuous pixel coordinate x of the image is x / r in the output). Other formats are
    decoded whole (r = 1).
    Returns (color (ceil(H / r), ceil(W / r), 3) uint8 RGB, (H, W) encoded size, r). Every
    coefficient is still read, so a truncated JPEG fails as with the full decode: raises one
    of DECODE_ERRORS when it does not decode.
    """
    with Image.open(source) as image:
        size = (image.height, image.width)
        reduction = 1
        if min_size is not None and image.format == "JPEG":
            drafted = image.draft("RGB", (int(min_size[1]), int(min_size[0])))
            if drafted is not None:  # box = (0, 0, W / r, H / r)
                reduction = round(size[1] / drafted[1][2])
        return np.asarray(image.convert("RGB")), size, reduction


@dataclass(frozen=True)
class Preprocess:
    """input_size: (H_in, W_in) pixels; mean/std: per-channel RGB of the model, in [0, 1] units.

    squash: the whole frame resized to H_in x W_in, bicubic with antialiasing (aspect not kept).
    crop: open_clip's own policy: scale by max(H_in / Hc, W_in / Wc), centre-crop H_in x W_in.
    """

    input_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: ResizePolicy = "squash"
    decode: DecodePath = DEFAULT_DECODE

    def __post_init__(self) -> None:
        if self.resize not in ("squash", "crop"):
            raise ValueError(f"resize must be 'squash' or 'crop', got {self.resize!r}")
        if self.decode not in DECODE_PATHS:
            raise ValueError(f"decode must be 'scaled' or 'full', got {self.decode!r}")

    @property
    def decode_size(self) -> tuple[int, int] | None:
        """The min_size readers decode colour frames at for this input (`decode_color_scaled`):
        the input size on the scaled path, None (whole frames) on the full one."""
        return self.input_size if self.decode == "scaled" else None

    def resized(self, color: np.ndarray, reduction: int = 1,
                color_size: tuple[int, int] | None = None) -> torch.Tensor:
        """(h, w, 3) uint8 RGB -> (3, H_in, W_in) float32 in [0, 1], not normalised.

        Pillow's bicubic resampling (antialiased when shrinking, as open_clip's own preprocess)
        of a source box given in continuous pixel coordinates: the whole frame for squash, the
        centred crop for crop, so no rounding of the crop offset ever shifts the grid.
        reduction, color_size: `color` is a frame of (H, W) `color_size` decoded at 1/reduction
        (`decode_color_scaled`); the box is computed on the frame, then divided by reduction.
        By default `color` is the whole frame.
        """
        if color_size is None:
            if reduction != 1:
                raise ValueError("a reduced colour frame needs its color_size")
            color_size = color.shape[:2]
        (color_h, color_w), (input_h, input_w) = color_size, self.input_size
        box = (0.0, 0.0, float(color_w), float(color_h))
        if self.resize == "crop":
            scale = max(input_h / color_h, input_w / color_w)
            crop_w, crop_h = input_w / scale, input_h / scale  # the crop, in colour pixels
            left, top = (color_w - crop_w) / 2, (color_h - crop_h) / 2
            box = (left, top, left + crop_w, top + crop_h)
        box = tuple(value / reduction for value in box)
        image = Image.fromarray(np.ascontiguousarray(color)).resize(
            (input_w, input_h), Image.Resampling.BICUBIC, box=box)
        return torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div_(255)

    def __call__(self, color: np.ndarray, reduction: int = 1,
                 color_size: tuple[int, int] | None = None) -> torch.Tensor:
        """(h, w, 3) uint8 RGB -> (3, H_in, W_in) float32, normalised with the model's mean/std
        (reduction, color_size: as `resized`)."""
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (self.resized(color, reduction, color_size) - mean) / std
