"""Plain ``nn.Module`` networks, built by name from a registry."""

from __future__ import annotations

from medimg.models.registry import build_network, list_networks, register_network

__all__ = ["build_network", "list_networks", "register_network"]
