"""A volumetric image encoder built from a 2D SAM/MedSAM ViT (3DSAM-adapter style), reusing its weights.

- Patch embedding: the 2D ``Conv2d(3, C, p, p)`` is inflated to ``Conv3d(1, C, (p, p, d))``: its
  RGB weights are summed (a grey input is replicated to RGB in 2D) and spread evenly over ``d``
  slices, so a stack of identical slices embeds exactly like one 2D slice.
- Position: the 2D absolute position embedding (interpolated to the in-plane grid) plus a learnable
  depth embedding that starts at zero.
- Blocks: the pretrained 2D blocks (frozen) attend *within each slice* (their windowed / global
  pattern and relative positions unchanged). Memory-saving alternative to attention over all 3D
  tokens (documented choice): cross-slice context comes from a 3D spatial adapter after every
  block -- a bottleneck with a depth-wise 3D convolution whose up projection starts at zero.
- Neck: the 2D neck per slice, giving ``(B, 256, D', H', W')`` features.

At initialisation, a volume of identical slices yields, on every slice, exactly the 2D encoder's
features: the reuse property the tests check.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT
from torch import nn
from torch.utils.checkpoint import checkpoint


class SpatialAdapter3D(nn.Module):
    """``x + up(dwconv3d(gelu(down(x))))`` on ``(B, D, H, W, C)`` tokens; ``up`` is zero-initialised.

    Args:
        dim: token width.
        ratio: bottleneck width / ``dim``.
        kernel: depth-wise 3D convolution kernel.
    """

    def __init__(self, dim: int, ratio: float = 0.25, kernel: int = 3) -> None:
        super().__init__()
        hidden = max(int(dim * ratio), 1)
        self.down = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.conv = nn.Conv3d(hidden, hidden, kernel, padding=kernel // 2, groups=hidden)
        self.up = nn.Linear(hidden, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual adapter over ``(B, D, H, W, C)``."""
        h = self.act(self.down(x)).permute(0, 4, 1, 2, 3)  # (B, c, D, H, W)
        h = self.conv(h).permute(0, 2, 3, 4, 1)
        return x + self.up(h)


class VolumetricSAMEncoder(nn.Module):
    """3D encoder over ``(B, 1, D, H, W)`` volumes from a 2D ``ImageEncoderViT``.

    Args:
        vit: the 2D SAM/MedSAM image encoder (its pretrained weights are reused, not copied).
        depth_patch: slices per depth token.
        max_depth_tokens: length of the learnable depth embedding.
        adapter_ratio: 3D adapter bottleneck width / token width.
        use_checkpoint: gradient checkpointing through the blocks.
    """

    def __init__(self, vit: ImageEncoderViT, depth_patch: int = 1, max_depth_tokens: int = 64,
                 adapter_ratio: float = 0.25, use_checkpoint: bool = False) -> None:
        super().__init__()
        conv2d = vit.patch_embed.proj
        dim, p = conv2d.out_channels, conv2d.kernel_size[0]
        self.patch = (depth_patch, p, p)
        self.patch_embed = nn.Conv3d(1, dim, kernel_size=self.patch, stride=self.patch)
        with torch.no_grad():
            w = conv2d.weight.sum(dim=1, keepdim=True)  # (C, 1, p, p): grey replicated to RGB
            self.patch_embed.weight.copy_(w[:, :, None].repeat(1, 1, depth_patch, 1, 1) / depth_patch)
            self.patch_embed.bias.copy_(conv2d.bias)
        self.pos_embed = vit.pos_embed  # (1, H, W, C), reused
        self.depth_embed = nn.Parameter(torch.zeros(1, max_depth_tokens, 1, 1, dim))
        self.blocks = vit.blocks
        self.adapters = nn.ModuleList(SpatialAdapter3D(dim, adapter_ratio) for _ in vit.blocks)
        self.neck = vit.neck
        self.use_checkpoint = use_checkpoint
        self.embed_dim = dim

    def freeze_pretrained(self) -> None:
        """3DSAM-adapter training: only adapters, normalisation layers, depth embedding and patch embedding train."""
        for name, param in self.named_parameters():
            param.requires_grad_(name.startswith(("adapters.", "depth_embed", "patch_embed")) or ".norm" in name)

    def _in_plane_pos(self, h: int, w: int) -> torch.Tensor:
        pos = self.pos_embed
        if pos.shape[1:3] != (h, w):
            pos = F.interpolate(pos.permute(0, 3, 1, 2), size=(h, w), mode="bicubic",
                                align_corners=False).permute(0, 2, 3, 1)
        return pos

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1, D, H, W)`` -> ``(B, 256, D/d, H/p, W/p)``."""
        if x.shape[1] != 1:
            raise ValueError(f"expected a single-channel volume (B, 1, D, H, W), got {tuple(x.shape)}")
        t = self.patch_embed(x).permute(0, 2, 3, 4, 1)  # (B, D, H, W, C)
        b, d, h, w, c = t.shape
        if d > self.depth_embed.shape[1]:
            raise ValueError(f"{d} depth tokens exceed max_depth_tokens={self.depth_embed.shape[1]}")
        t = t + self._in_plane_pos(h, w)[:, None] + self.depth_embed[:, :d]
        for block, adapter in zip(self.blocks, self.adapters):
            flat = t.reshape(b * d, h, w, c)  # every slice attends within itself, as in 2D
            if self.use_checkpoint and self.training:
                flat = checkpoint(block, flat, use_reentrant=False)
            else:
                flat = block(flat)
            t = adapter(flat.reshape(b, d, h, w, c))
        out = self.neck(t.reshape(b * d, h, w, c).permute(0, 3, 1, 2))  # (B*D, 256, H, W)
        return out.reshape(b, d, *out.shape[1:]).permute(0, 2, 1, 3, 4)
