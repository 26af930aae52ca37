"""Uploads to the MONAI Label datastore, checked before anything is stored (see :mod:`medimg.label.datastore`).

Label and image uploads are read whole; a label must lie on its image's grid (or on the grid ITK
reads from a NIfTI whose qform and sform disagree, then it is rewritten on the image's header); a
DICOM SEG is read onto its series' grid; a header naming a separate data file is refused; an
upload refused is deleted from the temporary folder.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from medimg.errors import DataError
from medimg.io.dicomseg import label_key


@contextlib.contextmanager
def upload_removed_if_refused(path: str) -> Iterator[None]:
    """On an error, delete ``path`` when it is MONAI Label's temporary copy of an upload.

    MONAI Label's upload endpoints write the body to a new file in the temporary folder and
    schedule its removal as a background task, which FastAPI runs only after a successful
    response. Only a top-level file of the temporary folder is removed: never a studies file.
    """
    try:
        yield
    except BaseException:
        upload = Path(path)
        if upload.parent.resolve() == Path(tempfile.gettempdir()).resolve() and upload.is_file():
            upload.unlink(missing_ok=True)
        raise


def served_labels() -> dict[str, int]:
    """``{name: value}`` of the labels (metadata ``labels``) of the segmentation bundles this process serves.

    Names compared as :func:`unambiguous` does; a name two bundles give different values is left out.
    """
    from monailabel.interfaces.tasks.infer_v2 import InferType
    from monailabel.interfaces.utils import app as app_module

    pairs = [(str(name), int(value)) for app in list(getattr(app_module, "apps", {}).values())
             for task in getattr(app, "_infers", {}).values()
             if getattr(task, "type", None) == InferType.SEGMENTATION and isinstance(getattr(task, "meta", None), dict)
             for name, value in (task.meta.get("labels") or {}).items()]
    return unambiguous(pairs)


def unambiguous(pairs: list[tuple[str, int]]) -> dict[str, int]:
    """The pairs as ``{name: value}``, names compared as segments are (:func:`medimg.io.dicomseg.label_key`).

    A name given two values is dropped.
    """
    values: dict[str, set[int]] = {}
    names: dict[str, str] = {}
    for name, value in pairs:
        key = label_key(name)
        values.setdefault(key, set()).add(int(value))
        names.setdefault(key, name)
    return {names[k]: v.pop() for k, v in values.items() if len(v) == 1}


class ImageExists(DataError):
    """An upload under the id of another stored image (HTTP 409)."""

    http_status = 409


def same_image(image: Any, path: str) -> bool:
    """Whether ``image`` (read) holds the same voxels on the same grid as the stored image at ``path``."""
    from medimg.io.image import read_image

    try:
        stored = read_image(path, spatial_dims=None)
    except DataError:
        return False
    if stored.array.shape != image.array.shape or not np.array_equal(stored.array, image.array):
        return False
    return np.allclose(stored.affine, image.affine, atol=1e-4) or on_itk_grid(image.affine, path, 1e-4)


def on_itk_grid(affine: np.ndarray, path: str, atol: float) -> bool:
    """Whether ``affine`` is the grid ITK (3D Slicer) reads from the NIfTI at ``path``.

    That is its qform when the qform and sform disagree: where Slicer shows the image, and where it
    uploads or saves on it.
    """
    from medimg.io.image import itk_affine

    itk = itk_affine(path)
    return itk is not None and itk.shape == affine.shape and bool(np.allclose(itk, affine, atol=atol))


def image_grid(path: str) -> tuple[tuple[int, ...], np.ndarray]:
    """The spatial shape and RAS affine of an image: from the header for NIfTI, else by reading it."""
    from medimg.io.image import NIFTI_SUFFIXES, has_suffix, read_image

    if has_suffix(Path(path), NIFTI_SUFFIXES):
        import nibabel as nib

        header = nib.load(path).header
        return tuple(int(n) for n in header.get_data_shape()[:3]), np.asarray(header.get_best_affine(), np.float64)
    image = read_image(path, spatial_dims=None)
    return tuple(image.array.shape[:3]), image.affine


def read_upload(path: str, what: str) -> Any:
    """An uploaded image file, read whole; :class:`DataError` naming ``what`` unless it reads.

    A header naming a separate data file is refused: an upload is one file, so the data file would
    be some other file on the server (in the temporary folder, beside the upload).
    """
    from medimg.io.headers import detached_data_file
    from medimg.io.image import read_image

    try:
        if detached_data_file(path) is not None:
            raise DataError(path, "is a header naming a separate data file; upload the image as one file")
        return read_image(path, spatial_dims=None)
    except DataError as exc:
        raise DataError(what, exc.problem) from exc


def check_label_upload(label_file: str, image_file: str, image_id: str, rewrite_to: Path | None = None) -> str | None:
    """Read an uploaded label image whole; :class:`~medimg.errors.DataError` unless it lies on its image's grid.

    A label on the grid ITK reads from a NIfTI image whose qform and sform disagree (3D Slicer's
    save) is accepted, and rewritten to ``rewrite_to`` on the image's own header, so the stored
    label carries both of the image's forms (training compares their affines).

    Returns:
        The file to store (the upload, or ``rewrite_to``); ``None`` when it is all zeros.
    """
    from medimg.io.image import read_image, write_like

    label = read_upload(label_file, f"label upload for {image_id!r}")
    shape = tuple(label.array.shape[:3])
    expected, affine = image_grid(image_file) if image_file else (shape, label.affine)  # the image read once
    if shape != expected:
        raise DataError(f"label upload for {image_id!r}", f"shape {shape} differs from the image's {expected}")
    apart = float(np.abs(label.affine - affine).max())
    on_itk = bool(image_file) and apart > 1e-3 and on_itk_grid(label.affine, image_file, 1e-3)
    if apart > 1e-3 and not on_itk:
        raise DataError(f"label upload for {image_id!r}", f"does not lie on the image's grid: its affine differs "
                                                          f"from the image's by up to {apart:.4g} (mm)")
    if not np.any(label.array):
        return None
    if on_itk and rewrite_to is not None:
        return str(write_like(label.array, read_image(image_file, spatial_dims=None), rewrite_to))
    return label_file


def read_seg_upload(label_file: str, image_file: str, image_id: str, out: Path) -> Path | None:
    """A DICOM SEG upload as NIfTI ``out`` on its series' grid; ``None`` when it labels no voxel.

    Raises:
        DataError: not a readable SEG, an image that is not a series folder, a SEG of another series.
    """
    import pydicom

    from medimg.io.dicomseg import seg_to_labels
    from medimg.io.image import read_image, write_like

    try:
        modality = pydicom.dcmread(label_file, stop_before_pixels=True).get("Modality")
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad upload
        raise DataError(f"label upload for {image_id!r}", f"not a readable DICOM file ({exc})") from exc
    if modality != "SEG":
        raise DataError(f"label upload for {image_id!r}", f"a DICOM label must be a SEG, not {modality!r}")
    if not os.path.isdir(image_file):
        raise DataError(f"label upload for {image_id!r}", "a DICOM SEG label is for a DICOM series; "
                                                          "this image is a file: upload NIfTI or NRRD")
    try:
        labels = seg_to_labels(label_file, image_file, served_labels() or None)
    except DataError as exc:
        raise DataError(f"label upload for {image_id!r}", exc.problem) from exc
    return write_like(labels, read_image(image_file), out) if labels.any() else None
