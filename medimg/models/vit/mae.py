"""Masked-autoencoder pre-training around a timm ViT encoder (He et al.; the thorax MAE recipe).

The encoder sees only the visible patches (a random ``1 - mask_ratio`` share, default 10%); a
light transformer decoder reconstructs the pixels of the masked patches, each normalised by its
own mean and variance. The encoder is a plain timm ``VisionTransformer``, so
:meth:`MAEPretrainer.encoder_state` is exactly the official ``mae_pretrain_vit_base.pth`` layout
(``{"model": ...}``) and loads into ``vit_cls`` / ``vit_seg`` with ``backbone_format=mae``.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from medimg.errors import ConfigError
from medimg.models.registry import register_network
from medimg.models.vit.backbone import BackboneSpec, ViTGeometry, create_backbone, load_backbone_weights

DECODERS = {"tiny": (32, 1, 2), "vit_s": (256, 4, 8), "vit_b": (512, 8, 16), "vit_l": (512, 8, 16),
            "vit_h": (512, 8, 16)}


class MAEPretrainer(ViTGeometry, nn.Module):
    """MAE: mask patches, encode the visible ones, reconstruct the masked pixels.

    Args:
        encoder: timm ``VisionTransformer`` (any prefix tokens: class, registers).
        decoder_dim: decoder width.
        decoder_depth: decoder blocks.
        decoder_heads: decoder attention heads.
        mask_ratio: share of patches hidden from the encoder (0.9 for medical images).
        norm_pix_loss: normalise each target patch by its mean and variance.
    """

    spatial_dims = 2
    vit_attr = "encoder"

    def __init__(self, encoder: VisionTransformer, decoder_dim: int = 512, decoder_depth: int = 8,
                 decoder_heads: int = 16, mask_ratio: float = 0.9, norm_pix_loss: bool = True) -> None:
        super().__init__()
        if not 0.0 < mask_ratio < 1.0:
            raise ConfigError("model.mask_ratio", f"must be in (0, 1), got {mask_ratio}")
        self.encoder = encoder
        self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss
        self.patch = encoder.patch_embed.patch_size[0]
        n = encoder.patch_embed.num_patches
        self.embed = nn.Linear(encoder.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos = nn.Parameter(torch.zeros(1, n, decoder_dim))
        self.blocks = nn.ModuleList(Block(decoder_dim, decoder_heads, mlp_ratio=4.0, qkv_bias=True)
                                    for _ in range(decoder_depth))
        self.norm = nn.LayerNorm(decoder_dim)
        self.pred = nn.Linear(decoder_dim, self.patch ** 2 * self.in_chans)
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.decoder_pos, std=0.02)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, p*p*C), row-major patches."""
        b, c, h, w = x.shape
        p = self.patch
        x = x.reshape(b, c, h // p, p, w // p, p)
        return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)

    @staticmethod
    def patch_stats(patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-patch mean and standard deviation of (B, N, P) patches (the norm-pix-loss target scale)."""
        return patches.mean(-1, keepdim=True), (patches.var(-1, keepdim=True) + 1e-6) ** 0.5

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`patchify` for square images."""
        b, n, _ = x.shape
        p, c, s = self.patch, self.in_chans, int(round(n ** 0.5))
        return x.reshape(b, s, s, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, s * p, s * p)

    def _encode_visible(self, x: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, ...]:
        enc = self.encoder
        tokens = enc.patch_embed(x)                                         # (B, N, D)
        b, n, d = tokens.shape
        prefix = enc.num_prefix_tokens
        pos = enc.pos_embed
        patch_pos = pos if enc.no_embed_class else pos[:, prefix - enc.num_reg_tokens:]
        tokens = tokens + patch_pos
        keep = max(int(round(n * (1 - self.mask_ratio))), 1)
        noise = torch.rand(b, n, device=x.device, generator=generator)
        order = noise.argsort(dim=1)
        restore = order.argsort(dim=1)
        visible = torch.gather(tokens, 1, order[:, :keep, None].expand(-1, -1, d))
        front = []
        if enc.cls_token is not None:
            cls = enc.cls_token if enc.no_embed_class else enc.cls_token + pos[:, :1]
            front.append(cls.expand(b, -1, -1))
        if enc.reg_token is not None:
            front.append(enc.reg_token.expand(b, -1, -1))
        h = torch.cat([*front, visible], dim=1)
        for block in enc.blocks:
            h = block(h)
        h = enc.norm(h)
        mask = torch.ones(b, n, device=x.device)
        mask[:, :keep] = 0
        return h[:, prefix:], torch.gather(mask, 1, restore), restore

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reconstruct ``x``.

        Returns:
            ``(loss, pred, mask)``: the mean squared error over masked patches, the predicted
            patches (B, N, p*p*C) and the mask (B, N; 1 = hidden from the encoder).
        """
        latent, mask, restore = self._encode_visible(x, generator)
        h = self.embed(latent)
        b, keep, dd = h.shape
        n = mask.shape[1]
        h = torch.cat([h, self.mask_token.expand(b, n - keep, -1)], dim=1)
        h = torch.gather(h, 1, restore[:, :, None].expand(-1, -1, dd)) + self.decoder_pos
        for block in self.blocks:
            h = block(h)
        pred = self.pred(self.norm(h))
        target = self.patchify(x)
        if self.norm_pix_loss:
            mean, std = self.patch_stats(target)
            target = (target - mean) / std
        per_patch = ((pred - target) ** 2).mean(-1)
        loss = (per_patch * mask).sum() / mask.sum().clamp_min(1.0)
        return loss, pred, mask

    def encoder_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """The encoder in the official MAE checkpoint layout: ``{"model": state_dict}``."""
        return {"model": {k: v.detach().cpu().clone() for k, v in self.encoder.state_dict().items()}}


@register_network("mae_vit")
def build_mae_vit(backbone: str = "mae", size: str = "vit_b", img_size: int = 224, in_chans: int = 1,
                  registers: bool = False, mask_ratio: float = 0.9, norm_pix_loss: bool = True,
                  decoder_dim: int | None = None, decoder_depth: int | None = None,
                  backbone_checkpoint: str | None = None, backbone_format: str | None = None) -> MAEPretrainer:
    """An MAE pre-training model (optionally continuing from an official checkpoint)."""
    encoder = create_backbone(BackboneSpec(backbone, size, img_size, in_chans, registers, 0.0, "token"))
    if backbone_checkpoint:
        load_backbone_weights(encoder, backbone_checkpoint, backbone_format or backbone)
    dim, depth, heads = DECODERS.get(size, DECODERS["vit_b"])
    dim = decoder_dim or dim
    return MAEPretrainer(encoder, dim, decoder_depth or depth, heads if dim % heads == 0 else 1, mask_ratio,
                         norm_pix_loss)
