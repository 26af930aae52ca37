"""2D training samples for promptable models: slices of labelled volumes, in the model's input frame."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from medimg.data.io import read_image
from medimg.data.prompts import sample_slices, split_targets

Preprocess = Callable[[np.ndarray], tuple[torch.Tensor, tuple[int, int]]]


def mask_to_model_frame(mask: np.ndarray, resized: tuple[int, int], size: int) -> torch.Tensor:
    """A (rows, cols) mask resized like the image (nearest) and zero-padded to ``size``."""
    m = torch.as_tensor(mask, dtype=torch.float32)[None, None]
    m = F.interpolate(m, size=resized, mode="nearest")
    return F.pad(m, (0, size - resized[1], 0, size - resized[0]))[0]


class PromptSliceDataset(Dataset):
    """Slices of labelled volumes with one binary target each, preprocessed for a SAM-family model.

    Each item: ``image`` (3, S, S) model input, ``target`` (1, S, S) binary mask in the same frame,
    ``label`` (the class value), ``volume``/``slice`` (provenance). The slice shown to the model is
    ``volume.take(k, axis)`` transposed, so image columns follow the first remaining array axis.

    Args:
        items: manifest entries ``{"image": path, "label": path}``.
        preprocess: the network's ``preprocess`` (image -> (input, resized size)).
        img_size: the network's input size S.
        axis: slicing axis (1: coronal for RAS volumes).
        classes: label values to make targets from (``None``: all).
        target_mode: ``label`` or ``component``.
        slices_per_volume: slices drawn per volume (``None``: every slice holding foreground).
        min_size: smallest target kept (pixels).
        seed: sampling seed.
    """

    def __init__(self, items: Sequence[dict], preprocess: Preprocess, img_size: int, axis: int = 1,
                 classes: Sequence[int] | None = None, target_mode: str = "component",
                 slices_per_volume: int | None = None, min_size: int = 30, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.samples: list[tuple[torch.Tensor, torch.Tensor, int, int, int]] = []
        for vi, item in enumerate(items):
            image = read_image(item["image"]).array
            label = read_image(item["label"]).array.astype(np.int64)
            if slices_per_volume is None:
                other = tuple(a for a in range(3) if a != axis)
                ks = np.nonzero((label > 0).any(axis=other))[0]
            else:
                ks = np.unique(sample_slices(label, slices_per_volume, axis=axis, rng=rng))
            for k in ks:
                lab2d = np.take(label, int(k), axis=axis).T
                targets = split_targets(lab2d, target_mode, list(classes) if classes else None, min_size)
                if not targets:
                    continue
                x, resized = preprocess(np.take(image, int(k), axis=axis).T)
                for value, mask in targets:
                    self.samples.append((x[0], mask_to_model_frame(mask, resized, img_size), value, vi, int(k)))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        x, target, value, vi, k = self.samples[i]
        return {"image": x, "target": target, "label": value, "volume": vi, "slice": k}
