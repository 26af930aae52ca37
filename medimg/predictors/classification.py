"""Class probabilities for image files from a classification network (the bundles' ``predictor``)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medimg.data.classification import ClassifyPreprocess
from medimg.errors import atomic_output
from medimg.io.image import Image
from medimg.io.memory import as_image


class ClassificationPredictor:
    """Preprocess images exactly as in training and return per-class probabilities.

    Args:
        network: the classifier (logits (B, K)).
        preprocess: the training preprocessing (``ClassifyPreprocess``).
        class_names: K names.
        multilabel: sigmoid per label (else softmax over classes).
        device: ``cpu`` / ``cuda`` (default: the network's).
        batch_size: images per forward pass.
    """

    def __init__(self, network: nn.Module, preprocess: ClassifyPreprocess, class_names: Sequence[str],
                 multilabel: bool = False, device: str | None = None, batch_size: int = 32) -> None:
        self.network = network.eval()
        self.device = torch.device(device) if device else next(network.parameters()).device
        self.network.to(self.device)
        self.preprocess, self.class_names = preprocess, list(class_names)
        self.multilabel, self.batch_size = bool(multilabel), int(batch_size)

    @torch.no_grad()
    def predict(self, images: Any, affine: np.ndarray | None = None) -> dict[str, float] | list[dict[str, float]]:
        """Class probabilities (softmax sums to 1; multi-label: independent sigmoids).

        Args:
            images: one image or a list / tuple of images: file paths (NIfTI, NRRD, MHA, DICOM
                folders, PNG / JPEG), nibabel or SimpleITK images, ``MetaTensor``s or arrays. A
                bare array (or plain tensor) is taken exactly as training takes one
                (:class:`~medimg.data.classification.ClassifyPreprocess`): a picture in (rows,
                columns[, RGB or slices]) order, as PIL and MedMNIST give it. An image with
                geometry (a file, nibabel, SimpleITK, ``MetaTensor``, or an array *with* ``affine``)
                is in medimg's index order (i, j) = (column, row) and is turned to picture order.
            affine: the affine of a single array input: the array is then an image in index order,
                like every predictor's array-plus-affine input (classification ignores the geometry).

        Returns:
            ``{class: probability}`` for one image, a list of them for a list.
        """
        one = not isinstance(images, (list, tuple))
        items = [self._array_or_path(x, affine) for x in ([images] if one else images)]
        out: list[dict[str, float]] = []
        amp = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
               else contextlib.nullcontext())
        for i in range(0, len(items), self.batch_size):
            x = torch.stack([self.preprocess(p) for p in items[i:i + self.batch_size]]).to(self.device)
            with amp:
                logits = self.network(x).float()
            probs = logits.sigmoid() if self.multilabel else logits.softmax(1)
            out += [dict(zip(self.class_names, map(float, row), strict=True)) for row in probs.cpu()]
        return out[0] if one else out

    @staticmethod
    def _array_or_path(image: Any, affine: np.ndarray | None) -> str | Path | Image | np.ndarray:
        if isinstance(image, (str, Path)):  # files keep their own reader (pictures included)
            return image
        if affine is None and (isinstance(image, np.ndarray) or type(image) is torch.Tensor):
            return image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else image  # as in training
        return as_image(image, affine).image  # index order: ClassifyPreprocess turns it to picture order

    def write_json(self, images: Sequence[str | Path], path: str | Path) -> Path:
        """Write ``{"classes": [...], "multilabel": bool, "predictions": [{"input", "probabilities", "label"}]}``."""
        rows = []
        for image, probs in zip(images, self.predict(list(images)), strict=True):
            row = {"input": str(image), "probabilities": probs}
            if self.multilabel:
                row["labels"] = [k for k, v in probs.items() if v >= 0.5]
            else:
                row["label"] = max(probs, key=probs.get)
            rows.append(row)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(path) as tmp:
            tmp.write_text(json.dumps({"classes": self.class_names, "multilabel": self.multilabel,
                                       "predictions": rows}, indent=2))
        return path
