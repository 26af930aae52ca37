"""A LightningDataModule over any Decathlon-style manifest, with three cache modes."""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from monai.data import CacheDataset, DataLoader, Dataset, PersistentDataset, list_data_collate
from monai.data.utils import pickle_hashing
from monai.transforms import Compose, LoadImaged

from medimg.data.manifest import Manifest, load_manifest, train_val_split, validate_manifest
from medimg.errors import ConfigError

CACHE_MODES = ("none", "memory", "disk")


LOADED_KEYS = ("image", "label")  # the files a manifest item's transforms read


def _paths(value: Any) -> Iterator[str]:
    """The non-empty path strings of one item field (a path, or a list of paths: channels)."""
    if isinstance(value, (str, os.PathLike)):
        if str(value):
            yield str(value)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _paths(v)


def _stamp(path: Path) -> tuple[int, int, int, int]:
    """What changes when a file is rewritten: size and mtime, and inode and ctime.

    ``cp -p``, ``rsync -a``, ``touch -r`` and 1-2 s file-system clocks can keep size and mtime.
    """
    st = path.stat()
    return st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns


def loaded_keys(*pipelines: Compose) -> tuple[str, ...]:
    """The keys whose files the pipelines' ``LoadImaged`` read (:data:`LOADED_KEYS` when none is found)."""
    keys = [str(k) for pipeline in pipelines for t in pipeline.flatten().transforms
            if isinstance(t, LoadImaged) for k in t.keys]
    return tuple(dict.fromkeys(keys)) or LOADED_KEYS


def file_state_hash(item: Any, keys: Sequence[str] = LOADED_KEYS) -> bytes:
    """The disk cache's key of one item: the item and the state of every file its transforms load.

    MONAI's ``PersistentDataset`` keys an item by its dict alone (the paths), so a file edited in
    place (a corrected label) would be served from the cache as it was. With this ``hash_func``
    an edited file has a new key (:func:`_stamp`); a DICOM folder counts every file in it (the
    reader reads the files directly in it). Only the fields ``keys`` are files: other fields of
    an item (notes, a subject folder) are part of the key as text, never read.
    """
    stamps: dict[str, Any] = {}
    for key in keys:
        for text in _paths(item.get(key) if isinstance(item, dict) else None):
            path = Path(text)
            if path.is_file():
                stamps[text] = _stamp(path)
            elif path.is_dir():
                stamps[text] = sorted((f.name, *_stamp(f)) for f in path.iterdir() if f.is_file())
    return pickle_hashing({"item": item, "files": stamps})


class ManifestDataModule(L.LightningDataModule):
    """Training/validation loaders over a manifest.

    Args:
        manifest: path of the datalist JSON.
        dataset_dir: folder its relative paths refer to.
        train_transforms: pipeline for training items.
        val_transforms: pipeline for validation items.
        batch_size: training batch size (volumes; each may yield several crops).
        num_workers: data-loader workers.
        cache: ``none``, ``memory`` (MONAI ``CacheDataset``) or ``disk`` (``PersistentDataset``, keyed by
            :func:`file_state_hash`: a file edited in place is read again).
        cache_dir: folder for the disk cache (may be shared by runs).
        validate: check every file before training (shapes, affines, NaNs, empty labels).
        repeats: list each training volume this many times per epoch (small datasets).
        cache_key: identifies the transforms (a hash of their spec): the disk cache lives in a
            folder of that name, so changed preprocessing (``pixdim``, intensity) never serves stale data.
        val_fraction: share of training subjects held out when the manifest has no validation split
            (see :func:`~medimg.data.manifest.train_val_split`).
        seed: seed of that hold-out.
        items: ``(training, validation, description)`` item lists chosen by the caller instead of the
            manifest's splits (a region split trains and validates on the same whole volumes).
    """

    def __init__(self, manifest: str | Path, dataset_dir: str | Path | None, train_transforms: Compose,
                 val_transforms: Compose, batch_size: int = 1, num_workers: int = 0, cache: str = "none",
                 cache_dir: str | Path | None = None, validate: bool = True,
                 repeats: int = 1, cache_key: str = "default", val_fraction: float | None = None,
                 seed: int = 0, items: tuple[list[dict], list[dict], str] | None = None) -> None:
        super().__init__()
        if cache not in CACHE_MODES:
            raise ConfigError("data.cache", f"unknown cache mode {cache!r}; choose from {', '.join(CACHE_MODES)}")
        if cache == "disk" and cache_dir is None:
            raise ConfigError("data.cache_dir", "cache=disk needs a cache_dir")
        self.manifest: Manifest = load_manifest(manifest, dataset_dir)
        train, val, self.val_split = items if items is not None else train_val_split(self.manifest, val_fraction,
                                                                                        seed)
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
            return PersistentDataset(data, transforms, cache_dir=self.cache_dir / self.cache_key / split,
                                     hash_func=functools.partial(file_state_hash, keys=loaded_keys(transforms)))
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
