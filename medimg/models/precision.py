"""Layers that stay in float32 under autocast, with the parameters and state-dict keys of the plain layer."""

from __future__ import annotations

import torch
from torch import nn


class Float32Forward:
    """Mixin: run the layer in float32 when its input is not (autocast off inside), cast the result back.

    For the layers whose reduced-precision kernels are the slow ones: in bf16, cuDNN leaves
    instance norm to PyTorch's native batch-norm kernels and runs a depth-wise 3D convolution's
    backward pass about 60 times slower than in float32 (``medsam3d``'s adapters; BENCHMARKS.md).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if x.dtype == torch.float32:
            return super().forward(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return super().forward(x.float()).to(x.dtype)


class InstanceNorm3dFP32(Float32Forward, nn.InstanceNorm3d):
    """``nn.InstanceNorm3d``, computed in float32."""


class Conv3dFP32(Float32Forward, nn.Conv3d):
    """``nn.Conv3d``, computed in float32 (for depth-wise 3D convolutions)."""
