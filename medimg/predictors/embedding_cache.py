"""Image embeddings of any number of images, bounded in bytes, least recently used evicted first.

An interactive server holds one predictor per model while several annotators click on their own
images. A per-image cache would drop an image's slice embeddings whenever another user's click
arrives; a count-bounded one says nothing about memory (a SAM ViT-H embedding is as large as a
LiteMedSAM one, but a volume has hundreds of slices). Here every entry is keyed by the image's
fingerprint and the slice, its size is counted in bytes, and the least recently used entries go
first when the total passes the bound. It is thread-safe: the server's worker threads share it.

:func:`content_key` is that fingerprint, and the key of every predictor cache: what the array holds
and its geometry, never the array object. A pipeline that refills one buffer with scan after
scan, or hands the same array again with another affine, gets a new key.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

DEFAULT_CACHE_MB = 512.0


def content_key(array: np.ndarray, affine: np.ndarray | None, *settings: str) -> str:
    """A digest of what a prepared image depends on: its voxels, shape, dtype, affine and ``settings``.

    BLAKE2b over the raw bytes (about 1 GB/s), so the same object refilled with other voxels, or
    handed with another affine, is another image; equal copies share a key.

    Args:
        array: the voxels as given.
        affine: the 4x4 voxel-to-world matrix (``None`` for a plain 2D image).
        settings: anything else the prepared image depends on (intensity preset, plane).
    """
    data = np.ascontiguousarray(array)
    h = hashlib.blake2b(data.view(np.uint8).reshape(-1), digest_size=16)
    h.update(f"{data.shape}|{data.dtype.str}|".encode())
    if affine is not None:
        h.update(np.ascontiguousarray(affine, dtype=np.float64).tobytes())
    h.update("|".join(str(s) for s in settings).encode())
    return h.hexdigest()


def tensor_bytes(value: Any) -> int:
    """Bytes held by the arrays in ``value`` (a tensor or array, or a tuple / list holding some)."""
    if isinstance(value, torch.Tensor):
        return value.element_size() * value.nelement()
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, (tuple, list)):
        return sum(tensor_bytes(v) for v in value)
    return 0


class EmbeddingCache:
    """An LRU cache of slice embeddings across images, bounded in bytes.

    Args:
        max_mb: the bound (MiB). An entry larger than the bound alone is not kept.
    """

    def __init__(self, max_mb: float = DEFAULT_CACHE_MB) -> None:
        if not max_mb > 0:
            raise ValueError(f"cache bound must be positive, got {max_mb} MB")
        self.max_bytes = int(max_mb * 2**20)
        self.nbytes = 0
        self.evictions = 0
        self._items: OrderedDict[tuple[str, int], tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, image: str, k: int) -> Any | None:
        """The entry of slice ``k`` of ``image`` (now the most recently used), or ``None``."""
        with self._lock:
            item = self._items.get((image, k))
            if item is None:
                return None
            self._items.move_to_end((image, k))
            return item[0]

    def put(self, image: str, k: int, value: Any) -> None:
        """Keep ``value`` for slice ``k`` of ``image``; evict the least recently used beyond the bound."""
        size = tensor_bytes(value)
        with self._lock:
            old = self._items.pop((image, k), None)
            if old is not None:
                self.nbytes -= old[1]
            if size > self.max_bytes:
                return
            self._items[(image, k)] = (value, size)
            self.nbytes += size
            while self.nbytes > self.max_bytes:
                _, (_, dropped) = self._items.popitem(last=False)
                self.nbytes -= dropped
                self.evictions += 1

    def images(self) -> set[str]:
        """Fingerprints of the images with at least one cached slice."""
        with self._lock:
            return {image for image, _ in self._items}

    def clear(self) -> None:
        """Drop everything."""
        with self._lock:
            self._items.clear()
            self.nbytes = 0

    def __len__(self) -> int:
        return len(self._items)
