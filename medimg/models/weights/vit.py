"""ViT checkpoints (MAE, DINOv2, timm) to timm ``VisionTransformer`` keys, and fitting them to a model.

One pure key remap per official format:

- MAE ``mae_pretrain_vit_base.pth`` (facebookresearch/mae): ``{"model": state}`` with timm-style
  encoder keys; the pre-training checkpoints with a decoder also hold ``decoder_*`` and
  ``mask_token`` (reported as unexpected: they are not part of the encoder).
- DINOv2 torch-hub ``dinov2_vit{s,b,l}14[_reg4]_pretrain.pth``: a plain state dict whose keys
  match timm's except ``register_tokens`` (timm: ``reg_token``) and the training-only ``mask_token``;
  timm's ``checkpoint_filter_fn`` converts them.
- timm checkpoints (``pytorch_model.bin`` / ``model.safetensors`` / timm ``train.py`` outputs with
  ``state_dict`` and ``module.`` prefixes).

:func:`fit_vit_state` then adapts shapes that legitimately differ, with timm's own functions: the
position embedding grid (input size), the class-token position (timm's ``no_embed_class``
DINOv2-register models) and the patch-embedding input channels.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

import torch
from timm.models import adapt_input_conv
from timm.models.vision_transformer import checkpoint_filter_fn

from medimg.models.weights.containers import strip_prefixes, unwrap

log = logging.getLogger(__name__)


def remap_mae(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MAE ``mae_pretrain_vit_base.pth``: unwrap ``model``; encoder keys are timm's already.

    A decoder (``decoder_*``, ``mask_token``) is kept, so the key report lists it as unexpected.
    """
    return strip_prefixes(unwrap(state, "model", "state_dict"))


def remap_dinov2(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DINOv2 hub or training checkpoint: unwrap ``teacher``/``model``, drop ``backbone.`` and the heads.

    The hub keys stay as they are (``mask_token``, ``register_tokens``): :func:`fit_vit_state`
    hands them to timm's DINOv2 conversion.
    """
    out = {}
    for key, value in strip_prefixes(unwrap(state, "teacher", "model")).items():
        key = re.sub(r"^backbone\.", "", key)
        if not key.startswith(("dino_head.", "ibot_head.")):
            out[key] = value
    return out


def remap_timm(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Timm checkpoint (``state_dict``/``model`` wrappers, ``module.`` prefixes removed)."""
    return strip_prefixes(unwrap(state, "state_dict", "state_dict_ema", "model"))


def fit_vit_state(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Adapt a remapped ViT state to ``model``'s input size, class-token layout and input channels.

    timm's own ``checkpoint_filter_fn`` resamples the position embedding to the model's grid and
    converts DINOv2 files (``register_tokens`` -> ``reg_token``, the class position folded into
    the class token for timm's ``no_embed_class`` register models, ``mask_token`` dropped);
    ``timm.models.adapt_input_conv`` fits an RGB patch embedding to the model's input channels.

    Args:
        state: output of one of the remaps.
        model: the target timm ``VisionTransformer``.

    Returns:
        The state with ``pos_embed``, ``cls_token`` and ``patch_embed.proj.weight`` fitted.
    """
    state = checkpoint_filter_fn(dict(state), model)
    key = "patch_embed.proj.weight"
    target = model.state_dict()
    if key in state and key in target and state[key].shape[1] != target[key].shape[1]:
        want, have = target[key].shape[1], state[key].shape[1]
        # timm adapts RGB weights; other channel counts (a 1-channel MAE encoder) are averaged and repeated
        state[key] = adapt_input_conv(want, state[key]) if have == 3 else state[key].mean(
            1, keepdim=True).repeat(1, want, 1, 1)
        log.info("patch embedding adapted from %d to %d input channels", have, want)
    return state
