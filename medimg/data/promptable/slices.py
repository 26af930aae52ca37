"""2D training samples for promptable models: slices of labelled volumes, in the model's input frame."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from monai.data import DataLoader  # MONAI's loader seeds the dataset's random state, as before the move
from torch.utils.data import Dataset

from medimg.data.manifest import load_manifest, train_val_split, validate_manifest
from medimg.data.promptable.simulation import sample_slices, split_targets
from medimg.data.slicing import PLANES, prepare_volume
from medimg.io.image import read_image

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

    A manifest entry may carry its own ``intensity`` window and the ``planes`` it is sliced in
    (default: the dataset's ``intensity`` and ``plane``), so MR and CT volumes train together.

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
            labels = read_image(item["label"]).array.astype(np.int64)
            for pi, item_plane in enumerate(item.get("planes") or [plane]):
                volume, frame = prepare_volume(image.array, image.affine, item_plane, item.get("intensity", intensity))
                label = frame.to_working(labels)
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
                        # the "volume" id names the (volume, plane) pair: embeddings are cached by it
                        samples.append((x[0], mask_to_model_frame(mask, resized, img_size) > 0, mask, value,
                                        vi * len(PLANES) + pi, int(k)))
        rows = max((s[2].shape[0] for s in samples), default=1)
        cols = max((s[2].shape[1] for s in samples), default=1)
        self.samples = []
        for x, target, mask, value, vi, k in samples:  # masks kept as bool: thousands of targets fit in memory
            canvas = torch.zeros(1, rows, cols, dtype=torch.bool)
            canvas[0, : mask.shape[0], : mask.shape[1]] = torch.as_tensor(mask > 0)
            self.samples.append((x, target, canvas, torch.tensor(mask.shape), value, vi, k))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        x, target, mask, size, value, vi, k = self.samples[i]
        return {"image": x, "target": target.float(), "mask": mask.float(), "size": size, "label": value,
                "volume": vi, "slice": k}


class PromptSliceDataModule(L.LightningDataModule):
    """2D slices of a manifest's volumes with binary targets, for promptable models.

    Args:
        manifest: datalist JSON.
        dataset_dir: folder its relative paths refer to.
        preprocess: the network's ``preprocess``.
        img_size: the network's input size.
        plane: anatomical slicing plane (``sagittal``, ``coronal``, ``axial``), resolved through each affine.
        intensity: intensity preset of the volumes.
        classes: label values to segment (``None``: all).
        target_mode: ``label`` or ``component``.
        train_slices: slices drawn per training volume (``None``: all with foreground).
        val_slices: slices drawn per validation volume.
        batch_size: training batch size.
        min_size: smallest target kept (pixels).
        val_fraction: share of subjects held out when the manifest has no validation split.
        seed: seed of that hold-out.
    """

    def __init__(self, manifest: str | Path, dataset_dir: str | Path | None, preprocess: Any, img_size: int,
                 plane: str = "coronal", intensity: str = "mr", classes: list[int] | None = None,
                 target_mode: str = "component", train_slices: int | None = 40, val_slices: int | None = 12,
                 batch_size: int = 4, min_size: int = 30, val_fraction: float | None = None, seed: int = 0) -> None:
        super().__init__()
        self.manifest = load_manifest(manifest, dataset_dir)
        self.train_items, self.val_items, self.val_split = train_val_split(self.manifest, val_fraction, seed)
        self.kwargs = dict(preprocess=preprocess, img_size=img_size, plane=plane, intensity=intensity,
                           classes=classes, target_mode=target_mode, min_size=min_size)
        self.train_slices, self.val_slices, self.batch_size = train_slices, val_slices, batch_size
        self.train_set = self.val_set = None

    def setup(self, stage: str | None = None) -> None:
        """Validate the manifest and cut the slices once."""
        from medimg.data.promptable.slices import PromptSliceDataset

        if self.train_set is None:
            validate_manifest(self.manifest)
            self.train_set = PromptSliceDataset(self.train_items, slices_per_volume=self.train_slices,
                                                seed=0, **self.kwargs)
            self.val_set = PromptSliceDataset(self.val_items, slices_per_volume=self.val_slices,
                                              seed=1, **self.kwargs)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training slices."""
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Validation slices in a fixed order."""
        return DataLoader(self.val_set, batch_size=8, shuffle=False)
