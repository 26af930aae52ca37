"""Label files for MONAI Label clients, in exactly the input image's geometry.

The format follows the request's ``result_extension`` (3D Slicer asks for ``.nrrd``):
``.nii``/``.nii.gz`` (the input's NIfTI header reused), ``.nrrd``/``.mha``/``.nhdr`` (SimpleITK,
direction, spacing and origin from the input's affine; a 2D image off the axial plane, e.g. a
coronal slice, as a one-slice volume), or ``.dcm``: a DICOM SEG referencing the
input series (DICOM inputs only). Without an extension a DICOM series gets a DICOM SEG and any
other input NIfTI.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from medimg.errors import DataError, atomic_output
from medimg.io.image import LPS_TO_RAS, Image, itk_affine, write_like

ITK_SUFFIXES = (".nrrd", ".mha", ".mhd", ".nhdr")
DTYPES = {"uint8": np.uint8, "uint16": np.uint16, "int16": np.int16, "int32": np.int32, "float32": np.float32}


def result_suffix(image: Image, extension: str | None) -> str:
    """The result's file suffix for ``image`` and the request's ``result_extension``."""
    ext = (extension or "").strip().lower()
    if not ext:
        return ".dcm" if image.kind == "dicom" else ".nii.gz"
    ext = ext if ext.startswith(".") else f".{ext}"
    if ext not in (".nii", ".nii.gz", ".dcm", *ITK_SUFFIXES):
        raise DataError("result_extension", f"unsupported {ext!r}; use .nii.gz, .nii, .nrrd, .mha or .dcm")
    if ext == ".dcm" and image.kind != "dicom":
        raise DataError(image.path, "a DICOM SEG result needs a DICOM series input (it references it)")
    return ext


def write_itk_like(array: np.ndarray, reference: Image, out: Path, dtype: np.dtype) -> Path:
    """Write ``array`` with SimpleITK in the reference's exact geometry (any orientation).

    For a NIfTI reference the geometry is the one ITK reads from it
    (:func:`~medimg.io.image.itk_affine`), which differs from nibabel's only when its qform and
    sform disagree: 3D Slicer shows the image there, so the label must lie there too. A 2D image
    is written as a 2D file only when its affine is what a 2D file reads back as (the
    LPS plane ``z = 0``, ``k`` a 1 mm step along ``z``); any other (a coronal, sagittal or oblique
    slice, a slice thickness) is kept whole in a one-slice volume.
    """
    import SimpleITK as sitk

    affine = reference.affine
    itk = itk_affine(reference.path) if reference.path is not None and reference.array.ndim == 3 else None
    if itk is not None and itk.shape == affine.shape:
        affine = itk  # a NIfTI whose qform and sform disagree: where ITK clients (3D Slicer) show the image
    lps = np.linalg.inv(LPS_TO_RAS) @ affine
    array = np.asarray(array).reshape(reference.array.shape)
    planar = np.allclose(lps[2], [0.0, 0.0, 1.0, 0.0], atol=1e-9) and np.allclose(lps[:2, 2], 0.0, atol=1e-9)
    if array.ndim == 2 and not planar:
        array = array[..., None]  # its geometry is 3D: the third axis is the slice's normal
    nd = array.ndim
    spacing = np.sqrt((lps[:nd, :nd] ** 2).sum(axis=0))
    img = sitk.GetImageFromArray(np.ascontiguousarray(array.astype(dtype).transpose(tuple(range(nd - 1, -1, -1)))))
    img.SetSpacing([float(s) for s in spacing])
    img.SetOrigin([float(o) for o in lps[:nd, 3]])
    img.SetDirection([float(d) for d in (lps[:nd, :nd] / spacing[None, :]).reshape(-1)])
    with atomic_output(out) as tmp:
        sitk.WriteImage(img, str(tmp), useCompression=True)
    return out


def write_result(labels: np.ndarray, image: Image, extension: str | None = None, dtype: str | None = None,
                 segment_names: Mapping[int, str] | None = None, algorithm: str = "medimg",
                 version: str = "0") -> str:
    """Write ``labels`` (``image.array``'s shape) to a new temporary file MONAI Label sends and deletes.

    Args:
        labels: the label map in the input's stored index order.
        image: the input as read.
        extension: the request's ``result_extension``.
        dtype: the request's ``result_dtype`` (``uint8`` by default).
        segment_names: label value -> name, for DICOM SEG segments.
        algorithm: the bundle's name, for DICOM SEG.
        version: the bundle's version, for DICOM SEG.

    Returns:
        The written file's path.
    """
    suffix = result_suffix(image, extension)
    np_dtype = DTYPES.get((dtype or "uint8").lower())
    if np_dtype is None:
        raise DataError("result_dtype", f"unsupported {dtype!r}; use one of {', '.join(DTYPES)}")
    labels = np.asarray(labels).reshape(image.array.shape)
    with tempfile.NamedTemporaryFile(prefix="medimg-label-", suffix=suffix, delete=False) as fh:
        out = Path(fh.name)  # MONAI Label deletes it once sent; the writers replace it atomically
    try:
        if suffix == ".dcm":
            from medimg.io.dicomseg import write_dicom_seg

            write_dicom_seg(labels.astype(np.uint8), image.path, out, dict(segment_names or {1: "segment"}),
                            algorithm, version)
        elif suffix in ITK_SUFFIXES:
            write_itk_like(labels, image, out, np_dtype)
        else:
            write_like(labels, image, out, dtype=np_dtype)
    except BaseException:
        out.unlink(missing_ok=True)  # no partial or empty result left in the temporary folder
        raise
    return str(out)
