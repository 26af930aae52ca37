"""Shape-checked state copy that says what loaded, what is missing and what was left over."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from medimg.errors import WeightsError


@dataclass
class KeyReport:
    """What a weight load did.

    Attributes:
        loaded: target keys that received a tensor.
        missing: target keys the checkpoint did not provide (left at their initial values).
        unexpected: checkpoint keys (after remapping) with no place in the target.
        mismatched: keys present in both with different shapes: ``key -> (checkpoint, target)``.
    """

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)

    def missing_under(self, prefix: str) -> list[str]:
        """Missing keys whose name starts with ``prefix`` (e.g. the encoder's)."""
        return [k for k in self.missing if k.startswith(prefix)]

    def summary(self) -> str:
        """One line: counts of loaded / missing / unexpected / shape-mismatched keys."""
        return (f"loaded {len(self.loaded)}, missing {len(self.missing)}, unexpected {len(self.unexpected)}, "
                f"shape-mismatched {len(self.mismatched)}")


def load_with_report(module: nn.Module, state: Mapping[str, torch.Tensor], source: str = "checkpoint",
                     strict_shapes: bool = True) -> KeyReport:
    """Copy matching tensors from ``state`` into ``module`` (MONAI's ``copy_model_state``) and report every key.

    Args:
        module: the target network.
        state: a state dict already remapped to the target's key names.
        source: file name used in error messages.
        strict_shapes: raise on shape mismatches (else skip and list them).

    Raises:
        WeightsError: on a shape mismatch when ``strict_shapes``.
    """
    from monai.networks.utils import copy_model_state

    target = module.state_dict()
    mismatched = {k: (tuple(v.shape), tuple(target[k].shape)) for k, v in state.items()
                  if k in target and tuple(v.shape) != tuple(target[k].shape)}
    if mismatched and strict_shapes:
        key, (got, want) = next(iter(mismatched.items()))
        raise WeightsError(source, f"{len(mismatched)} tensors have the wrong shape, e.g. {key}: "
                                   f"checkpoint {got} vs network {want}")
    # copy_model_state copies the keys whose names and shapes match, and says which it updated
    _, updated, unchanged = copy_model_state(module, dict(state), inplace=True)
    kept = set(unchanged)
    return KeyReport(loaded=list(updated), missing=[k for k in target if k in kept],
                     unexpected=[k for k in state if k not in target], mismatched=mismatched)
