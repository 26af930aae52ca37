"""MONAI ``ImageReader`` over medimg's readers: ``LoadImage(reader=MedimgReader())``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import ImageReader
from monai.utils import MetaKeys, SpaceKeys

from medimg.errors import DataError
from medimg.io.image import Image, fit_dims, has_suffix, read_image
from medimg.io.memory import is_memory_key, registered


class MedimgReader(ImageReader):
    """MONAI ``ImageReader`` over :func:`read_image` (NIfTI, NRRD, MHA and DICOM series folders).

    Args:
        spatial_dims: 3 for volumes, 2 for images, ``None`` to accept either.
        series_uid: SeriesInstanceUID to read from folders that mix series.
    """

    def __init__(self, spatial_dims: int | None = 3, series_uid: str | None = None) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.series_uid = series_uid

    def verify_suffix(self, filename: Sequence[str | Path] | str | Path) -> bool:
        """True for supported image files and for folders (DICOM series)."""
        names = [filename] if isinstance(filename, (str, Path)) else list(filename)
        return all(is_memory_key(n) or Path(n).is_dir() or has_suffix(n) for n in names)

    def _read(self, name: str | Path) -> Image:
        if is_memory_key(name):  # an in-memory image (medimg.io.memory.memory_key)
            image = registered(name)
            array = fit_dims(image.path, image.array, self.spatial_dims)
            return Image(array, image.affine, image.path, image.kind, image.header)
        return read_image(name, self.spatial_dims, self.series_uid)

    def read(self, data: Sequence[str | Path] | str | Path, **kwargs: Any) -> Image | list[Image] | DataError:
        """Read one path (or several, stacked as channels by :meth:`get_data`).

        A :class:`DataError` is returned, not raised: ``LoadImage`` swallows exceptions from
        ``read`` and silently tries its other readers; :meth:`get_data` raises it instead.
        """
        try:
            if isinstance(data, (str, Path)):
                return self._read(data)
            return [self._read(d) for d in data]
        except DataError as exc:
            return exc

    def get_data(self, img: Image | list[Image] | DataError) -> tuple[np.ndarray, dict]:
        """Return the array and the MONAI metadata (affine, spatial shape, RAS space)."""
        if isinstance(img, DataError):
            raise img
        imgs = [img] if isinstance(img, Image) else img
        first = imgs[0]
        for other in imgs[1:]:
            if other.array.shape != first.array.shape or not np.allclose(other.affine, first.affine, atol=1e-4):
                raise DataError(other.path, f"geometry differs from {first.path}")
        meta = {
            MetaKeys.AFFINE: first.affine.copy(),
            MetaKeys.ORIGINAL_AFFINE: first.affine.copy(),
            MetaKeys.SPATIAL_SHAPE: np.asarray(first.array.shape),
            MetaKeys.SPACE: SpaceKeys.RAS,
            MetaKeys.ORIGINAL_CHANNEL_DIM: float("nan") if len(imgs) == 1 else 0,
            "source_kind": first.kind,
        }
        data = first.array if len(imgs) == 1 else np.stack([i.array for i in imgs], axis=0)
        return data, meta
