"""Plain ``nn.Module`` networks, built by name from a registry.

Importing this package imports every builder module (as ``timm.models`` does); each registers
its networks with :mod:`medimg.models.registry`, a leaf.
"""

from __future__ import annotations

from medimg.models import swin_unetr  # noqa: F401 - registers swin_unetr
from medimg.models.registry import build_network, list_networks, register_network
from medimg.models.sam import builders  # noqa: F401 - registers sam_vit_b, medsam, litemedsam, ...
from medimg.models.sam3d import network  # noqa: F401 - registers medsam3d
from medimg.models.vit import mae  # noqa: F401 - registers mae_vit
from medimg.models.vit import network as vit_network  # noqa: F401 - registers vit_cls, vit_seg

__all__ = ["build_network", "list_networks", "register_network"]
