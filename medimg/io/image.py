"""Image reading and geometry-exact writing.

:func:`read_image` reads NIfTI (``.nii``/``.nii.gz``), NRRD and MHA/MHD (through SimpleITK, ITK's
I/O) and DICOM series folders into a float32 array indexed as stored on disk plus a RAS+ affine.
Every problem a user can cause becomes a :class:`~medimg.errors.DataError` naming the file.

:class:`~medimg.io.reader.MedimgReader` plugs the same reader into MONAI's ``LoadImage``/``LoadImaged``
so the transform pipelines, ``Invertd`` and exported bundles all see identical geometry.

:func:`write_like` writes a prediction with exactly the geometry of the image it came from.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from medimg.errors import DataError, atomic_output
from medimg.io.dicom import LPS_TO_RAS, folder_has_dicom, plan_series, read_dicom_series
from medimg.io.headers import check_declared_size, check_scalar_voxels, scalar_float32
from medimg.io.niftigz import inflate_nifti

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
IMAGE_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES


@dataclass
class Image:
    """An image as read from disk.

    Predictors return their label maps for file inputs as an ``Image`` too (uint8 labels, the
    input's affine and header). ``.save(path)`` writes any ``Image`` as NIfTI in a data type that
    keeps its values (uint8 labels, int16 CT Hounsfield units, float32 otherwise).

    Attributes:
        array: voxels in the file's own index order, float32.
        affine: 4x4 voxel-index-to-world matrix, RAS+ mm.
        path: where it came from.
        kind: ``nifti``, ``itk`` or ``dicom``.
        header: the NIfTI header for NIfTI inputs (kept so outputs reuse its qform/sform codes).
    """

    array: np.ndarray
    affine: np.ndarray
    path: Path
    kind: str
    header: Any = field(default=None, repr=False)

    def save(self, path: str | Path) -> Path:
        """Write this image as NIfTI with its exact geometry and values (:func:`exact_dtype`), atomically."""
        return write_like(self.array, self, path)

    def to_nibabel(self) -> nib.Nifti1Image:
        """The image as a ``nibabel.Nifti1Image`` (its exact affine and values, :func:`exact_dtype`)."""
        return nifti_like(self.array, self.affine, self.header)

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm along each array axis."""
        return np.sqrt((self.affine[:3, : self.array.ndim] ** 2).sum(axis=0))


def has_suffix(path: str | Path, suffixes: Sequence[str] = IMAGE_SUFFIXES) -> bool:
    """True when ``path`` ends with one of ``suffixes`` (case-insensitive)."""
    name = str(path).lower()
    return any(name.endswith(s) for s in suffixes)


def strip_suffix(name: str) -> str | None:
    """``case_0000.nii.gz`` -> ``case_0000``; ``None`` for names that are not images medimg reads."""
    for suffix in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return None


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray, Any]:
    try:
        if not str(path).lower().endswith(".gz"):
            check_declared_size(path)
        if str(path).lower().endswith(".gz"):
            data, header = inflate_nifti(path)
            return data, np.asarray(header.get_best_affine(), dtype=np.float64), header
        img = nib.load(str(path))
        data = scalar_float32(path, img.dataobj)
    except (gzip.BadGzipFile, zlib.error, EOFError) as exc:
        raise DataError(path, f"truncated or corrupt compressed NIfTI ({exc})") from exc
    except nib.filebasedimages.ImageFileError as exc:
        raise DataError(path, "not a readable NIfTI image") from exc
    except (ValueError, OSError) as exc:
        raise DataError(path, f"truncated or corrupt NIfTI ({exc})") from exc
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise DataError(path, f"not a NIfTI image (nibabel read it as {type(img).__name__})")
    return data, np.asarray(img.affine, dtype=np.float64), img.header


