"""SAM / MedSAM / LiteMedSAM networks, their preprocessing and parameter-efficient fine-tuning."""

from __future__ import annotations

from medimg.models.sam.builders import VIT_CONFIGS, build_litemedsam, build_medsam, build_sam
from medimg.models.sam.network import PromptableSAM

__all__ = ["VIT_CONFIGS", "PromptableSAM", "build_litemedsam", "build_medsam", "build_sam"]
