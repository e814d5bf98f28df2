"""Per-point MLP heads on the fused features (semantic now; an instance head plugs in alike)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


def mlp(widths: Sequence[int]) -> nn.Sequential:
    """Linear layers through `widths`, LayerNorm + ReLU between them, none after the last.

    widths: (in, hidden..., out). LayerNorm, not BatchNorm, so each point's output depends on
    that point alone (no statistics shared with unseen points or other scenes).
    """
    layers: list[nn.Module] = []
    for index, (width_in, width_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(width_in, width_out))
        if index < len(widths) - 2:
            layers += [nn.LayerNorm(width_out), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def semantic_head(in_channels: int, hidden: int, num_classes: int) -> nn.Sequential:
    """(P, in_channels) fused features -> (P, num_classes) logits."""
    return mlp((in_channels, hidden, num_classes))
