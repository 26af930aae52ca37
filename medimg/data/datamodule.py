"""A LightningDataModule over any Decathlon-style manifest, with three cache modes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from monai.data import CacheDataset, DataLoader, Dataset, PersistentDataset, list_data_collate
from monai.transforms import Compose

from medimg.data.manifest import Manifest, load_manifest, train_val_split, validate_manifest
from medimg.errors import ConfigError

CACHE_MODES = ("none", "memory", "disk")


class ManifestDataModule(L.LightningDataModule):
    """Training/validation loaders over a manifest.

    Args:
        manifest: path of the datalist JSON.
        dataset_dir: folder its relative paths refer to.
        train_transforms: pipeline for training items.
        val_transforms: pipeline for validation items.
        batch_size: training batch size (volumes; each may yield several crops).
        num_workers: data-loader workers.
        cache: ``none``, ``memory`` (MONAI ``CacheDataset``) or ``disk`` (``PersistentDataset``).
        cache_dir: folder for the disk cache.
        validate: check every file before training (shapes, affines, NaNs, empty labels).
        repeats: list each training volume this many times per epoch (small datasets).
        cache_key: identifies the transforms (a hash of their spec): the disk cache lives in a
            folder of that name, so changed preprocessing (``pixdim``, intensity) never serves stale data.
        val_fraction: share of training subjects held out when the manifest has no validation split
            (see :func:`~medimg.data.manifest.train_val_split`).
        seed: seed of that hold-out.
    """

    def __init__(self, manifest: str | Path, dataset_dir: str | Path | None, train_transforms: Compose,
                 val_transforms: Compose, batch_size: int = 1, num_workers: int = 0, cache: str = "none",
                 cache_dir: str | Path | None = None, validate: bool = True,
                 repeats: int = 1, cache_key: str = "default", val_fraction: float | None = None,
                 seed: int = 0) -> None:
        super().__init__()
        if cache not in CACHE_MODES:
            raise ConfigError("data.cache", f"unknown cache mode {cache!r}; choose from {', '.join(CACHE_MODES)}")
        if cache == "disk" and cache_dir is None:
            raise ConfigError("data.cache_dir", "cache=disk needs a cache_dir")
        self.manifest: Manifest = load_manifest(manifest, dataset_dir)
        train, val, self.val_split = train_val_split(self.manifest, val_fraction, seed)
        self.items = {"training": train, "validation": val}
        self.cache_key = cache_key
        self.train_transforms = train_transforms
        self.val_transforms = val_transforms
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.cache = cache
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.validate = validate
        self.repeats = max(int(repeats), 1)
        self._validated = False

    def setup(self, stage: str | None = None) -> None:
        """Validate the manifest once (every rank; it only reads)."""
        if self.validate and not self._validated:
            validate_manifest(self.manifest)
            self._validated = True

    def _dataset(self, split: str, transforms: Compose) -> Dataset:
        data = self.items[split]
        if split == "training":
            data = data * self.repeats
        if self.cache == "memory":
            return CacheDataset(data, transforms, cache_rate=1.0, num_workers=None, progress=False)
        if self.cache == "disk":
            return PersistentDataset(data, transforms, cache_dir=self.cache_dir / self.cache_key / split)
        return Dataset(data, transforms)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training loader; random crops are collated into one batch."""
        return DataLoader(self._dataset("training", self.train_transforms), batch_size=self.batch_size,
                          shuffle=True, num_workers=self.num_workers, collate_fn=list_data_collate,
                          persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        """Whole-volume validation loader (batch size 1: volumes differ in shape)."""
        return DataLoader(self._dataset("validation", self.val_transforms), batch_size=1, shuffle=False,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def state_dict(self) -> dict[str, Any]:
        """Nothing to resume: the datasets rebuild from the manifest."""
        return {}


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
        from medimg.data.slices import PromptSliceDataset

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


class ClassificationDataModule(L.LightningDataModule):
    """2D / 2.5D images with class labels (or none, for MAE) from an embedded set, a CSV or a MedMNIST npz.

    Args:
        splits: ``{"training": LabelledImages, "validation": ...}``.
        img_size: network input side.
        in_chans: network input channels.
        normalize: ``imagenet`` or ``none``.
        batch_size: training batch size.
        crop_scale: random-resized-crop scale range.
        randaug: RandAugment magnitude (0: off).
        num_workers: loader workers.
    """

    def __init__(self, splits: dict, img_size: int, in_chans: int = 1, normalize: str = "imagenet",
                 batch_size: int = 16, crop_scale: tuple[float, float] = (0.5, 1.0), randaug: int = 0,
                 num_workers: int = 0) -> None:
        super().__init__()
        from medimg.data.classification import ClassifyPreprocess

        if "validation" not in splits:
            raise ConfigError("data", "the classification data has no validation split")
        self.splits = splits
        self.preprocess = ClassifyPreprocess(img_size, in_chans, normalize)
        self.batch_size, self.crop_scale, self.randaug = batch_size, tuple(crop_scale), randaug
        self.num_workers = num_workers
        self.train_set = self.val_set = self.feature_set = None

    def setup(self, stage: str | None = None) -> None:
        """Load and preprocess the images once."""
        from medimg.data.classification import ClassificationDataset

        if self.train_set is None:
            train = self.splits["training"]
            self.train_set = ClassificationDataset(train, self.preprocess, augment=True, crop_scale=self.crop_scale,
                                                   randaug=self.randaug)
            self.feature_set = ClassificationDataset(train, self.preprocess, augment=False,
                                                     cache=self.train_set.cache)
            self.val_set = ClassificationDataset(self.splits["validation"], self.preprocess, augment=False)

    def _loader(self, dataset: Any, shuffle: bool, batch_size: int) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, drop_last=shuffle and len(dataset) > batch_size)

    def train_dataloader(self) -> DataLoader:
        """Augmented, shuffled training images."""
        return self._loader(self.train_set, True, self.batch_size)

    def val_dataloader(self) -> DataLoader:
        """Validation images in a fixed order."""
        return self._loader(self.val_set, False, 64)

    def knn_dataloader(self) -> DataLoader:
        """Training images without augmentation (the kNN memory bank)."""
        return self._loader(self.feature_set, False, 64)
