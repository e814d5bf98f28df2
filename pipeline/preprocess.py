"""Colour frames -> normalised model input, under the two resize policies the store records.

The arithmetic matches `pipeline.projection.GridMapping` exactly (continuous scale, centred
crop), so a colour pixel lands on the grid cell whose patch it was resized into.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image

ResizePolicy = Literal["squash", "crop"]


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

    def __post_init__(self) -> None:
        if self.resize not in ("squash", "crop"):
            raise ValueError(f"resize must be 'squash' or 'crop', got {self.resize!r}")

    def resized(self, color: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 RGB -> (3, H_in, W_in) float32 in [0, 1], not normalised.

        Pillow's bicubic resampling (antialiased when shrinking, as open_clip's own preprocess)
        of a source box given in continuous pixel coordinates: the whole frame for squash, the
        centred crop for crop, so no rounding of the crop offset ever shifts the grid.
        """
        (color_h, color_w), (input_h, input_w) = color.shape[:2], self.input_size
        box = (0.0, 0.0, float(color_w), float(color_h))
        if self.resize == "crop":
            scale = max(input_h / color_h, input_w / color_w)
            crop_w, crop_h = input_w / scale, input_h / scale  # the crop, in colour pixels
            left, top = (color_w - crop_w) / 2, (color_h - crop_h) / 2
            box = (left, top, left + crop_w, top + crop_h)
        image = Image.fromarray(np.ascontiguousarray(color)).resize(
            (input_w, input_h), Image.Resampling.BICUBIC, box=box)
        return torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div_(255)

    def __call__(self, color: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 RGB -> (3, H_in, W_in) float32, normalised with the model's mean/std."""
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (self.resized(color) - mean) / std
