"""Colour frames -> normalised model input, under the two resize policies the store records.

The arithmetic matches `pipeline.projection.GridMapping` exactly (continuous scale, centred
crop), so a colour pixel lands on the grid cell whose patch it was resized into.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

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
        """(H, W, 3) uint8 RGB -> (3, H_in, W_in) float32 in [0, 1], not normalised."""
        image = torch.from_numpy(np.require(color, requirements=["C", "W"])).permute(2, 0, 1)[None].float() / 255
        (color_h, color_w), (input_h, input_w) = color.shape[:2], self.input_size
        if self.resize == "squash":
            out = F.interpolate(image, size=(input_h, input_w), mode="bicubic",
                                antialias=True, align_corners=False)
        else:
            scale = max(input_h / color_h, input_w / color_w)
            # Resize with the exact continuous scale, then crop: `scale_factor` with
            # recompute_scale_factor=False samples at (x + 0.5) / scale - 0.5, as GridMapping assumes.
            out = F.interpolate(image, scale_factor=scale, mode="bicubic", antialias=True,
                                align_corners=False, recompute_scale_factor=False)
            top = int(round((out.shape[-2] - input_h) / 2))
            left = int(round((out.shape[-1] - input_w) / 2))
            out = out[..., top:top + input_h, left:left + input_w]
        return out[0].clamp_(0, 1)

    def __call__(self, color: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 RGB -> (3, H_in, W_in) float32, normalised with the model's mean/std."""
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (self.resized(color) - mean) / std
