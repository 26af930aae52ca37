"""``PromptableSAM3D``: volumetric promptable segmentation from a 2D SAM/MedSAM (3DSAM-adapter style).

The network works in MONAI's layout: input ``(B, 1, X, Y, Z)`` grey values in [0, 1] (the bundle's
intensity preset), prompts as voxel indices ``(i, j, k)`` of that input, output mask logits
``(B, 1, X, Y, Z)`` at full resolution. The encoder treats ``Z`` as its depth axis (slices are
``X x Y`` planes, axial for RAS volumes).

``build_medsam3d`` builds the 2D SAM/MedSAM first -- so an official ``sam_vit_b_01ec64.pth`` or
``medsam_vit_b.pth`` loads key for key, with a key report -- and then inflates its image encoder.
The 2D prompt encoder and mask decoder are not used: points and boxes in 3D need their own.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from medimg.errors import ConfigError
from medimg.models.registry import register_network
from medimg.models.sam3d.encoder import VolumetricSAMEncoder
from medimg.models.sam3d.heads import MaskDecoder3D, PromptEncoder3D, prompt_guide

log = logging.getLogger(__name__)


@dataclass
class VolumeFeatures:
    """What the encoder hands the decoder: neck output, intermediate layers and the input itself."""

    embedding: torch.Tensor
    layers: list[torch.Tensor]
    image: torch.Tensor


class PromptableSAM3D(nn.Module):
    """Volumetric encoder + 3D prompt encoder + 3D mask decoder.

    Args:
        image_encoder: the inflated 2D SAM encoder.
        prompt_encoder: 3D point/box/mask prompt encoder.
        mask_decoder: 3D mask decoder.
        family: ``sam`` or ``medsam`` (the source weights; the input is [0, 1] either way).
    """

    spatial_dims = 3

    def __init__(self, image_encoder: VolumetricSAMEncoder, prompt_encoder: PromptEncoder3D,
                 mask_decoder: MaskDecoder3D, family: str = "medsam") -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.family = family
        dp, p, _ = image_encoder.patch
        self.patch = (p, p, dp)  # MONAI layout: X, Y in-plane, Z depth

    def check_size(self, size: tuple[int, ...]) -> None:
        """Raise unless a spatial size is a whole number of patches."""
        if any(s % p for s, p in zip(size, self.patch)):
            raise ValueError(f"volume size {tuple(size)} must be a multiple of the patch {self.patch}")

    def encode(self, x: torch.Tensor) -> VolumeFeatures:
        """``(B, 1, X, Y, Z)`` -> token features ``(B, 256, X/p, Y/p, Z/d)`` (+ layers, + the input)."""
        self.check_size(tuple(x.shape[2:]))
        emb, layers = self.image_encoder(x.permute(0, 1, 4, 2, 3), return_layers=True)  # encoder: (B,1,Z,X,Y)
        to_monai = (0, 1, 3, 4, 2)
        return VolumeFeatures(emb.permute(to_monai), [f.permute(to_monai) for f in layers], x)

    def decode(self, features: VolumeFeatures, points: tuple[torch.Tensor, torch.Tensor] | None = None,
               boxes: torch.Tensor | None = None, masks: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> ``(mask logits (B, 1, X, Y, Z), predicted IoU (B, 1))``.

        Args:
            features: from :meth:`encode`.
            points: ``(coords (B, N, 3) voxel (i, j, k), labels (B, N))`` with 1/0, -1 padding.
            boxes: ``(B, 6)`` ``[i0, j0, k0, i1, j1, k1]``.
            masks: ``(B, 1, X, Y, Z)`` previous logits (iterative correction).
        """
        size = tuple(features.image.shape[2:])
        grid = tuple(features.embedding.shape[2:])
        sparse, dense = self.prompt_encoder(size, grid, features.embedding.shape[0], points, boxes, masks)
        pe = self.prompt_encoder.dense_pe(grid, size)
        guide = prompt_guide(features.image, points, boxes, masks)
        return self.mask_decoder(features.embedding, features.layers, guide, pe, sparse, dense)

    def forward(self, x: torch.Tensor, points: tuple[torch.Tensor, torch.Tensor] | None = None,
                boxes: torch.Tensor | None = None, masks: torch.Tensor | None = None) -> torch.Tensor:
        """Full-resolution mask logits for ``x`` and its prompts (differentiable end to end)."""
        return self.decode(self.encode(x), points, boxes, masks)[0]

    def mask_size(self, target: torch.Tensor) -> tuple[int, ...]:
        """The size the training targets take: the input's own (the decoder is full resolution)."""
        return tuple(target.shape[2:])


