"""Images held in memory: nibabel, SimpleITK, MONAI ``MetaTensor`` and arrays with an affine.

:func:`as_image` turns whatever a pipeline holds (or a file path, or a DICOM folder) into a medimg
:class:`~medimg.io.image.Image` plus a ``restore`` function that gives a result array back in the
input's own type and geometry:

==========================  ==================================================================
input                       result
==========================  ==================================================================
path / DICOM folder         :class:`~medimg.io.image.Image` (``.save(path)`` writes NIfTI)
``nibabel`` image           ``nibabel.Nifti1Image``, the input's affine, qform/sform codes
``SimpleITK.Image``         ``SimpleITK.Image`` with the input's origin, spacing, direction
``MetaTensor``              ``MetaTensor`` with the input's affine and meta (channel kept)
array (+ affine)            ``numpy.ndarray`` of the input's shape
==========================  ==================================================================

In-memory images enter MONAI pipelines through :func:`memory_key`: a key that
:class:`~medimg.io.reader.MedimgReader` resolves to the registered image, so the bundle's own
``LoadImaged`` -> ... chain runs unchanged (``LoadImage`` only passes file names to readers).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medimg.errors import DataError
from medimg.io.dicom import LPS_TO_RAS
from medimg.io.headers import scalar_float32
from medimg.io.image import Image, read_image, sitk_array_affine

MEMORY_PREFIX = "<medimg-memory:"
_REGISTERED: dict[str, Image] = {}
_COUNTER = itertools.count()


@dataclass
class ImageInput:
    """An input image and the way back to the input's type.

    Attributes:
        image: voxels in the input's index order (float32) and its RAS+ affine.
        restore: result array (the image's shape) -> the result in the input's own type.
    """

    image: Image
    restore: Callable[[np.ndarray], Any]


@contextlib.contextmanager
def memory_key(image: Image) -> Iterator[str]:
    """A name under which :class:`~medimg.io.reader.MedimgReader` reads ``image`` (while the context lasts)."""
    key = f"{MEMORY_PREFIX}{next(_COUNTER)}>"
    _REGISTERED[key] = image
    try:
        yield key
    finally:
        _REGISTERED.pop(key, None)


def is_memory_key(name: str | Path) -> bool:
    """True for names made by :func:`memory_key`."""
    return str(name).startswith(MEMORY_PREFIX)


def registered(name: str | Path) -> Image:
    """The image registered under ``name``."""
    try:
        return _REGISTERED[str(name)]
    except KeyError:
        raise DataError(name, "in-memory image is no longer registered") from None


def _check(source: str, array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    array = np.asarray(array)
    if array.ndim not in (2, 3) or min(array.shape) == 0:
        raise DataError(source, f"has shape {tuple(array.shape)}; expected a 2D or 3D image")
    array = np.ascontiguousarray(scalar_float32(source, array))
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise DataError(source, "needs a finite, invertible 4x4 affine")
    if np.isnan(array).any():
        raise DataError(source, f"contains {int(np.isnan(array).sum())} NaN intensities")
    return array, affine


def _nibabel(img: Any) -> ImageInput:
    import nibabel as nib

    array = np.asanyarray(img.dataobj)
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    array, affine = _check("nibabel image", array, img.affine)
    header = img.header if isinstance(img.header, nib.Nifti1Header) else None

    def restore(labels: np.ndarray) -> Any:
        from medimg.io.image import nifti_like

        shaped = labels.reshape(img.shape) if labels.size == int(np.prod(img.shape)) else labels
        return nifti_like(shaped, np.asarray(img.affine, dtype=np.float64), header)

    return ImageInput(Image(array, affine, Path("nibabel image"), "memory", header), restore)


def _simpleitk(img: Any) -> ImageInput:
    import SimpleITK as sitk

    array, affine = _check("SimpleITK image", *sitk_array_affine(img, "SimpleITK image"))

    def restore(labels: np.ndarray) -> Any:
        out = sitk.GetImageFromArray(np.ascontiguousarray(labels.astype(np.uint8).transpose(
            tuple(range(labels.ndim - 1, -1, -1)))))
        out.CopyInformation(img)
        return out

    return ImageInput(Image(array, affine, Path("SimpleITK image"), "memory"), restore)


def _metatensor(img: Any) -> ImageInput:
    import torch
    from monai.data import MetaTensor
    from monai.utils import MetaKeys, SpaceKeys

    data = img.detach().cpu().numpy()
    channel = data.ndim in (3, 4) and data.shape[0] == 1  # MONAI's channel-first (1, H, W[, D])
    array = data[0] if channel else data
    affine = np.asarray(img.affine, dtype=np.float64)
    if affine.shape == (3, 3):  # a 2D MetaTensor's affine
        full = np.eye(4)
        full[:2, :2], full[:2, 3] = affine[:2, :2], affine[:2, 2]
        affine = full
    if str(img.meta.get(MetaKeys.SPACE, SpaceKeys.RAS)).upper() == "LPS":
        affine = LPS_TO_RAS @ affine
    array, ras = _check("MetaTensor", array, affine)

    def restore(labels: np.ndarray) -> Any:
        t = torch.from_numpy(labels.astype(np.uint8))
        return MetaTensor(t[None] if channel else t, affine=img.affine.clone(), meta=dict(img.meta))

    return ImageInput(Image(array, ras, Path("MetaTensor"), "memory"), restore)


def as_image(obj: Any, affine: np.ndarray | None = None) -> ImageInput:
    """Bring an input of any supported type into medimg's frame.

    Args:
        obj: a file path or DICOM folder (or a medimg :class:`~medimg.io.image.Image` already
            read from one), a nibabel image, a ``SimpleITK.Image``, a MONAI
            ``MetaTensor`` (channel-first with one channel, or none; a leading axis of length 1
            is taken as the channel), or a numpy array /
            torch tensor in the image's index order.
        affine: the 4x4 RAS+ voxel-to-world matrix of an array input (``None``: identity, i.e.
            1 mm voxels with array axes along R, A, S). Not accepted with the other types, which
            carry their own geometry.

    Raises:
        DataError: unreadable file, unsupported type, bad shape or affine, NaN voxels.
    """
    kind = type(obj).__module__.split(".")[0]
    if affine is not None and (isinstance(obj, (str, Path, Image)) or kind in ("nibabel", "SimpleITK")
                               or type(obj).__name__ == "MetaTensor"):
        raise DataError("affine", f"a {type(obj).__name__} carries its own geometry; give an affine only with an array")
    if isinstance(obj, (str, Path, Image)):
        image = obj if isinstance(obj, Image) else read_image(obj, spatial_dims=None)
        return ImageInput(image, lambda labels: Image(labels.astype(np.uint8), image.affine, image.path, image.kind,
                                                      image.header))
    if kind == "nibabel":
        return _nibabel(obj)
    if kind == "SimpleITK":
        return _simpleitk(obj)
    if type(obj).__name__ == "MetaTensor":
        return _metatensor(obj)
    if isinstance(obj, np.ndarray) or kind == "torch":
        data = obj.detach().cpu().numpy() if kind == "torch" else obj
        array, aff = _check("array", data, np.eye(4) if affine is None else affine)
        return ImageInput(Image(array, aff, Path("array"), "memory"), lambda labels: labels.astype(np.uint8))
    raise DataError(type(obj).__name__, "unsupported input; give a path, a DICOM folder, a nibabel or SimpleITK "
                                        "image, a MetaTensor, or an array with its affine")
