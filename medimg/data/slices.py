"""2D training samples for promptable models: slices of labelled volumes, in the model's input frame."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from medimg.data.io import read_image
from medimg.data.prompts import sample_slices, split_targets
from medimg.data.slicing import prepare_volume

Preprocess = Callable[[np.ndarray], tuple[torch.Tensor, tuple[int, int]]]


def mask_to_model_frame(mask: np.ndarray, resized: tuple[int, int], size: int) -> torch.Tensor:
    """A (rows, cols) mask resized like the image (nearest) and zero-padded to ``size``."""
    m = torch.as_tensor(mask, dtype=torch.float32)[None, None]
    m = F.interpolate(m, size=resized, mode="nearest")
    return F.pad(m, (0, size - resized[1], 0, size - resized[0]))[0]


class PromptSliceDataset(Dataset):
    """Slices of labelled volumes with one binary target each, preprocessed for a SAM-family model.

    Volumes are prepared by :func:`medimg.data.slicing.prepare_volume` (the anatomical ``plane``
    resolved through the affine, the ``intensity`` window), the same function every predictor uses.

    Each item: ``image`` (3, S, S) model input, ``target`` (1, S, S) binary mask in the same frame,
    ``mask`` the target at the slice's own resolution (zero-padded to the dataset's largest slice),
    ``size`` its (rows, cols), ``label`` (the class value), ``volume``/``slice`` (provenance: the
    slice index of the working frame). Validation measures on ``mask``, where users get results.

    Args:
        items: manifest entries ``{"image": path, "label": path}``.
        preprocess: the network's ``preprocess`` (image -> (input, resized size)).
        img_size: the network's input size S.
        plane: ``sagittal``, ``coronal`` or ``axial``.
        intensity: intensity preset (:data:`medimg.data.slicing.INTENSITY_PRESETS`).
        classes: label values to make targets from (``None``: all).
        target_mode: ``label`` or ``component``.
        slices_per_volume: slices drawn per volume (``None``: every slice holding foreground).
        min_size: smallest target kept (pixels).
        seed: sampling seed.
    """

    def __init__(self, items: Sequence[dict], preprocess: Preprocess, img_size: int, plane: str = "coronal",
                 intensity: str = "mr", classes: Sequence[int] | None = None, target_mode: str = "component",
                 slices_per_volume: int | None = None, min_size: int = 30, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        samples: list[tuple[torch.Tensor, torch.Tensor, np.ndarray, int, int, int]] = []
        for vi, item in enumerate(items):
            image = read_image(item["image"])
            volume, frame = prepare_volume(image.array, image.affine, plane, intensity)
            label = frame.to_working(read_image(item["label"]).array.astype(np.int64))
            if slices_per_volume is None:
                ks = np.nonzero((label > 0).any(axis=(0, 1)))[0]
            else:
                ks = np.unique(sample_slices(label, slices_per_volume, axis=2, rng=rng))
            for k in ks:
                lab2d = label[:, :, int(k)].T
                targets = split_targets(lab2d, target_mode, list(classes) if classes else None, min_size)
                if not targets:
                    continue
                x, resized = preprocess(volume[:, :, int(k)].T)
                for value, mask in targets:
                    samples.append((x[0], mask_to_model_frame(mask, resized, img_size), mask, value, vi, int(k)))
        rows = max((s[2].shape[0] for s in samples), default=1)
        cols = max((s[2].shape[1] for s in samples), default=1)
        self.samples = []
        for x, target, mask, value, vi, k in samples:
            canvas = torch.zeros(1, rows, cols)
            canvas[0, : mask.shape[0], : mask.shape[1]] = torch.as_tensor(mask, dtype=torch.float32)
            self.samples.append((x, target, canvas, torch.tensor(mask.shape), value, vi, k))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        x, target, mask, size, value, vi, k = self.samples[i]
        return {"image": x, "target": target, "mask": mask, "size": size, "label": value, "volume": vi, "slice": k}
