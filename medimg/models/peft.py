"""Parameter-efficient fine-tuning: bottleneck adapters, LoRA (through ``peft``), freeze policies.

Adapters follow SAM-Med2D: a bottleneck (down -> GELU -> up) added residually after each
transformer block of the image encoder. The up projection starts at zero, so an untrained adapter
leaves the network's outputs exactly unchanged. They attach through forward hooks, so every
original parameter keeps its official name and pretrained checkpoints still load key for key.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn

from medimg.errors import ConfigError

log = logging.getLogger(__name__)
FREEZE_POLICIES = ("full", "encoder_frozen", "encoder_adapters", "encoder_tail", "adapters_only", "decoder_only",
                   "spatial_adapters")
PEFT_MARKERS = ("adapter", "lora_")


class Adapter(nn.Module):
    """Residual bottleneck ``x + up(gelu(down(x)))`` over the last dimension, with ``up`` zero-initialised.

    Args:
        dim: feature width.
        ratio: bottleneck width as a fraction of ``dim``.
    """

    def __init__(self, dim: int, ratio: float = 0.25) -> None:
        super().__init__()
        hidden = max(int(dim * ratio), 1)
        self.down = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.up = nn.Linear(hidden, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual adapter output."""
        return x + self.up(self.act(self.down(x)))


def _adapter_hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    return module.adapter(output)


def add_adapters(blocks: Iterable[nn.Module], dim: int, ratio: float = 0.25) -> int:
    """Attach an :class:`Adapter` after each block (as ``block.adapter``); returns how many."""
    count = 0
    for block in blocks:
        if hasattr(block, "adapter"):
            continue
        block.adapter = Adapter(dim, ratio)
        block.register_forward_hook(_adapter_hook)
        count += 1
    return count


def apply_lora(module: nn.Module, target_modules: list[str], r: int = 4, alpha: int = 8,
               dropout: float = 0.0) -> nn.Module:
    """Inject LoRA into ``module``'s ``target_modules`` with the ``peft`` library (B starts at zero)."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, bias="none")
    return inject_adapter_in_model(config, module)


def into_peft_layout(network: nn.Module, state: dict) -> tuple[dict, list[str]]:
    """Weights saved without adapters / LoRA, laid out for ``network`` that has them.

    ``peft`` moves a wrapped layer's own tensors under ``base_layer`` (``qkv.weight`` becomes
    ``qkv.base_layer.weight``); those are renamed. Adapter and LoRA tensors the weights lack keep
    the network's own (zero-effect) initialisation. Returns ``(state, added)``: the new state and
    the names of the adapter / LoRA tensors that were not in the weights.
    """
    own = network.state_dict()
    out = dict(state)
    for key in own:
        plain = key.replace(".base_layer.", ".")
        if key not in out and plain != key and plain in out:
            out[key] = out.pop(plain)
    added = [k for k in own if k not in out and any(m in k for m in PEFT_MARKERS)]
    out.update({k: own[k] for k in added})
    return out, added


def apply_freeze_policy(model: nn.Module, policy: str, encoder_name: str = "image_encoder") -> None:
    """Set ``requires_grad`` by policy.

    - ``full``: everything trains.
    - ``encoder_frozen``: the image encoder is frozen (its adapters/LoRA too); prompt encoder and decoder train.
    - ``encoder_adapters`` (SAM-Med2D's recipe): in the encoder only its adapters / LoRA train;
      prompt encoder and decoder train.
    - ``encoder_tail`` (2D SAM family): the encoder's last block / stage and its neck train
      (``model.encoder_tail_modules()``), the rest of the encoder stays frozen; prompt encoder and
      decoder train. On a CPU the frozen part's features are computed once per slice and cached.
    - ``adapters_only``: only adapter and LoRA parameters train.
    - ``decoder_only``: only the mask decoder trains.
    - ``spatial_adapters`` (3D SAM): in the encoder only its 3D adapters, normalisation layers and
      depth embedding train (its ``freeze_pretrained``); prompt encoder and decoder train.
    """
    if policy not in FREEZE_POLICIES:
        raise ConfigError("model.freeze", f"unknown freeze policy {policy!r}; choose from {', '.join(FREEZE_POLICIES)}")
    if policy == "spatial_adapters":
        encoder = getattr(model, encoder_name)
        if not hasattr(encoder, "freeze_pretrained"):
            raise ConfigError("task.freeze", "spatial_adapters needs a volumetric SAM encoder (medsam3d)")
        apply_freeze_policy(model, "encoder_frozen", encoder_name)
        encoder.freeze_pretrained()
        return
    tail: set[int] = set()
    if policy == "encoder_tail":
        if not hasattr(model, "encoder_tail_modules"):
            raise ConfigError("task.freeze", "encoder_tail needs a 2D SAM-family network (sam, medsam, litemedsam)")
        tail = tail_parameter_ids(model)
    for name, param in model.named_parameters():
        is_peft = any(m in name for m in PEFT_MARKERS)
        if policy == "full":
            train = True
        elif policy == "encoder_frozen":
            train = not name.startswith(encoder_name)
        elif policy == "encoder_adapters":
            train = is_peft or not name.startswith(encoder_name)
        elif policy == "encoder_tail":
            train = not name.startswith(encoder_name) or id(param) in tail
        elif policy == "adapters_only":
            train = is_peft
        else:
            train = name.startswith("mask_decoder")
        param.requires_grad_(train)


def tail_parameter_ids(model: nn.Module) -> set[int]:
    """``id`` of each parameter of the image encoder's tail (``model.encoder_tail_modules()``)."""
    return {id(p) for module in model.encoder_tail_modules() for p in module.parameters()}


def trainable_share(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def trainable_summary(model: nn.Module) -> str:
    """``trainable N of M parameters (p%)``, logged at the start of training."""
    trainable, total = trainable_share(model)
    return f"trainable {trainable:,} of {total:,} parameters ({100.0 * trainable / max(total, 1):.2f}%)"