@register_network("medsam3d")
def build_medsam3d(size: str = "tiny", family: str = "medsam", checkpoint: str | Path | None = None,
                   img_size: int | None = None, depth_patch: int | None = None, max_depth_tokens: int = 64,
                   adapter_ratio: float = 0.25, use_checkpoint: bool = False, train_patch_embed: bool = False,
                   decoder_depth: int = 2, decoder_mlp_dim: int = 1024, pretrained: bool | None = None
                   ) -> PromptableSAM3D:
    """3D promptable SAM from a SAM/MedSAM ViT (``vit_b``/``vit_l``/``vit_h``, or ``tiny`` for tests).

    Args:
        size: ViT size.
        family: ``medsam`` (``medsam_vit_b.pth``, [0, 1] input) or ``sam`` (``sam_vit_*.pth``;
            ImageNet normalisation folded into the inflated patch embedding).
        checkpoint: the official 2D checkpoint; its image encoder is reused (key report logged).
        img_size: the 2D model's input size, which sets its position-embedding grid and global
            relative positions (1024 for official weights; default 1024, 256 for ``tiny``).
        depth_patch: slices per depth token (default: the in-plane patch, 16: isotropic tokens).
        max_depth_tokens: length of the learnable depth embedding.
        adapter_ratio: 3D spatial adapter bottleneck width / token width.
        use_checkpoint: gradient checkpointing through the encoder blocks.
        train_patch_embed: also train the inflated patch embedding under ``spatial_adapters``.
        decoder_depth: two-way transformer depth of the 3D decoder.
        decoder_mlp_dim: its MLP width.
        pretrained: must not be true (no package ships SAM/MedSAM weights); use ``checkpoint``.
    """
    from medimg.models.sam.builders import VIT_CONFIGS, build_sam
    from medimg.models.sam.network import IMAGENET_MEAN, IMAGENET_STD

    if family not in ("sam", "medsam"):
        raise ConfigError("model.family", f"medsam3d builds from sam or medsam weights, not {family!r}")
    if size not in VIT_CONFIGS:
        raise ConfigError("model.size", f"unknown SAM size {size!r}; choose from {', '.join(VIT_CONFIGS)}")
    img_size = img_size or (256 if size == "tiny" else 1024)
    net2d = build_sam(size=size, img_size=img_size, checkpoint=checkpoint, family=family, pretrained=pretrained)
    patch = net2d.image_encoder.patch_embed.proj.kernel_size[0]
    encoder = VolumetricSAMEncoder(net2d.image_encoder, depth_patch=depth_patch or patch,
                                   max_depth_tokens=max_depth_tokens, adapter_ratio=adapter_ratio,
                                   use_checkpoint=use_checkpoint,
                                   normalization=(IMAGENET_MEAN, IMAGENET_STD) if family == "sam" else None,
                                   train_patch_embed=train_patch_embed)
    dim = encoder.embed_dim
    decoder = MaskDecoder3D([dim] * len(encoder.feature_layers), (patch, patch, depth_patch or patch),
                            depth=decoder_depth, mlp_dim=decoder_mlp_dim)
    net = PromptableSAM3D(encoder, PromptEncoder3D(256), decoder, family=family)
    if hasattr(net2d, "pretrained_report"):
        net.pretrained_report = net2d.pretrained_report  # type: ignore[attr-defined]
    return net
