"""medimg: adapt medical-imaging foundation models and ship them as MONAI bundles."""

from __future__ import annotations

__version__ = "0.1.0"
