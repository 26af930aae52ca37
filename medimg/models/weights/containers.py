"""Helpers shared by the key remaps: unwrap training-checkpoint containers, strip wrapper prefixes."""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

# DataParallel / DDP (``module.``) and torch.compile (``_orig_mod.``) wrappers
WRAPPER_PREFIXES = r"^(module\.|_orig_mod\.)+"


def unwrap(state: Mapping, *container_keys: str) -> Mapping[str, torch.Tensor]:
    """The state dict inside the first of ``container_keys`` that holds one (else ``state`` itself)."""
    for key in container_keys:
        if key in state and isinstance(state[key], Mapping):
            return state[key]
    return state


def strip_prefixes(state: Mapping[str, torch.Tensor], pattern: str = WRAPPER_PREFIXES) -> dict[str, torch.Tensor]:
    """``state`` with the key prefixes matching ``pattern`` removed."""
    return {re.sub(pattern, "", k): v for k, v in state.items()}
