"""ViT checkpoints (MAE, DINOv2, timm) to timm ``VisionTransformer`` keys, and fitting them to a model.

One pure key remap per official format:

- MAE ``mae_pretrain_vit_base.pth`` (facebookresearch/mae): ``{"model": state}`` with timm-style
  encoder keys; the pre-training checkpoints with a decoder also hold ``decoder_*`` and
  ``mask_token`` (reported as unexpected: they are not part of the encoder).
- DINOv2 torch-hub ``dinov2_vit{s,b,l}14[_reg4]_pretrain.pth``: a plain state dict whose keys
  match timm's except ``register_tokens`` (timm: ``reg_token``) and the training-only ``mask_token``.
- timm checkpoints (``pytorch_model.bin`` / ``model.safetensors`` / timm ``train.py`` outputs with
  ``state_dict`` and ``module.`` prefixes).

:func:`fit_vit_state` then adapts shapes that legitimately differ: the position embedding grid
(input size), the class-token position (timm's ``no_embed_class`` DINOv2-register models) and the
patch-embedding input channels.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

import torch
from timm.layers import resample_abs_pos_embed
from timm.models._manipulate import adapt_input_conv

from medimg.models.weights.containers import strip_prefixes, unwrap

log = logging.getLogger(__name__)


def remap_mae(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MAE ``mae_pretrain_vit_base.pth``: unwrap ``model``; encoder keys are timm's already.

    A decoder (``decoder_*``, ``mask_token``) is kept, so the key report lists it as unexpected.
    """
    return strip_prefixes(unwrap(state, "model", "state_dict"))


def remap_dinov2(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DINOv2 hub checkpoint: ``register_tokens`` -> ``reg_token``; drop ``mask_token``."""
    out = {}
    for key, value in strip_prefixes(unwrap(state, "teacher", "model")).items():
        key = re.sub(r"^backbone\.", "", key)
        if key == "mask_token" or key.startswith(("dino_head.", "ibot_head.")):
            continue
        out["reg_token" if key == "register_tokens" else key] = value
    return out


def remap_timm(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Timm checkpoint (``state_dict``/``model`` wrappers, ``module.`` prefixes removed)."""
    return strip_prefixes(unwrap(state, "state_dict", "state_dict_ema", "model"))


def fit_vit_state(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Adapt a remapped ViT state to ``model``'s input size, class-token layout and input channels.

    Args:
        state: output of one of the remaps.
        model: the target timm ``VisionTransformer``.

    Returns:
        The state with ``pos_embed``, ``cls_token`` and ``patch_embed.proj.weight`` reshaped to fit.
    """
    state = dict(state)
    target = model.state_dict()
    if "pos_embed" in state and "pos_embed" in target:
        pos = state["pos_embed"]
        grid = list(model.patch_embed.grid_size)
        n_target_prefix = 0 if model.no_embed_class else model.num_prefix_tokens - model.num_reg_tokens
        n_patches_src = pos.shape[1]
        src_side = int(round(max(n_patches_src - 1, 1) ** 0.5))
        src_prefix = n_patches_src - src_side * src_side
        if src_prefix == 1 and n_target_prefix == 0 and "cls_token" in state:
            # DINOv2 adds the class position to the class token; timm register models keep it in the token
            state["cls_token"] = state["cls_token"] + pos[:, :1]
            pos, src_prefix = pos[:, 1:], 0
        if tuple(pos.shape) != tuple(target["pos_embed"].shape):
            pos = resample_abs_pos_embed(pos, new_size=grid, old_size=[src_side, src_side],
                                         num_prefix_tokens=src_prefix)
            log.info("position embedding resampled from %dx%d to %dx%d", src_side, src_side, *grid)
        state["pos_embed"] = pos
    key = "patch_embed.proj.weight"
    if key in state and key in target and state[key].shape[1] != target[key].shape[1]:
        want, have = target[key].shape[1], state[key].shape[1]
        state[key] = adapt_input_conv(want, state[key], base_chans=have) if have == 3 else state[key].mean(
            1, keepdim=True).repeat(1, want, 1, 1)
        log.info("patch embedding adapted from %d to %d input channels", have, want)
    return state
