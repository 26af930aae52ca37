"""``torch.compile`` for training: the image encoder compiled in place."""

from __future__ import annotations

import logging

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
