"""3D prompt encoder and lightweight 3D mask decoder for :class:`PromptableSAM3D`.

Tensors are in MONAI's layout ``(B, C, X, Y, Z)`` and prompt coordinates are voxel indices
``(i, j, k)`` of the input patch, the prompts-JSON convention.

- :class:`PromptEncoder3D`: random-Fourier positional encoding of 3D coordinates (SAM's scheme
  in three dimensions), learned embeddings for positive / negative points, the two box corners
  (the 3DSAM-adapter reference has no boxes) and padding, and a dense embedding of a previous
  mask (iterative correction).
- :class:`MaskDecoder3D`: the encoder's neck output and its intermediate (global-attention)
  layers are aggregated at token resolution; segment-anything's ``TwoWayTransformer`` lets the
  prompt tokens and the 3D image tokens attend to each other; then a progressive ``x2``
  transposed-convolution path with skips at every scale returns to the full input resolution,
  where a hypernetwork from the mask token gives the mask logits. An IoU head predicts the mask's
  quality. The skips see a *guide*: the image plus full-resolution prompt maps (Gaussian maps of
  positive and negative clicks, the box region, the previous mask), the click-map encoding of
  interactive segmentation networks. Tokens are 16 voxels wide; without the guide a click could
  not localise anything finer than a token.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from segment_anything.modeling import TwoWayTransformer
from torch import nn

from medimg.models.precision import InstanceNorm3dFP32


class PromptEncoder3D(nn.Module):
    """Sparse (points, boxes) and dense (mask) prompt embeddings for volumes.

    Args:
        embed_dim: token width (256, as SAM's decoder).
        scale: standard deviation of the random Fourier frequencies.
    """

    def __init__(self, embed_dim: int = 256, scale: float = 1.0) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.register_buffer("gaussian", scale * torch.randn(3, embed_dim // 2))
        # 0 negative point, 1 positive point, 2 box low corner, 3 box high corner
        self.point_embeddings = nn.Embedding(4, embed_dim)
        self.not_a_point = nn.Embedding(1, embed_dim)
        self.mask_embed = nn.Sequential(nn.Conv3d(1, embed_dim // 8, 1), nn.GELU(),
                                        nn.Conv3d(embed_dim // 8, embed_dim, 1))
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def encode_coords(self, coords: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
        """Fourier features of ``(..., 3)`` voxel coordinates in a volume of ``size``."""
        norm = (coords + 0.5) / torch.as_tensor(size, dtype=coords.dtype, device=coords.device)
        proj = (2 * norm - 1) @ self.gaussian.to(coords.dtype) * (2 * math.pi)
        return torch.cat([proj.sin(), proj.cos()], dim=-1)

    def dense_pe(self, grid: tuple[int, int, int], size: tuple[int, int, int]) -> torch.Tensor:
        """``(1, C, *grid)`` encoding of the token centres of a ``grid`` over a volume of ``size``."""
        dev = self.gaussian.device
        axes = [(torch.arange(g, device=dev, dtype=torch.float32) + 0.5) * (s / g) - 0.5 for g, s in zip(grid, size)]
        coords = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
        return self.encode_coords(coords, size).permute(3, 0, 1, 2)[None]

    def forward(self, size: tuple[int, int, int], grid: tuple[int, int, int], batch: int,
                points: tuple[torch.Tensor, torch.Tensor] | None = None, boxes: torch.Tensor | None = None,
                masks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed the prompts.

        Args:
            size: the input volume's spatial size.
            grid: the image-token grid.
            batch: batch size.
            points: ``(coords (B, N, 3), labels (B, N))``; labels 1 positive, 0 negative, -1 padding.
            boxes: ``(B, 6)`` boxes ``[i0, j0, k0, i1, j1, k1]``.
            masks: ``(B, 1, X, Y, Z)`` previous mask logits.

        Returns:
            ``(sparse (B, N_tokens, C), dense (B, C, *grid))``.
        """
        tokens = []
        if points is not None:
            coords, labels = points
            emb = self.encode_coords(coords.float(), size)
            emb = torch.where((labels == -1)[..., None], self.not_a_point.weight.expand_as(emb), emb)
            emb = emb + self.point_embeddings.weight[labels.clamp(min=0).long()] * (labels != -1)[..., None]
            tokens.append(emb)
        if boxes is not None:
            corners = self.encode_coords(boxes.float().reshape(-1, 2, 3), size)
            tokens.append(corners + self.point_embeddings.weight[2:4])
        # no prompt at all: no sparse tokens (as in SAM); the decoder's own tokens still run
        sparse = torch.cat(tokens, dim=1) if tokens else self.point_embeddings.weight.new_zeros(batch, 0,
                                                                                               self.embed_dim)
        if masks is not None:
            dense = self.mask_embed(F.interpolate(masks, size=grid, mode="trilinear", align_corners=False))
        else:
            dense = self.no_mask_embed.weight.view(1, -1, 1, 1, 1).expand(batch, -1, *grid)
        return sparse, dense


GUIDE_CHANNELS = 5  # image, positive clicks, negative clicks, box region, previous mask


def prompt_guide(image: torch.Tensor, points: tuple[torch.Tensor, torch.Tensor] | None,
                 boxes: torch.Tensor | None, masks: torch.Tensor | None, sigma: float = 4.0) -> torch.Tensor:
    """``(B, 5, X, Y, Z)``: the image and full-resolution maps of the prompts.

    Clicks become ``exp(-d^2 / 2 sigma^2)`` maps (max over clicks of each sign), a box its filled
    region, a previous mask its sigmoid.
    """
    b, _, *size = image.shape
    dev, dtype = image.device, image.dtype
    axes = [torch.arange(n, device=dev, dtype=dtype) for n in size]
    maps = torch.zeros(b, 4, *size, device=dev, dtype=dtype)
    if points is not None:
        coords, labels = points
        for sign, channel in ((1, 0), (0, 1)):
            for i in range(b):
                sel = coords[i][labels[i] == sign].to(dtype)
                if len(sel):
                    d2 = sum((axes[a].view([-1 if j == a else 1 for j in range(3)])[None] -
                              sel[:, a].view(-1, 1, 1, 1)) ** 2 for a in range(3))
                    maps[i, channel] = torch.exp(-d2 / (2 * sigma**2)).amax(dim=0)
    if boxes is not None:
        for i in range(b):
            lo, hi = boxes[i, :3], boxes[i, 3:]
            inside = [(axes[a] >= lo[a] - 0.5) & (axes[a] <= hi[a] + 0.5) for a in range(3)]
            maps[i, 2] = (inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :]).to(dtype)
    if masks is not None:
        maps[:, 3] = torch.sigmoid(masks[:, 0].to(dtype))
    return torch.cat([image, maps], dim=1)


