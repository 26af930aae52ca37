"""The shapes medimg's parts agree on, declared as ``typing.Protocol``s (a leaf module).

Predictors (what :func:`medimg.load_bundle` returns):

- :class:`Segmenter`: an image in, a label map in the image's own type and geometry out.
- :class:`PromptSegmenter`: an image plus boxes / clicks in, a label map out (2D slice
  propagation or a 3D network; the prompts mean what the prompts JSON means).
- :class:`Classifier`: images in, class probabilities out.

Promptable networks (what the promptable predictors and the promptable task drive):

- :class:`PromptableNetwork2D`: SAM-style, with the family's own pre- and post-processing.
- :class:`PromptableNetwork3D`: a volumetric SAM adapter working on fixed-size windows.

Code dispatches with ``isinstance`` on these (they are runtime-checkable), never on attributes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch


@runtime_checkable
class PromptableNetwork2D(Protocol):
    """A 2D promptable network (SAM, MedSAM, LiteMedSAM)."""

    img_size: int

    def preprocess(self, image: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """One slice (rows, cols) -> the network's input (1, 3, S, S) and the resized size."""

    def scale_coords(self, coords: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
        """Slice pixel coordinates -> the network's input coordinates."""

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Image embeddings."""

    def decode(self, embeddings: Any, points: tuple[torch.Tensor, torch.Tensor] | None = None,
               boxes: torch.Tensor | None = None, masks: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(low-resolution mask logits, predicted IoU)`` for the prompts."""

    def postprocess(self, low_res: torch.Tensor, resized: tuple[int, int],
                    original_size: tuple[int, int]) -> torch.Tensor:
        """Low-resolution logits -> logits at the slice's own size."""


@runtime_checkable
class PromptableNetwork3D(Protocol):
    """A 3D promptable network (the volumetric SAM adapter) on ``roi_size`` windows."""

    def check_size(self, size: tuple[int, ...]) -> None:
        """Raise ``ValueError`` for a window size the network cannot take."""

    def encode(self, x: torch.Tensor) -> Any:
        """Volume features of a (B, 1, D, H, W) window."""

    def decode(self, features: Any, points: tuple[torch.Tensor, torch.Tensor] | None = None,
               boxes: torch.Tensor | None = None, masks: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mask logits over the window, predicted IoU)`` for the prompts."""


@runtime_checkable
class Segmenter(Protocol):
    """Automatic segmentation of whole images."""

    def predict(self, image: Any, affine: np.ndarray | None = None) -> Any:
        """The label map of ``image``, in its own type, shape and geometry."""


@runtime_checkable
class PromptSegmenter(Protocol):
    """Promptable segmentation: label 1, 2, ... per box, one more label for the clicks."""

    def predict(self, image: Any, affine: np.ndarray | None = None, *, boxes: Sequence[Sequence[float]] = (),
                points: Sequence[Sequence[float]] = (), point_labels: Sequence[int] | None = None,
                space: str = "voxel", intensity: str | None = None, propagate: bool = True) -> Any:
        """The label map of ``image`` from its prompts, in its own type, shape and geometry."""


@runtime_checkable
class Classifier(Protocol):
    """Image classification."""

    class_names: list[str]

    def predict(self, images: Any) -> list[dict[str, float]]:
        """``{class: probability}`` per image."""
