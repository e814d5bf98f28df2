"""Which torch device a `--device` flag means (shared by stage 1 and stage 2; no open_clip)."""

from __future__ import annotations

import torch

from storage.errors import UserError


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda when torch sees a GPU, else cpu; "cuda" without a GPU is a UserError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: torch sees no GPU here; use --device cpu")
    return device
