"""MONAI bundle writing, verification and loading."""

from __future__ import annotations

from medimg.bundle.loader import bundle_task, load_bundle, load_bundle_network
from medimg.bundle.verify import find_schema, verify_bundle
from medimg.bundle.writer import write_bundle

__all__ = ["bundle_task", "find_schema", "load_bundle", "load_bundle_network", "verify_bundle", "write_bundle"]
