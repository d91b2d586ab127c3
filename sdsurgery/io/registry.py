"""sdsurgery's own model registry: factories registered by name (``@register_model``), as
timm's ``register_model``. ``models.create_model`` resolves names here first."""
from __future__ import annotations

import fnmatch
from typing import Callable

import torch.nn as nn

__all__ = ["register_model", "registered", "get_factory", "names"]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module] | None = None, *, name: str | None = None):
    """Register a factory in sdsurgery's own registry (``@register_model``)."""
    def wrap(f: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name or f.__name__] = f
        return f
    return wrap(fn) if fn is not None else wrap


def registered(name: str) -> bool:
    return name in _REGISTRY


def get_factory(name: str) -> Callable[..., nn.Module]:
    return _REGISTRY[name]


def names(pattern: str = "*") -> list[str]:
    """Registered names matching a glob, sorted."""
    return [n for n in sorted(_REGISTRY) if fnmatch.fnmatchcase(n, pattern)]
