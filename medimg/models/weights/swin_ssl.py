"""MONAI Swin-UNETR self-supervised checkpoint (``model_swinvit.pt``) to ``SwinUNETR`` keys.

The released file is ``{"state_dict": {...}}`` saved from a ``DataParallel`` SSL model: encoder
keys carry a ``module.`` prefix (``module.layers1.0.blocks.0.attn.qkv.weight``), MLPs use
``fc1``/``fc2`` and the SSL heads (rotation, contrastive, reconstruction) ride along.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

# SSL-only heads in the released file; they have no place in SwinUNETR
SSL_HEAD_PREFIXES = ("rotation_", "contrastive_", "conv.", "convTrans3d")


def remap_swin_ssl(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename ``model_swinvit.pt`` keys to ``monai.networks.nets.SwinUNETR`` keys.

    Args:
        state: the checkpoint's ``state_dict`` (or the whole file: ``{"state_dict": ...}``).

    Returns:
        Keys under ``swinViT.``; SSL heads keep their names (and will be reported unexpected).
    """
    if "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = re.sub(r"^(module\.)+", "", key)
        if name.startswith("swinViT."):
            name = name[len("swinViT."):]
        if name.startswith(SSL_HEAD_PREFIXES):
            out[name] = value
            continue
        name = name.replace(".mlp.fc1.", ".mlp.linear1.").replace(".mlp.fc2.", ".mlp.linear2.")
        out[f"swinViT.{name}"] = value
    return out
