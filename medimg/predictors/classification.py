"""Class probabilities for image files from a classification network (the bundles' ``predictor``)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from medimg.data.classification import ClassifyPreprocess
from medimg.errors import atomic_output


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
    def predict(self, images: Sequence[str | Path]) -> list[dict[str, float]]:
        """``[{class: probability}]`` per image (softmax sums to 1; multi-label: independent sigmoids)."""
        out: list[dict[str, float]] = []
        amp = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
               else contextlib.nullcontext())
        for i in range(0, len(images), self.batch_size):
            x = torch.stack([self.preprocess(p) for p in images[i:i + self.batch_size]]).to(self.device)
            with amp:
                logits = self.network(x).float()
            probs = logits.sigmoid() if self.multilabel else logits.softmax(1)
            out += [dict(zip(self.class_names, map(float, row), strict=True)) for row in probs.cpu()]
        return out

    def write_json(self, images: Sequence[str | Path], path: str | Path) -> Path:
        """Write ``{"classes": [...], "multilabel": bool, "predictions": [{"input", "probabilities", "label"}]}``."""
        rows = []
        for image, probs in zip(images, self.predict(images), strict=True):
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
