"""Convolutional segmenters from MONAI: ``segresnet`` (SegResNet) and ``dynunet`` (nnU-Net's U-Net).

Both are plain MONAI networks; the builders only choose CPU-sized defaults and, for ``dynunet``,
plan its kernels and strides the way nnU-Net does for isotropic data (halve every axis until the
feature map would drop below 4 voxels, at most ``levels`` times).
"""

from __future__ import annotations

from collections.abc import Sequence

from monai.networks.nets import DynUNet, SegResNet
from torch import nn

from medimg.models.registry import register_network


@register_network("segresnet")
def segresnet(in_channels: int = 1, out_channels: int = 3, init_filters: int = 16,
              blocks_down: Sequence[int] = (1, 2, 2, 4), blocks_up: Sequence[int] = (1, 1, 1),
              spatial_dims: int = 3, dropout_prob: float | None = None) -> nn.Module:
    """Build MONAI's ``SegResNet`` (Myronenko 2018, without the VAE branch).

    Args:
        in_channels: input channels.
        out_channels: classes including background.
        init_filters: width of the first stage (doubled at every downsampling).
        blocks_down: residual blocks per encoder stage (its length sets the depth).
        blocks_up: residual blocks per decoder stage (one fewer than ``blocks_down``).
        spatial_dims: 2 or 3.
        dropout_prob: dropout after the first convolution (``None``: none).
    """
    return SegResNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels,
                     init_filters=init_filters, blocks_down=tuple(blocks_down), blocks_up=tuple(blocks_up),
                     dropout_prob=dropout_prob)


def plan_dynunet(patch: Sequence[int], levels: int = 5, min_size: int = 4) -> tuple[list[int], list[int]]:
    """nnU-Net-style strides for an isotropic patch: halve while every axis stays >= ``min_size``.

    Returns:
        ``(kernels, strides)``, one entry per stage: kernel 3 everywhere, stride 1 for the first
        stage and 2 for each downsampling.
    """
    sizes, strides = list(patch), [1]
    while len(strides) < levels and all(s // 2 >= min_size for s in sizes):
        sizes = [s // 2 for s in sizes]
        strides.append(2)
    return [3] * len(strides), strides


@register_network("dynunet")
def dynunet(in_channels: int = 1, out_channels: int = 3, filters: Sequence[int] = (16, 32, 64, 128, 192),
            patch: Sequence[int] = (96, 96, 96), spatial_dims: int = 3, norm_name: str = "instance",
            res_block: bool = False) -> nn.Module:
    """Build MONAI's ``DynUNet`` with nnU-Net's planning for a ``patch``-sized input.

    Args:
        in_channels: input channels.
        out_channels: classes including background.
        filters: channels per stage; its length caps the number of stages.
        patch: the training patch (sets how often the network can downsample).
        spatial_dims: 2 or 3.
        norm_name: ``instance`` (nnU-Net's choice) or ``batch``.
        res_block: residual blocks instead of plain double convolutions.
    """
    kernels, strides = plan_dynunet(patch, levels=len(filters))
    return DynUNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels,
                   kernel_size=kernels, strides=strides, upsample_kernel_size=strides[1:],
                   filters=list(filters)[:len(strides)], norm_name=norm_name, res_block=res_block,
                   deep_supervision=False)