class _UpStage(nn.Module):
    """``x2`` transposed convolution + a skip from the prompt guide at the new resolution."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose3d(cin, cout, kernel_size=2, stride=2)
        self.skip = nn.Conv3d(GUIDE_CHANNELS, cout, kernel_size=3, padding=1)
        self.fuse = nn.Sequential(InstanceNorm3dFP32(cout, affine=True), nn.GELU(),
                                  nn.Conv3d(cout, cout, kernel_size=3, padding=1))

    def forward(self, x: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        g = F.adaptive_avg_pool3d(guide, x.shape[2:]) if guide.shape[2:] != x.shape[2:] else guide
        return x + self.fuse(x + self.skip(g))


class MaskDecoder3D(nn.Module):
    """Lightweight 3D mask decoder with multi-layer feature aggregation and full-resolution output.

    Args:
        layer_dims: widths of the intermediate encoder layers that are aggregated.
        patch: the encoder's patch size per axis ``(px, py, pz)`` (powers of two).
        embed_dim: token width.
        depth: ``TwoWayTransformer`` depth.
        mlp_dim: its MLP width.
        min_channels: narrowest channel count on the upsampling path.
    """

    def __init__(self, layer_dims: list[int], patch: tuple[int, int, int], embed_dim: int = 256, depth: int = 2,
                 mlp_dim: int = 1024, min_channels: int = 16) -> None:
        super().__init__()
        self.layer_proj = nn.ModuleList(nn.Conv3d(c, embed_dim, 1) for c in layer_dims)
        self.aggregate = nn.Sequential(InstanceNorm3dFP32(embed_dim, affine=True), nn.GELU(),
                                       nn.Conv3d(embed_dim, embed_dim, 1))
        self.transformer = TwoWayTransformer(depth=depth, embedding_dim=embed_dim, mlp_dim=mlp_dim, num_heads=8)
        self.iou_token = nn.Embedding(1, embed_dim)
        self.mask_token = nn.Embedding(1, embed_dim)
        steps = [int(math.log2(p)) for p in patch]
        if any(2 ** s != p for s, p in zip(steps, patch)):
            raise ValueError(f"3D decoder needs power-of-two patch sizes, got {patch}")
        self.factors = [tuple(2 if s > i else 1 for s in steps) for i in range(max(steps))]
        chans = [embed_dim] + [max(embed_dim // 2 ** (i + 1), min_channels) for i in range(len(self.factors))]
        self.stages = nn.ModuleList(_UpStage(chans[i], chans[i + 1]) for i in range(len(self.factors)))
        for stage, f in zip(self.stages, self.factors):  # anisotropic patches: x2 only where needed
            stage.up = nn.ConvTranspose3d(stage.up.in_channels, stage.up.out_channels, kernel_size=f, stride=f)
        out = chans[-1]
        self.hyper = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.GELU(), nn.Linear(embed_dim, out))
        self.iou_head = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.GELU(), nn.Linear(embed_dim, 1))

    def forward(self, embedding: torch.Tensor, layers: list[torch.Tensor], guide: torch.Tensor,
                image_pe: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask logits ``(B, 1, X, Y, Z)`` at the input's resolution and predicted IoU ``(B, 1)``.

        Args:
            embedding: ``(B, C, *grid)`` encoder output.
            layers: intermediate encoder layers on the same grid.
            guide: ``(B, 5, X, Y, Z)`` from :func:`prompt_guide`.
            image_pe: ``(1, C, *grid)`` positional encoding of the tokens.
            sparse: ``(B, N, C)`` prompt tokens.
            dense: ``(B, C, *grid)`` mask-prompt embedding.
        """
        x = embedding
        for proj, feat in zip(self.layer_proj, layers):
            x = x + proj(feat)
        x = self.aggregate(x) + dense
        b, c, *grid = x.shape
        tokens = torch.cat([self.iou_token.weight, self.mask_token.weight], dim=0)[None].expand(b, -1, -1)
        tokens = torch.cat([tokens, sparse.to(tokens.dtype)], dim=1)
        pe = image_pe.expand(b, -1, -1, -1, -1).to(x.dtype)
        # the transformer reads (B, C, h, w) and flattens it: hand it the 3D tokens as (B, C, N, 1)
        hs, src = self.transformer(x.reshape(b, c, -1, 1), pe.reshape(b, c, -1, 1), tokens)
        x = src.transpose(1, 2).reshape(b, c, *grid)
        for stage in self.stages:
            x = stage(x, guide.to(x.dtype))
        weights = self.hyper(hs[:, 1])  # (B, out)
        logits = torch.einsum("bc,bcxyz->bxyz", weights, x)[:, None]
        return logits, self.iou_head(hs[:, 0])
