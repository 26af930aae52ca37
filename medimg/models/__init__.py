"""Plain ``nn.Module`` networks, built by name from a registry.

Builder modules register their networks with :mod:`medimg.models.registry` and are imported on
first use of a name they hold, so building one network imports only what it needs.
"""

from __future__ import annotations

from medimg.models.registry import build_network, list_networks, register_network

__all__ = ["build_network", "list_networks", "register_network"]
