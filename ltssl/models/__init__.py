"""Backbones (encoders), registered by name.

``build_backbone(model_cfg, image_size)`` returns an ``nn.Module`` mapping images
``[B, 3, S, S]`` to features ``[B, backbone.out_dim]``. ``model_cfg.norm`` picks
BatchNorm (the recipes) or GroupNorm (BN-free: per-sample computation, so a DDP
run equals a single-process run over the same global batch on CPU, where
SyncBatchNorm is unavailable).

Adding a backbone: write a builder ``fn(norm: str, image_size: int) -> nn.Module``
whose module has an ``out_dim`` attribute, and decorate it with
``@register_backbone("name")`` (:mod:`ltssl.models.registry`).
"""

from __future__ import annotations

import torch.nn as nn

# the backbone files register themselves on import
from ltssl.models import resnet, small_cnn  # noqa: F401
from ltssl.models.registry import BACKBONES, UnknownNameError, norm_layer, register_backbone


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


__all__ = ["BACKBONES", "build_backbone", "register_backbone", "check_backbone", "norm_layer", "UnknownNameError"]
