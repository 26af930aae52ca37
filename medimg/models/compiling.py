"""``torch.compile`` for training: the image encoder compiled in place."""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


def compile_encoder(network: nn.Module, mode: str | None = None) -> nn.Module:
    """``torch.compile`` the network's image encoder (or the whole network) in place.

    ``mode="reduce-overhead"`` adds CUDA graphs: one launch for the whole compiled graph, for steps
    bound by the host launching kernels (``medsam3d`` at 128^3 on an H100).

    ``nn.Module.compile`` keeps the module and its state-dict keys, so checkpoints and exported
    bundles are the same as without compiling.

    Returns:
        The compiled module.
    """
    target = getattr(network, "image_encoder", None) or network
    target.compile(mode=mode)
    log.info("torch.compile: %s compiled in place (the first steps are slow while it compiles)",
             type(target).__name__)
    return target


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


def on_cuda(accelerator: str | None) -> bool:
    """Whether a Lightning ``accelerator`` setting trains on a CUDA GPU here."""
    return torch.cuda.is_available() and str(accelerator or "auto") in ("auto", "gpu", "cuda")


def resolve_speed(precision: str, compile_mode: str | None, accelerator: str | None) -> tuple[str, str | None]:
    """``auto`` precision and compile mode made concrete for this machine.

    ``auto`` precision is ``bf16-mixed`` on a GPU that has bf16, else ``32-true``; ``auto`` compile
    is ``reduce-overhead`` (CUDA graphs) on a GPU, else off.

    Raises:
        ConfigError: an unknown compile mode.
    """
    from medimg.errors import ConfigError

    gpu = on_cuda(accelerator)
    if precision == "auto":
        precision = "bf16-mixed" if gpu and torch.cuda.is_bf16_supported() else "32-true"
    if compile_mode == "auto":
        compile_mode = "reduce-overhead" if gpu else None
    if compile_mode is not None and compile_mode not in COMPILE_MODES:
        raise ConfigError("compile", f"unknown mode {compile_mode!r}; use null, auto, {', '.join(COMPILE_MODES)}")
    return precision, compile_mode
