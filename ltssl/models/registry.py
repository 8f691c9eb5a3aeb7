"""The backbone registry (``@register_backbone("name")``) and the normalisation layer choice."""

from __future__ import annotations

from typing import Callable

import torch.nn as nn

BACKBONES: dict[str, Callable[[str, int], nn.Module]] = {}


class UnknownNameError(ValueError):
    """A registered name (backbone or method) does not exist; the message lists the known ones."""


def register_backbone(name: str):
    def deco(fn):
        if name in BACKBONES:
            raise ValueError(f"backbone {name!r} registered twice")
        BACKBONES[name] = fn
        return fn

    return deco


def norm_layer(norm: str) -> Callable[[int], nn.Module]:
    """A ``channels -> module`` factory: BatchNorm2d, or GroupNorm with up to 32 groups."""
    if norm == "batch":
        return nn.BatchNorm2d
    if norm == "group":
        return lambda c: nn.GroupNorm(min(32, c // 4) if c >= 8 else 1, c)
    raise ValueError(f"model.norm must be one of batch, group, got {norm!r}")
