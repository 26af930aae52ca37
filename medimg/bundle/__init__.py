"""MONAI bundle writing, verification and loading.

Names are imported on first use: reading a bundle's metadata (``bundle_task``) must not import
MONAI and PyTorch, so a command-line mistake is reported before either loads.
"""

from __future__ import annotations

from medimg.lazy import lazy_attributes

_API = {
    "bundle_task": "medimg.bundle.loader",
    "export_run": "medimg.bundle.export",
    "load_bundle": "medimg.bundle.loader",
    "load_bundle_network": "medimg.bundle.loader",
    "find_schema": "medimg.bundle.verify",
    "verify_bundle": "medimg.bundle.verify",
    "write_bundle": "medimg.bundle.writer",
}
__all__ = sorted(_API)

__getattr__ = lazy_attributes(__name__, _API)
