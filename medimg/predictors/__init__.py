"""Predictors, one module per kind, declared by the Protocols in :mod:`medimg.predictors.protocols`."""

from __future__ import annotations

from medimg.predictors.classification import ClassificationPredictor
from medimg.predictors.promptable import PromptablePredictor
from medimg.predictors.segmentation import SegmentationPredictor
from medimg.predictors.volumetric import VolumePromptPredictor

__all__ = ["ClassificationPredictor", "PromptablePredictor", "SegmentationPredictor", "VolumePromptPredictor"]
