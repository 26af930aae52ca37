"""ViT classifier and segmenter over a timm backbone, with linear / full / LoRA / DVPT tuning.

``vit_cls`` and ``vit_seg`` are registered builders: configs and bundles name them. PEFT is applied
after the official backbone weights load, so checkpoints keep their key layout.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from medimg.errors import ConfigError
from medimg.models.registry import register_network
from medimg.models.vit.backbone import (
    BackboneSpec,
    ViTGeometry,
    create_backbone,
    feature_indices,
    load_backbone_weights,
)
from medimg.models.vit.dvpt import attach_dvpt

log = logging.getLogger(__name__)
PEFT_CHOICES = ("linear", "full", "lora", "dvpt")


class ViTClassifier(ViTGeometry, nn.Module):
    """Backbone -> pooled feature -> linear head.

    Args:
        backbone: a timm ``VisionTransformer`` built with ``num_classes=0``.
        num_classes: outputs (classes, or labels for multi-label).
        dropout: dropout before the head.
    """

    spatial_dims = 2

    def __init__(self, backbone: VisionTransformer, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.backbone = backbone
        self.head_drop = nn.Dropout(dropout)
        self.head = nn.Linear(backbone.num_features, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features (B, D) (kNN evaluation, linear probes)."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes)."""
        return self.head(self.head_drop(self.backbone(x)))


class ViTSegmenter(ViTGeometry, nn.Module):
    """UNETR-style progressive upsampling decoder over intermediate ViT features (2D).

    Token grids of evenly spaced blocks are upsampled by transposed convolutions to successive
    scales and merged top-down with skip connections (MONAI's UNETR blocks); the image itself
    feeds the full-resolution skip. Patch sizes that are not a power of two (DINOv2's 14) are
    bridged by resizing the token grids to ``img_size / 2**n``.

    Args:
        backbone: a timm ``VisionTransformer``.
        out_channels: classes including background.
        feature_size: channels at full resolution (doubling per level).
    """

    spatial_dims = 2

    def __init__(self, backbone: VisionTransformer, out_channels: int, feature_size: int = 16) -> None:
        super().__init__()
        self.backbone = backbone
        patch = backbone.patch_embed.patch_size[0]
        self.levels = n = max(int(round(math.log2(patch))), 1)
        side = backbone.patch_embed.img_size[0]
        if side % (2 ** n):
            raise ConfigError("model.img_size", f"the segmenter needs img_size divisible by {2 ** n}, got {side}")
        self.indices = feature_indices(len(backbone.blocks), n)
        dim, f = backbone.embed_dim, feature_size
        in_chans = backbone.patch_embed.proj.in_channels
        norm = "instance"
        self.skip0 = UnetrBasicBlock(2, in_chans, f, kernel_size=3, stride=1, norm_name=norm, res_block=True)
        self.skips = nn.ModuleList(
            UnetrPrUpBlock(2, dim, f * 2 ** j, num_layer=n - j - 1, kernel_size=3, stride=1, upsample_kernel_size=2,
                           norm_name=norm, conv_block=True, res_block=True) for j in range(1, n))
        chans = [f * 2 ** j for j in range(n)] + [dim]
        self.ups = nn.ModuleList(
            UnetrUpBlock(2, chans[j + 1], chans[j], kernel_size=3, upsample_kernel_size=2, norm_name=norm,
                         res_block=True) for j in range(n - 1, -1, -1))
        self.out = UnetOutBlock(2, f, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, out_channels, H, W) for images (B, C, H, W)."""
        unique = sorted(set(self.indices))
        grids = self.backbone.forward_intermediates(x, indices=unique, intermediates_only=True, output_fmt="NCHW")
        by_index = dict(zip(unique, grids, strict=True))
        bottom = tuple(s // 2 ** self.levels for s in x.shape[2:])
        feats = [by_index[i] if tuple(by_index[i].shape[2:]) == bottom else
                 F.interpolate(by_index[i], size=bottom, mode="bilinear", align_corners=False) for i in self.indices]
        skips = [self.skip0(x)] + [block(z) for block, z in zip(self.skips, feats[:-1], strict=True)]
        h = feats[-1]
        for up, skip in zip(self.ups, reversed(skips), strict=True):
            h = up(h, skip)
        return self.out(h)


def apply_vit_peft(network: nn.Module, peft: str, lora_r: int = 8, lora_alpha: int = 16, dvpt_shared: bool = False,
                   dvpt_bottleneck: int = 16, dvpt_prompts: int = 8) -> None:
    """Choose what trains in ``network.backbone``; everything outside the backbone (heads) trains.

    - ``linear``: the backbone is frozen (a linear probe for the classifier).
    - ``full``: everything trains (use layer-wise LR decay: :func:`layer_decay_groups`).
    - ``lora``: LoRA on the attention ``qkv`` through ``peft``; only LoRA trains in the backbone.
    - ``dvpt``: DVPT after every block, per layer or shared; only DVPT trains in the backbone.
    """
    if peft not in PEFT_CHOICES:
        raise ConfigError("model.peft", f"unknown peft {peft!r}; choose from {', '.join(PEFT_CHOICES)}")
    backbone = network.backbone
    if peft == "lora":
        from medimg.models.peft import apply_lora

        apply_lora(backbone, ["qkv"], r=lora_r, alpha=lora_alpha)
    elif peft == "dvpt":
        attach_dvpt(backbone, list(backbone.blocks), backbone.embed_dim, shared=dvpt_shared,
                    bottleneck=dvpt_bottleneck, num_prompts=dvpt_prompts)
    for name, param in network.named_parameters():
        if not name.startswith("backbone.") or peft == "full":
            param.requires_grad_(True)
        elif peft == "linear":
            param.requires_grad_(False)
        else:
            param.requires_grad_(("lora_" in name) if peft == "lora" else name.startswith("backbone.dvpt."))


def layer_decay_groups(network: nn.Module, lr: float, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW parameter groups with layer-wise LR decay (timm's grouping of ViT blocks).

    Block ``i`` (0-based) of ``L`` gets ``lr * layer_decay ** (L - 1 - i)``; the patch embedding,
    class token and position embedding ``lr * layer_decay ** L``; the final norm and the heads
    (outside the backbone) ``lr``. Biases and norms have no weight decay.
    """
    from timm.optim import param_groups_layer_decay

    groups = param_groups_layer_decay(network.backbone, weight_decay=weight_decay, layer_decay=layer_decay)
    out = [dict(g, params=[p for p in g["params"] if p.requires_grad]) for g in groups]
    out = [dict(g, lr=lr * g.get("lr_scale", 1.0)) for g in out if g["params"]]
    head = [p for n, p in network.named_parameters() if not n.startswith("backbone.") and p.requires_grad]
    out.append({"params": head, "lr": lr, "lr_scale": 1.0, "weight_decay": weight_decay})
    return out


