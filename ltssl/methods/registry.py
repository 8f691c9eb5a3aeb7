"""The method registry: ``@register_method("name")`` on a :class:`~ltssl.methods.base.Method` subclass."""

from __future__ import annotations

from ltssl.methods.base import Method

METHODS: dict[str, type[Method]] = {}


def register_method(name: str):
    """Class decorator: make the method available as ``method.name: <name>``."""

    def deco(cls):
        if name in METHODS:
            raise ValueError(f"method {name!r} registered twice")
        METHODS[name] = cls
        cls.method_name = name
        return cls

    return deco
