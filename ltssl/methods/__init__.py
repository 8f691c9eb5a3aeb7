"""SSL methods, registered by name; each is a pure per-sample loss on a batch of views.

``build_method(cfg, num_classes)`` builds the backbone named by ``cfg.model.backbone``
and wraps it in the method named by ``cfg.method.name``. Adding a method: one file
here with a :class:`Method` subclass decorated ``@register_method("name")``
(:mod:`ltssl.methods.registry`), plus its import line below.
"""

from __future__ import annotations

# the method files register themselves on import
from ltssl.methods import moco_v2, simclr, simsiam, supervised, supervised_rare  # noqa: F401
from ltssl.methods.base import Method
from ltssl.methods.multiview import with_feature_filter
from ltssl.methods.registry import METHODS, register_method
from ltssl.methods.tase import with_tase
from ltssl.models import UnknownNameError, build_backbone


def check_method(name: str) -> None:
    if name not in METHODS:
        raise UnknownNameError(f"method.name must be one of {', '.join(sorted(METHODS))}, got {name!r}")


def method_class(cfg) -> type[Method]:
    """The registered class, with the TASE and multi-view-filter mixins when the config turns them on.

    Raises ``UnknownNameError`` or ``ConfigError`` (e.g. TASE on a non-contrastive method).
    """
    check_method(cfg.method.name)
    return with_tase(with_feature_filter(METHODS[cfg.method.name], cfg), cfg)


def build_method(cfg, num_classes: int) -> Method:
    """The method ``cfg.method.name`` around a fresh ``cfg.model.backbone`` encoder."""
    cls = method_class(cfg)
    encoder = build_backbone(cfg.model, cfg.data.image_size)
    return cls(cfg, encoder, num_classes)


__all__ = ["Method", "METHODS", "register_method", "build_method", "method_class", "check_method", "UnknownNameError"]
