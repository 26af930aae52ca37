"""A name -> builder registry (timm-style) so configs and bundles name networks, not classes.

A leaf: it imports no builder up front. Each builder module registers its networks here when it
is imported; :data:`BUILDER_MODULES` says which module holds which name, so
:func:`build_network` imports only the module it needs (building a Swin-UNETR does not import timm
or segment-anything) and :func:`list_networks` imports them all.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from importlib import import_module
from typing import Any

from torch import nn

from medimg.errors import ConfigError

log = logging.getLogger(__name__)
_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
BUILDER_MODULES: dict[str, str] = {
    "swin_unetr": "medimg.models.swin_unetr",
    **{n: "medimg.models.cnn3d" for n in ("segresnet", "dynunet")},
    **{n: "medimg.models.sam.builders" for n in ("sam", "medsam", "litemedsam")},
    "medsam3d": "medimg.models.sam3d.network",
    "mae_vit": "medimg.models.vit.mae",
    "vit_cls": "medimg.models.vit.network",
    "vit_seg": "medimg.models.vit.network",
}


def _import_builder(name: str) -> None:
    if name not in _REGISTRY and name in BUILDER_MODULES:
        import_module(BUILDER_MODULES[name])


def register_network(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a network builder under ``name``."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = fn
        return fn

    return deco


def list_networks() -> list[str]:
    """Registered network names (every builder module imported)."""
    for module in sorted(set(BUILDER_MODULES.values())):
        import_module(module)
    return sorted(_REGISTRY)


def build_network(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered network.

    Args:
        name: registry name (see :func:`list_networks`).
        **kwargs: builder arguments (e.g. ``pretrained``: a local weight file).
    """
    _import_builder(name)
    if name not in _REGISTRY:
        raise ConfigError("model.name", f"unknown network {name!r}; known: {', '.join(list_networks())}")
    builder = _REGISTRY[name]
    params = inspect.signature(builder).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(kwargs) - set(params))
        if unknown:  # a misspelt key must never be swallowed silently
            raise ConfigError(f"model.{unknown[0]}", f"is not an option of network {name!r} "
                                                     f"(its options: {', '.join(params)})")
    return builder(**kwargs)
