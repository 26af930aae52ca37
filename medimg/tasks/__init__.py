"""LightningModules. They receive a network; they never build one inline."""

from __future__ import annotations

from medimg.tasks.segmentation import SegmentationTask

__all__ = ["SegmentationTask"]
