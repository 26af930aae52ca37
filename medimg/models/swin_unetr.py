"""MONAI Swin-UNETR, optionally initialised from the self-supervised ``model_swinvit.pt``."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from monai.networks.nets import SwinUNETR
from torch import nn

from medimg.models.registry import register_network
from medimg.models.weights import load_pretrained

log = logging.getLogger(__name__)


@register_network("swin_unetr")
def swin_unetr(in_channels: int = 1, out_channels: int = 3, feature_size: int = 48,
               depths: Sequence[int] = (2, 2, 2, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
               spatial_dims: int = 3, use_checkpoint: bool = False, use_v2: bool = False,
               pretrained: str | Path | None = None, pretrained_format: str = "swin_ssl") -> nn.Module:
    """Build a ``SwinUNETR``.

    Args:
        in_channels: input channels.
        out_channels: classes including background.
        feature_size: embedding width (48 matches the released SSL weights).
        depths: blocks per stage.
        num_heads: attention heads per stage.
        spatial_dims: 2 or 3.
        use_checkpoint: gradient checkpointing.
        use_v2: Swin-UNETR v2 (residual convolution blocks per stage).
        pretrained: local ``model_swinvit.pt`` to initialise the encoder from.
        pretrained_format: its key layout.
    """
    net = SwinUNETR(in_channels=in_channels, out_channels=out_channels, feature_size=feature_size,
                    depths=tuple(depths), num_heads=tuple(num_heads), spatial_dims=spatial_dims,
                    use_checkpoint=use_checkpoint, use_v2=use_v2)
    if pretrained:
        report = load_pretrained(net, pretrained, pretrained_format)
        enc_missing = report.missing_under("swinViT.")
        log.info("loaded %s: %s; encoder keys missing: %d", pretrained, report.summary(), len(enc_missing))
        net.pretrained_report = report  # type: ignore[attr-defined]
    return net
