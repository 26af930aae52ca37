"""Importable predictors (embedding caches, prompt handling, slice propagation, 3D windows)."""

from __future__ import annotations

from medimg.predictors.promptable import PromptablePredictor
from medimg.predictors.volumetric import VolumePromptPredictor

__all__ = ["PromptablePredictor", "VolumePromptPredictor"]
