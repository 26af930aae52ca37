"""Reading, manifests, transform pipelines, embedded datasets and data modules."""

from __future__ import annotations

from medimg.data.io import Image, MedimgReader, read_image, write_like

__all__ = ["Image", "MedimgReader", "read_image", "write_like"]
