"""A volumetric image encoder built from a 2D SAM/MedSAM ViT (3DSAM-adapter style), reusing its weights.

- Patch embedding: the 2D ``Conv2d(3, C, p, p)`` is inflated to ``Conv3d(1, C, (d, p, p))``: its
  RGB weights are summed (a grey input is replicated to RGB in 2D) and spread evenly over ``d``
  slices, so a stack of identical slices embeds exactly like one 2D slice. With SAM's per-channel
  ImageNet normalisation (``normalization=(mean, std)``) the normalisation is folded into the
  inflated weights and bias, so the volume goes in as grey values in [0, 1] and the result is still
  exactly SAM's embedding of ``(255 g - mean_c) / std_c``.
- Position: the 2D absolute position embedding (interpolated to the in-plane grid) plus a learnable
  depth embedding that starts at zero.
- Blocks: the pretrained 2D blocks (frozen) attend *within each slice* (their windowed / global
  pattern and relative positions unchanged). Memory-saving alternative to attention over all 3D
  tokens (documented choice): cross-slice context comes from a 3D spatial adapter after every
  block -- a bottleneck with a depth-wise 3D convolution whose up projection starts at zero.
- Neck: the 2D neck per slice, giving ``(B, 256, D', H', W')`` features.

At initialisation, a volume of identical slices yields, on every slice, exactly the 2D encoder's
features: the reuse property the tests check. ``forward(x, return_layers=True)`` also returns the
outputs of the 2D model's global-attention blocks (multi-layer features for the 3D decoder).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT
from torch import nn
from torch.utils.checkpoint import checkpoint

from medimg.models.precision import Conv3dFP32


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
        self.conv = Conv3dFP32(hidden, hidden, kernel, padding=kernel // 2, groups=hidden)  # bf16: 60x slower backward
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
        normalization: SAM's per-channel ``(mean, std)`` on 0..255 input, folded into the patch
            embedding (``None`` for MedSAM's [0, 1] input).
        feature_layers: blocks whose outputs ``return_layers`` gives (default: the global-attention ones).
        train_patch_embed: let :meth:`freeze_pretrained` keep the patch embedding trainable.
    """

    def __init__(self, vit: ImageEncoderViT, depth_patch: int = 1, max_depth_tokens: int = 64,
                 adapter_ratio: float = 0.25, use_checkpoint: bool = False,
                 normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
                 feature_layers: tuple[int, ...] | None = None, train_patch_embed: bool = False) -> None:
        super().__init__()
        self.train_patch_embed = train_patch_embed
        conv2d = vit.patch_embed.proj
        dim, p = conv2d.out_channels, conv2d.kernel_size[0]
        self.patch = (depth_patch, p, p)
        self.patch_embed = nn.Conv3d(1, dim, kernel_size=self.patch, stride=self.patch)
        with torch.no_grad():
            w2d, bias = conv2d.weight, conv2d.bias.clone()
            if normalization is not None:  # x_c = (255 g - m_c) / s_c, folded into the weights
                mean = torch.as_tensor(normalization[0], dtype=w2d.dtype).view(1, -1, 1, 1)
                std = torch.as_tensor(normalization[1], dtype=w2d.dtype).view(1, -1, 1, 1)
                bias -= (w2d * mean / std).sum(dim=(1, 2, 3))
                w2d = w2d * 255.0 / std
            w = w2d.sum(dim=1, keepdim=True)  # (C, 1, p, p): grey replicated to RGB
            self.patch_embed.weight.copy_(w[:, :, None].repeat(1, 1, depth_patch, 1, 1) / depth_patch)
            self.patch_embed.bias.copy_(bias)
        self.pos_embed = vit.pos_embed  # (1, H, W, C), reused
        self.depth_embed = nn.Parameter(torch.zeros(1, max_depth_tokens, 1, 1, dim))
        self.blocks = vit.blocks
        self.adapters = nn.ModuleList(SpatialAdapter3D(dim, adapter_ratio) for _ in vit.blocks)
        self.neck = vit.neck
        self.use_checkpoint = use_checkpoint
        self.embed_dim = dim
        global_idx = tuple(i for i, b in enumerate(vit.blocks) if b.window_size == 0)
        self.feature_layers = tuple(feature_layers if feature_layers is not None else global_idx)

    def freeze_pretrained(self) -> None:
        """3DSAM-adapter training: only adapters, norms and the depth embedding (+ ``train_patch_embed``) train."""
        trainable = ("adapters.", "depth_embed") + (("patch_embed",) if self.train_patch_embed else ())
        for name, param in self.named_parameters():
            param.requires_grad_(name.startswith(trainable) or ".norm" in name)

    def _in_plane_pos(self, h: int, w: int) -> torch.Tensor:
        pos = self.pos_embed
        if pos.shape[1:3] != (h, w):
            pos = F.interpolate(pos.permute(0, 3, 1, 2), size=(h, w), mode="bicubic",
                                align_corners=False).permute(0, 2, 3, 1)
        return pos

    def forward(self, x: torch.Tensor, return_layers: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """``(B, 1, D, H, W)`` -> ``(B, 256, D/d, H/p, W/p)``.

        With ``return_layers`` also the token maps ``(B, C, D/d, H/p, W/p)`` after the blocks in
        ``feature_layers`` (the global-attention blocks by default).
        """
        if x.shape[1] != 1:
            raise ValueError(f"expected a single-channel volume (B, 1, D, H, W), got {tuple(x.shape)}")
        t = self.patch_embed(x).permute(0, 2, 3, 4, 1)  # (B, D, H, W, C)
        b, d, h, w, c = t.shape
        if d > self.depth_embed.shape[1]:
            raise ValueError(f"{d} depth tokens exceed max_depth_tokens={self.depth_embed.shape[1]}")
        t = t + self._in_plane_pos(h, w)[:, None] + self.depth_embed[:, :d]
        layers = []
        for i, (block, adapter) in enumerate(zip(self.blocks, self.adapters)):
            flat = t.reshape(b * d, h, w, c)  # every slice attends within itself, as in 2D
            if self.use_checkpoint and self.training:
                flat = checkpoint(block, flat, use_reentrant=False)
            else:
                flat = block(flat)
            t = adapter(flat.reshape(b, d, h, w, c))
            if return_layers and i in self.feature_layers:
                layers.append(t.permute(0, 4, 1, 2, 3))
        out = self.neck(t.reshape(b * d, h, w, c).permute(0, 3, 1, 2))  # (B*D, 256, H, W)
        out = out.reshape(b, d, *out.shape[1:]).permute(0, 2, 1, 3, 4)
        return (out, layers) if return_layers else out
