"""A name -> builder registry (timm-style) so configs and bundles name networks, not classes.

A leaf: it imports no builder. ``medimg.models`` imports the builder modules, which register
themselves here, so ``from medimg.models import build_network`` always sees every network.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any

from torch import nn

from medimg.errors import ConfigError

log = logging.getLogger(__name__)
_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_network(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a network builder under ``name``."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = fn
        return fn

    return deco


def list_networks() -> list[str]:
    """Registered network names."""
    return sorted(_REGISTRY)


def build_network(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered network.

    Args:
        name: registry name (see :func:`list_networks`).
        **kwargs: builder arguments (e.g. ``pretrained``: a local weight file).
    """
    if name not in _REGISTRY:
        raise ConfigError("model.name", f"unknown network {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    builder = _REGISTRY[name]
    params = inspect.signature(builder).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(kwargs) - set(params))
        if unknown:  # a misspelt key must never be swallowed silently
            raise ConfigError(f"model.{unknown[0]}", f"is not an option of network {name!r} "
                                                     f"(its options: {', '.join(params)})")
    return builder(**kwargs)
