"""timm ViT backbones (MAE, DINOv2), DVPT, classifier / segmenter heads and MAE pre-training."""

from __future__ import annotations

from medimg.models.vit.backbone import BackboneSpec, create_backbone, load_backbone_weights
from medimg.models.vit.dvpt import DVPT, attach_dvpt
from medimg.models.vit.network import ViTClassifier, ViTSegmenter, apply_vit_peft, layer_decay_groups

__all__ = ["BackboneSpec", "DVPT", "ViTClassifier", "ViTSegmenter", "apply_vit_peft", "attach_dvpt",
           "create_backbone", "layer_decay_groups", "load_backbone_weights"]
