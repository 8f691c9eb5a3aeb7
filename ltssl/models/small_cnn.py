"""A small CNN for the digits default: three conv blocks, global average pool (128-d)."""

from __future__ import annotations

import torch
import torch.nn as nn

from ltssl.models.registry import norm_layer, register_backbone


class SmallCNN(nn.Module):
    """conv(3->32)-conv(32->64, /2)-conv(64->128, /2), each 3x3 + norm + ReLU, then global mean.

    Input ``[B, 3, S, S]`` with any S >= 4; output ``[B, 128]``.
    """

    def __init__(self, norm: str = "batch", widths: tuple[int, int, int] = (32, 64, 128)):
        super().__init__()
        make_norm = norm_layer(norm)
        layers: list[nn.Module] = []
        c_in = 3
        for i, c in enumerate(widths):
            layers += [nn.Conv2d(c_in, c, 3, stride=1 if i == 0 else 2, padding=1, bias=False), make_norm(c), nn.ReLU(inplace=True)]
            c_in = c
        self.features = nn.Sequential(*layers)
        self.out_dim = widths[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean(dim=(2, 3))


@register_backbone("small_cnn")
def small_cnn(norm: str, image_size: int) -> nn.Module:
    return SmallCNN(norm)