def _read_itk(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import SimpleITK as sitk

    check_declared_size(path)
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise DataError(path, "not a readable NRRD/MHA image") from exc
    return sitk_array_affine(img, path)


def sitk_array_affine(img: Any, source: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """A SimpleITK image as a float32 array in (x, y, z) index order and its RAS+ affine.

    Raises:
        DataError: naming ``source``, for a vector (multi-component) image.
    """
    import SimpleITK as sitk

    check_itk_voxels(source, img.GetPixelID(), img.GetNumberOfComponentsPerPixel())
    arr = scalar_float32(source, sitk.GetArrayFromImage(img))
    arr = arr.transpose(tuple(range(arr.ndim - 1, -1, -1)))  # (z, y, x) -> (x, y, z)
    nd = img.GetDimension()
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(nd, nd)
    lps = np.eye(4)
    lps[:nd, :nd] = direction * np.asarray(img.GetSpacing())[None, :]
    lps[:nd, 3] = img.GetOrigin()
    return np.ascontiguousarray(arr), LPS_TO_RAS @ lps


def check_itk_voxels(source: str | Path, pixel_id: int, components: int) -> None:
    """Refuse an ITK image that is not one real number per voxel, from its pixel type (header only).

    ``probe_image`` (from the file's header) and the readers (from the image) call this one check.

    Raises:
        DataError: naming ``source``, for complex or vector (multi-component) voxels.
    """
    import SimpleITK as sitk

    if pixel_id in (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64):  # a header counts 2 components
        check_scalar_voxels(source, np.complex64)
    if components != 1:
        raise DataError(source, f"has {components} components per voxel; expected a scalar image")


def itk_affine(path: str | Path) -> np.ndarray | None:
    """The RAS+ affine ITK (3D Slicer, SimpleITK) places a NIfTI file's voxels by; ``None`` for other files.

    nibabel (and so medimg) places a NIfTI by its sform when one is set; ITK may take the qform
    instead when the two disagree (an sform written by a registration). A label answered to, or
    saved from, such a client lies on ITK's grid.
    """
    import SimpleITK as sitk

    if not has_suffix(path, NIFTI_SUFFIXES):
        return None
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    nd = reader.GetDimension()
    lps = np.eye(4)
    lps[:nd, :nd] = np.asarray(reader.GetDirection()).reshape(nd, nd) * np.asarray(reader.GetSpacing())[None, :]
    lps[:nd, 3] = reader.GetOrigin()
    return LPS_TO_RAS @ lps


def fit_dims(path: Path, array: np.ndarray, spatial_dims: int | None) -> np.ndarray:
    """Drop trailing singleton axes; reject data with more (or fewer) axes than expected."""
    want = spatial_dims or (2 if array.ndim == 2 else 3)
    while array.ndim > want and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim > want:
        raise DataError(path, f"is {array.ndim}D (shape {tuple(array.shape)}) but a {want}D image is expected")
    if spatial_dims == 3 and array.ndim == 2:
        array = array[..., None]  # a single slice is a one-slice volume
    if array.ndim < want or min(array.shape) == 0:
        raise DataError(path, f"has shape {tuple(array.shape)}; expected a {want}D image")
    return array


def _has_nan(array: np.ndarray, header: Any) -> bool:
    """NaN scan; skipped for NIfTI stored as integers without scaling (they cannot hold NaN)."""
    if header is not None and np.issubdtype(header.get_data_dtype(), np.integer):
        slope, inter = header.get_slope_inter()
        if slope is None or (np.isfinite(slope) and np.isfinite(inter or 0.0)):
            return False
    # one reduction instead of a full boolean mask; only a non-finite sum needs the exact check
    return not np.isfinite(array.sum(dtype=np.float64)) and bool(np.isnan(array).any())


def read_image(path: str | Path, spatial_dims: int | None = 3, series_uid: str | None = None,
               allow_nan: bool = False) -> Image:
    """Read an image file or a DICOM series folder.

    Args:
        path: a ``.nii``/``.nii.gz``/``.nrrd``/``.mha``/``.mhd`` file or a DICOM series folder.
        spatial_dims: 3 for volumes, 2 for images, ``None`` to accept either.
        series_uid: the SeriesInstanceUID to read from a folder that mixes several series.
        allow_nan: accept NaN voxels (they are an error by default).

    Returns:
        The image: float32 array in the file's index order and its RAS+ affine.

    Raises:
        DataError: missing path, empty/corrupt/unsupported file, wrong dimensionality, NaN voxels.
    """
    path = Path(path)
    header = None
    if not path.exists():
        raise DataError(path, "no such file or folder")
    if path.is_dir():
        if not folder_has_dicom(path):
            raise DataError(path, "folder holds no DICOM files")
        series = read_dicom_series(path, series_uid)
        array, affine, kind = series.array, series.affine, "dicom"
    else:
        if path.stat().st_size == 0:
            raise DataError(path, "file is empty")
        if has_suffix(path, NIFTI_SUFFIXES):
            array, affine, header = _read_nifti(path)
            kind = "nifti"
        elif has_suffix(path, ITK_SUFFIXES):
            array, affine = _read_itk(path)
            kind = "itk"
        else:
            raise DataError(path, "unsupported file type; expected .nii, .nii.gz, .nrrd, .mha, .mhd or a DICOM folder")
    array = fit_dims(path, array, spatial_dims)
    if not allow_nan and _has_nan(array, header):
        raise DataError(path, f"contains {int(np.isnan(array).sum())} NaN intensities")
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise DataError(path, "has a degenerate or non-finite affine")
    return Image(array, affine, path, kind, header)


def probe_image(path: str | Path) -> None:
    """Check an input cheaply (headers and sizes, no voxel data) so that a bad file fails before any model loads.

    Raises:
        DataError: missing, empty, unsupported, unreadable or truncated input.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(path, "no such file or folder")
    if path.is_dir():
        if not folder_has_dicom(path):
            raise DataError(path, "folder holds no DICOM files")
        plan_series(path)  # every header, checked as read_image checks it (no pixels)
        return
    if path.stat().st_size == 0:
        raise DataError(path, "file is empty")
    if has_suffix(path, NIFTI_SUFFIXES):
        check_declared_size(path)
        try:
            header = nib.load(str(path)).header
        except Exception as exc:  # noqa: BLE001 - any header failure is a data error
            raise DataError(path, f"not a readable NIfTI image ({str(exc).splitlines()[0]})") from exc
        check_scalar_voxels(path, header.get_data_dtype())
    elif has_suffix(path, ITK_SUFFIXES):
        import SimpleITK as sitk

        check_declared_size(path)
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()
        except RuntimeError as exc:
            raise DataError(path, "not a readable NRRD/MHA image") from exc
        check_itk_voxels(path, reader.GetPixelID(), reader.GetNumberOfComponents())
    else:
        raise DataError(path, "unsupported file type; expected .nii, .nii.gz, .nrrd, .mha, .mhd or a DICOM folder")


INTEGER_DTYPES = (np.uint8, np.int16, np.int32)  # smallest first; NIfTI readers everywhere take these


def exact_dtype(array: np.ndarray) -> np.dtype:
    """The smallest on-disk data type that holds every value of ``array`` exactly.

    Integer values (labels, CT Hounsfield units, raw MR counts) get ``uint8``, ``int16`` or ``int32``,
    whichever first holds their range; anything else (probabilities, rescaled intensities,
    non-finite values) gets ``float32``.
    """
    array = np.asarray(array)
    if array.dtype == np.bool_ or array.size == 0:
        return np.dtype(np.uint8)
    if np.issubdtype(array.dtype, np.integer) or np.array_equal(array, np.round(array)):  # NaN != NaN: float
        lo, hi = array.min(), array.max()
        for dtype in INTEGER_DTYPES:
            info = np.iinfo(dtype)
            if info.min <= lo and hi <= info.max:
                return np.dtype(dtype)
    return np.dtype(np.float32)


def _holds(array: np.ndarray, dtype: np.dtype) -> bool:
    """True when casting ``array`` to ``dtype`` keeps its values (floats may round; integers must fit)."""
    if not np.issubdtype(dtype, np.integer) or array.size == 0:
        return True
    info = np.iinfo(dtype)
    return bool(info.min <= array.min() and array.max() <= info.max and np.array_equal(array, np.round(array)))


def nifti_like(array: np.ndarray, affine: np.ndarray, header: Any = None, dtype: Any = None) -> nib.Nifti1Image:
    """A NIfTI image of ``array`` with exactly ``affine``; a NIfTI ``header``'s qform/sform codes are kept.

    Args:
        array: the voxels.
        affine: the 4x4 RAS+ voxel-to-world matrix.
        header: the NIfTI header of the image ``array`` belongs to (``None``: a fresh one).
        dtype: the on-disk data type (``None``: :func:`exact_dtype`, the smallest that keeps the values).

    Raises:
        DataError: ``dtype`` is an integer type that cannot hold the values (they are never wrapped).
    """
    array = np.asarray(array)
    dtype = exact_dtype(array) if dtype is None else np.dtype(dtype)
    if not _holds(array, dtype):
        raise DataError("dtype", f"values {array.min()}..{array.max()} do not fit {dtype.name}")
    data = array.astype(dtype)
    if header is not None and isinstance(header, nib.Nifti1Header):
        out = header.copy()
        out.set_data_dtype(dtype)
        out.set_slope_inter(1.0, 0.0)
        img = nib.Nifti1Image(data, affine, header=out)
        img.set_qform(header.get_qform(), code=int(header["qform_code"]))
        img.set_sform(header.get_sform(), code=int(header["sform_code"]))
    else:
        img = nib.Nifti1Image(data, affine)
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
    return img


def write_like(array: np.ndarray, reference: Image, out_path: str | Path, dtype: Any = None) -> Path:
    """Write ``array`` as NIfTI with exactly the reference image's shape and affine.

    For NIfTI references the header (qform/sform codes, units) is reused, so the output's affine
    is bit-identical to the input's. The file appears atomically: never half-written.

    Args:
        array: data in the reference's index order and shape.
        reference: the image the prediction belongs to.
        out_path: destination ``.nii``/``.nii.gz``.
        dtype: on-disk data type (``None``: the smallest that holds the values exactly, :func:`exact_dtype`).

    Returns:
        The written path.

    Raises:
        DataError: the shape differs from the reference's, or ``dtype`` cannot hold the values.
    """
    out_path = Path(out_path)
    if tuple(array.shape) != tuple(reference.array.shape):
        raise DataError(out_path, f"prediction shape {tuple(array.shape)} differs from input shape "
                                  f"{tuple(reference.array.shape)}")
    try:
        img = nifti_like(array, reference.affine, reference.header, dtype)
    except DataError as exc:
        raise DataError(out_path, exc.problem) from None
    with atomic_output(out_path) as tmp:
        nib.save(img, str(tmp))
    return out_path
