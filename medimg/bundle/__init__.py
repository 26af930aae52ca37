"""MONAI bundle writing, verification and loading."""

from __future__ import annotations

from medimg.bundle.loader import BundlePredictor
from medimg.bundle.verify import find_schema, verify_bundle
from medimg.bundle.writer import write_bundle

__all__ = ["BundlePredictor", "find_schema", "verify_bundle", "write_bundle"]
