"""Backbones (encoders), registered by name.

``build_backbone(model_cfg, image_size)`` returns an ``nn.Module`` mapping images
``[B, 3, S, S]`` to features ``[B, backbone.out_dim]``. ``model_cfg.norm`` picks
BatchNorm (the recipes) or GroupNorm (BN-free: per-sample computation, so a DDP
run equals a single-process run over the same global batch on CPU, where
SyncBatchNorm is unavailable).

Adding a backbone: write a builder ``fn(norm: str, image_size: int) -> nn.Module``
whose module has an ``out_dim`` attribute, and decorate it with
``@register_backbone("name")``.
"""

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


def check_backbone(name: str) -> None:
    if name not in BACKBONES:
        raise UnknownNameError(f"model.backbone must be one of {', '.join(sorted(BACKBONES))}, got {name!r}")


def build_backbone(model_cfg, image_size: int) -> nn.Module:
    """The encoder named by ``model_cfg.backbone``; ``out_dim`` gives its feature width."""
    check_backbone(model_cfg.backbone)
    net = BACKBONES[model_cfg.backbone](model_cfg.norm, image_size)
    if not isinstance(getattr(net, "out_dim", None), int):
        raise TypeError(f"backbone {model_cfg.backbone!r} has no integer out_dim")
    return net


def norm_layer(norm: str) -> Callable[[int], nn.Module]:
    """A ``channels -> module`` factory: BatchNorm2d, or GroupNorm with up to 32 groups."""
    if norm == "batch":
        return nn.BatchNorm2d
    if norm == "group":
        return lambda c: nn.GroupNorm(min(32, c // 4) if c >= 8 else 1, c)
    raise ValueError(f"model.norm must be one of batch, group, got {norm!r}")


from ltssl.models import resnet, small_cnn  # noqa: E402,F401  (registration)

__all__ = ["BACKBONES", "build_backbone", "register_backbone", "check_backbone", "norm_layer", "UnknownNameError"]
