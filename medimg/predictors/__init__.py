"""Predictors, one module per kind, declared by the Protocols in :mod:`medimg.predictors.protocols`.

Each predictor is imported on first use, so loading a segmentation bundle does not import the
classification stack (Lightning) or segment-anything.
"""

from __future__ import annotations

from medimg.lazy import lazy_attributes

_API = {
    "ClassificationPredictor": "medimg.predictors.classification",
    "PromptablePredictor": "medimg.predictors.promptable",
    "SegmentationPredictor": "medimg.predictors.segmentation",
    "VolumePromptPredictor": "medimg.predictors.volumetric",
}
__all__ = sorted(_API)

__getattr__ = lazy_attributes(__name__, _API)
