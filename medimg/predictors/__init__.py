"""Importable predictors (embedding caches, prompt handling, slice propagation)."""

from __future__ import annotations

from medimg.predictors.promptable import PromptablePredictor

__all__ = ["PromptablePredictor"]
