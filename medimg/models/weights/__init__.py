"""Pretrained-weight loading: one pure key-remap function per official checkpoint format."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from importlib import import_module
from pathlib import Path

import torch
from torch import nn

from medimg.errors import WeightsError
from medimg.models.weights.report import KeyReport, load_with_report

# format -> "module:function"; imported when a checkpoint of that format is read (the ViT remaps need timm)
REMAPS: dict[str, str] = {
    "swin_ssl": "medimg.models.weights.swin_ssl:remap_swin_ssl",
    "sam": "medimg.models.weights.sam:remap_sam",
    "medsam": "medimg.models.weights.sam:remap_medsam",
    "litemedsam": "medimg.models.weights.sam:remap_litemedsam",
    "mae": "medimg.models.weights.vit:remap_mae",
    "dinov2": "medimg.models.weights.vit:remap_dinov2",
    "timm": "medimg.models.weights.vit:remap_timm",
}


def remap_function(fmt: str) -> Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """The key-remap function of one checkpoint format (see :data:`REMAPS`)."""
    module, name = REMAPS[fmt].split(":")
    return getattr(import_module(module), name)


def read_checkpoint(path: str | Path) -> Mapping[str, torch.Tensor]:
    """Read a weight file safely (``weights_only=True`` / safetensors), onto the CPU.

    Raises:
        WeightsError: missing, unreadable or unsafe (pickled code) file.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(path, "weight file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every failure here is a bad weight file
        first = str(exc).splitlines()[0][:200]
        raise WeightsError(path, f"cannot read weights ({type(exc).__name__}: {first})") from exc


def load_pretrained(module: nn.Module, path: str | Path, fmt: str) -> KeyReport:
    """Load an official checkpoint into ``module`` through its format's key remap.

    Args:
        module: the target network.
        path: the weight file.
        fmt: the checkpoint format (a key of :data:`REMAPS`).

    Returns:
        The key report.
    """
    if fmt not in REMAPS:
        raise WeightsError(path, f"unknown weight format {fmt!r}; known: {', '.join(REMAPS)}")
    state = read_checkpoint(path)
    return load_with_report(module, remap_function(fmt)(state), source=str(path))


__all__ = ["KeyReport", "REMAPS", "load_pretrained", "load_with_report", "read_checkpoint", "remap_function"]


NETWORK_PREFIX = "network."


def read_network_state(ckpt: str | Path) -> dict[str, torch.Tensor]:
    """The network's weights from a Lightning checkpoint of a medimg task (``network.`` keys, unprefixed).

    Raises:
        WeightsError: unreadable checkpoint, or one without network weights.
    """
    state = read_checkpoint(ckpt)
    state = state.get("state_dict", state)
    net_state = {k[len(NETWORK_PREFIX):]: v for k, v in state.items() if k.startswith(NETWORK_PREFIX)}
    if not net_state:
        raise WeightsError(ckpt, "checkpoint holds no network weights")
    return net_state
