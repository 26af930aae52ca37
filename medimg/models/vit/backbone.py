"""timm ViT backbones for MAE (ViT-B/16) and DINOv2 (ViT-S/B/L /14, optional registers).

Architectures come from timm; weights load from local files in their official formats
(:mod:`medimg.models.weights.vit`) with a key report. Nothing downloads.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import timm
from timm.models.vision_transformer import VisionTransformer

from medimg.errors import ConfigError, WeightsError
from medimg.models.weights import KeyReport, load_with_report, read_checkpoint
from medimg.models.weights.vit import fit_vit_state, remap_dinov2, remap_mae, remap_timm

log = logging.getLogger(__name__)

# backbone -> size -> timm architecture (no weights are fetched: pretrained=False)
ARCHS: dict[str, dict[str, str]] = {
    "mae": {"vit_b": "vit_base_patch16_224", "vit_l": "vit_large_patch16_224", "vit_h": "vit_huge_patch14_224"},
    "dinov2": {"vit_s": "vit_small_patch14_dinov2", "vit_b": "vit_base_patch14_dinov2",
               "vit_l": "vit_large_patch14_dinov2"},
}
FORMATS = {"mae": remap_mae, "dinov2": remap_dinov2, "timm": remap_timm}
TIMM_CONVERTED = {"dinov2": ("mask_token", "register_tokens")}


@dataclass
class BackboneSpec:
    """What a backbone is: family, size and input geometry.

    Attributes:
        backbone: ``mae`` or ``dinov2``.
        size: ``vit_s``/``vit_b``/``vit_l``/``vit_h`` or ``tiny`` (depth 2, width 64, patch 8; tests).
        img_size: input side in pixels (a multiple of the patch size).
        in_chans: 1 (a slice) or 3 (2.5D: neighbouring slices, or RGB).
        registers: DINOv2 with 4 register tokens.
        drop_path: stochastic depth rate (fine-tuning recipe).
        pool: ``token`` (class token) or ``avg`` (mean of patch tokens, MAE fine-tuning).
    """

    backbone: str = "mae"
    size: str = "vit_b"
    img_size: int = 224
    in_chans: int = 1
    registers: bool = False
    drop_path: float = 0.0
    pool: str = "token"


def create_backbone(spec: BackboneSpec) -> VisionTransformer:
    """A timm ``VisionTransformer`` without a classifier (``num_classes=0``), randomly initialised."""
    if spec.backbone not in ARCHS:
        raise ConfigError("model.backbone", f"unknown backbone {spec.backbone!r}; choose mae or dinov2")
    if spec.pool not in ("token", "avg"):
        raise ConfigError("model.pool", f"unknown pooling {spec.pool!r}; choose token or avg")
    common = dict(img_size=spec.img_size, in_chans=spec.in_chans, num_classes=0, global_pool=spec.pool,
                  drop_path_rate=spec.drop_path)
    if spec.size == "tiny":
        model = VisionTransformer(patch_size=8, embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0,
                                  reg_tokens=4 if spec.registers else 0, no_embed_class=spec.registers,
                                  init_values=1e-5 if spec.backbone == "dinov2" else None, **common)
    else:
        archs = ARCHS[spec.backbone]
        if spec.size not in archs:
            raise ConfigError("model.size", f"{spec.backbone} comes in {', '.join(archs)} (or tiny)")
        name = archs[spec.size]
        if spec.registers:
            if spec.backbone != "dinov2":
                raise ConfigError("model.registers", "register tokens exist only for dinov2 backbones")
            name = name.replace("_dinov2", "_reg4_dinov2")
        model = timm.create_model(name, pretrained=False, **common)
    patch = model.patch_embed.patch_size[0]
    if spec.img_size % patch:
        raise ConfigError("model.img_size", f"{spec.img_size} is not a multiple of the patch size {patch}")
    return model


def load_backbone_weights(model: VisionTransformer, path: str | Path, fmt: str) -> KeyReport:
    """Load an official MAE / DINOv2 / timm file into a backbone and report every key.

    The position embedding is resampled to the model's grid and the patch embedding adapted to its
    input channels. Classifier heads in the file (``head.*``) are reported as unexpected.

    Raises:
        WeightsError: unknown format, unreadable file, or backbone keys left unloaded.
    """
    if fmt not in FORMATS:
        raise WeightsError(path, f"unknown backbone weight format {fmt!r}; choose {', '.join(FORMATS)}")
    remapped = FORMATS[fmt](read_checkpoint(path))
    state = fit_vit_state(remapped, model)
    report = load_with_report(model, state, source=str(path))
    # keys timm's filter consumed without a place in the model are unexpected too (MAE's decoder
    # mask_token), except what it converts by design (DINOv2's register tokens, training-only mask)
    report.unexpected += [k for k in remapped if k not in state and k not in TIMM_CONVERTED.get(fmt, ())]
    log.info("backbone weights %s (%s): %s", path, fmt, report.summary())
    missing = [k for k in report.missing if not k.startswith("fc_norm.")]  # avg pooling's fresh norm (MAE)
    if missing:
        raise WeightsError(path, f"{len(missing)} backbone tensors missing, e.g. {missing[0]}; "
                                 f"is this a {fmt} checkpoint of the same ViT size?")
    if not report.loaded:
        raise WeightsError(path, "no backbone tensor matched")
    return report


def feature_indices(depth: int, n: int = 4) -> list[int]:
    """``n`` evenly spaced block indices ending at the last block (UNETR's 3, 6, 9, 12 for depth 12).

    Shallow backbones repeat indices (depth 2, n 3: ``[0, 0, 1]``).
    """
    return [max(round(depth * (i + 1) / n) - 1, 0) for i in range(n)]


class ViTGeometry:
    """``in_chans`` and ``img_size`` of a network built around a timm ViT held as ``self.<vit_attr>``."""

    vit_attr = "backbone"

    @property
    def in_chans(self) -> int:
        """Input channels."""
        return int(getattr(self, self.vit_attr).patch_embed.proj.in_channels)

    @property
    def img_size(self) -> int:
        """Input side in pixels (the training tile for segmenters)."""
        return int(getattr(self, self.vit_attr).patch_embed.img_size[0])