def _backbone(backbone: str, size: str, img_size: int, in_chans: int, registers: bool, drop_path: float,
              pool: str, backbone_checkpoint: str | Path | None, backbone_format: str | None) -> VisionTransformer:
    model = create_backbone(BackboneSpec(backbone, size, img_size, in_chans, registers, drop_path, pool))
    if backbone_checkpoint:
        load_backbone_weights(model, backbone_checkpoint, backbone_format or backbone)
    return model


@register_network("vit_cls")
def build_vit_cls(backbone: str = "mae", size: str = "vit_b", img_size: int = 224, in_chans: int = 1,
                  num_classes: int = 2, registers: bool = False, drop_path: float = 0.0, pool: str = "token",
                  dropout: float = 0.0, peft: str = "full", lora_r: int = 8, lora_alpha: int = 16,
                  dvpt_shared: bool = False, dvpt_bottleneck: int = 16, dvpt_prompts: int = 8,
                  backbone_checkpoint: str | None = None, backbone_format: str | None = None) -> ViTClassifier:
    """A ViT classifier (``backbone_format`` defaults to the backbone family: mae / dinov2; or timm)."""
    net = ViTClassifier(_backbone(backbone, size, img_size, in_chans, registers, drop_path, pool,
                                  backbone_checkpoint, backbone_format), num_classes, dropout)
    apply_vit_peft(net, peft, lora_r, lora_alpha, dvpt_shared, dvpt_bottleneck, dvpt_prompts)
    return net


@register_network("vit_seg")
def build_vit_seg(backbone: str = "mae", size: str = "vit_b", img_size: int = 224, in_chans: int = 1,
                  out_channels: int = 2, registers: bool = False, drop_path: float = 0.0, feature_size: int = 16,
                  peft: str = "full", lora_r: int = 8, lora_alpha: int = 16, dvpt_shared: bool = False,
                  dvpt_bottleneck: int = 16, dvpt_prompts: int = 8, backbone_checkpoint: str | None = None,
                  backbone_format: str | None = None) -> ViTSegmenter:
    """A ViT segmenter with the UNETR-style decoder (``linear`` freezes the backbone, decoder trains)."""
    net = ViTSegmenter(_backbone(backbone, size, img_size, in_chans, registers, drop_path, "token",
                                 backbone_checkpoint, backbone_format), out_channels, feature_size)
    apply_vit_peft(net, peft, lora_r, lora_alpha, dvpt_shared, dvpt_bottleneck, dvpt_prompts)
    return net

