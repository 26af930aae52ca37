"""DICOM series reading: pick the series, sort slices geometrically, build the RAS affine.

MONAI's readers sort by file name or InstanceNumber in some paths and accept uneven slice gaps
silently; here slices are ordered by ImagePositionPatient projected on the slice normal, mixed
series are told apart by SeriesInstanceUID, and uneven spacing is an error.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from medimg.errors import DataError
from medimg.io.headers import scalar_float32

# relative tolerance on slice gaps before a series counts as non-uniform
SPACING_RTOL = 1e-2
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class DicomSeries:
    """A geometrically sorted DICOM series.

    Attributes:
        array: voxels indexed (column, row, slice), float32, rescale slope/intercept applied.
        affine: 4x4 voxel-to-world matrix in RAS+ mm.
        series_uid: SeriesInstanceUID.
        files: the slice files in geometric order.
        sop_uids: their SOPInstanceUIDs, in the same order.
    """

    array: np.ndarray
    affine: np.ndarray
    series_uid: str
    files: list[Path]
    sop_uids: list[str] = field(default_factory=list)


def is_dicom_file(path: Path) -> bool:
    """True when ``path`` carries the DICOM preamble magic (``DICM`` at byte 128)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def folder_has_dicom(folder: Path) -> bool:
    """True when ``folder`` directly holds at least one DICOM file."""
    return any(p.is_file() and is_dicom_file(p) for p in folder.iterdir())


def _scan(folder: Path) -> dict[str, list[tuple[Path, pydicom.Dataset]]]:
    """Read every DICOM header in ``folder``; stray non-DICOM files are skipped with a warning."""
    series: dict[str, list[tuple[Path, pydicom.Dataset]]] = {}
    stray: list[str] = []
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name.startswith("."):
            continue
        if not is_dicom_file(path):
            stray.append(path.name)
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
            raise DataError(path, f"unreadable DICOM file ({exc})") from exc
        if "Rows" not in ds:  # (pixels are not read here) DICOMDIR, structured reports, presentation states
            stray.append(path.name)
            continue
        series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((path, ds))
    if stray:
        shown = ", ".join(stray[:5]) + (" ..." if len(stray) > 5 else "")
        warnings.warn(f"{folder}: skipped {len(stray)} non-image file(s): {shown}", stacklevel=3)
    if not series:
        raise DataError(folder, "folder holds no DICOM image files")
    return series


def _describe(series: dict[str, list[tuple[Path, pydicom.Dataset]]]) -> str:
    parts = []
    for uid, items in series.items():
        desc = str(items[0][1].get("SeriesDescription", "")).strip()
        parts.append(f"{uid} ({len(items)} files{', ' + desc if desc else ''})")
    return "; ".join(parts)


@dataclass
class _Frame:
    """One 2D frame of a series: a classic slice file, or a frame of an enhanced (multi-frame) file."""

    path: Path
    index: int  # the frame's place in its file's pixel data
    count: int  # the frames its file holds
    orientation: np.ndarray
    position: np.ndarray
    spacing: np.ndarray
    thickness: float
    rescale: tuple[float, float]
    shape: tuple[int, int]
    sop_uid: str


def _frame_count(path: Path, ds: pydicom.Dataset) -> int:
    """``NumberOfFrames`` as a whole number (1 when absent).

    Raises:
        DataError: naming ``path``, for a value that is not a positive whole number.
    """
    value = ds.get("NumberOfFrames")
    if value is None or str(value).strip() == "":
        return 1
    try:
        count = int(str(value).strip())
    except ValueError:
        raise DataError(path, f"has a NumberOfFrames (0028,0008) that is not a whole number ({str(value)!r})") from None
    if count < 1:
        raise DataError(path, f"has NumberOfFrames (0028,0008) {count}; at least one frame expected")
    return count


def _number(path: Path, ds: pydicom.Dataset, keyword: str, default: float) -> float:
    """A numeric tag (rescale, thickness) or ``default``; a value that is no number is a DataError naming it."""
    value = ds.get(keyword)
    if value is None or str(value).strip() == "":
        return default
    try:
        return float(value)
    except (TypeError, ValueError):
        raise DataError(path, f"has a {keyword} that is not a number ({str(value)!r})") from None


def _file_frames(path: Path, ds: pydicom.Dataset, files_in_series: int) -> list[_Frame]:
    """The frames of one file, each with its own geometry.

    Every frame's position, orientation and pixel spacing come from the file's functional groups
    (per-frame, then shared) when it has them (enhanced CT/MR, one frame per file included), else
    from the top-level tags of a classic single-frame slice.
    """
    count = _frame_count(path, ds)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if count > 1 and per_frame is None:
        if files_in_series > 1:
            raise DataError(path, f"multi-frame file ({count} frames) in one series of several files; "
                                  "give each multi-frame file a folder of its own")
        raise DataError(path, f"multi-frame image ({count} frames) without per-frame functional groups: "
                              "its frames cannot be placed in space")
    if per_frame is not None and len(per_frame) != count:
        raise DataError(path, f"has {len(per_frame)} per-frame functional groups for {count} frames")
    shape = (int(ds.Rows), int(ds.Columns))
    uid = str(ds.get("SOPInstanceUID", ""))
    frames = []
    for i in range(count):
        what = "slice" if count == 1 else f"frame {i + 1}"
        groups = [_frame_item(ds, i, name) for name in ("PlanePositionSequence", "PlaneOrientationSequence",
                                                          "PixelMeasuresSequence", "PixelValueTransformationSequence")]
        if count > 1 and None in groups[:3]:
            raise DataError(path, f"frame {i + 1} lacks its position, orientation or pixel spacing")
        plane, orient, measures, value = (ds if g is None else g for g in groups)  # a classic slice: its own tags
        thick = _number(path, measures, "SpacingBetweenSlices", _number(path, measures, "SliceThickness", 1.0))
        frames.append(_Frame(path, i, count, geometry_tag(path, orient, "ImageOrientationPatient", what),
                             geometry_tag(path, plane, "ImagePositionPatient", what),
                             geometry_tag(path, measures, "PixelSpacing", what), thick or 1.0,
                             (_number(path, value, "RescaleSlope", 1.0) or 1.0,
                              _number(path, value, "RescaleIntercept", 0.0)), shape, uid))
    return frames


def _series_items(folder: Path, series_uid: str | None) -> tuple[str, list[tuple[Path, pydicom.Dataset]]]:
    """The headers of the chosen series (the folder's only one, or ``series_uid``)."""
    series = _scan(folder)
    if series_uid is not None:
        if series_uid not in series:
            raise DataError(folder, f"no series with SeriesInstanceUID {series_uid}; found: {_describe(series)}")
        return series_uid, series[series_uid]
    if len(series) > 1:
        raise DataError(folder, f"folder mixes {len(series)} series; choose one by SeriesInstanceUID: "
                                f"{_describe(series)}")
    return next(iter(series.items()))


def plan_series(folder: str | Path, series_uid: str | None = None) -> tuple[str, list[_Frame], np.ndarray]:
    """Every frame of a series from the headers alone, in geometric order, checked as one volume.

    Frames are pooled from every file (classic slices, enhanced files of one or many frames) and
    sorted by their position along the slice normal; orientation, spacing, size, gaps and tilt are
    checked once for them all. :func:`probe_image` runs this without reading a pixel.

    Returns:
        ``(series_uid, frames, affine_lps)``.

    Raises:
        DataError: naming the file or folder, for anything that is not one uniform volume.
    """
    folder = Path(folder)
    series_uid, items = _series_items(folder, series_uid)
    for path, ds in items:
        _check_greyscale_slice(path, ds)
    frames = [f for path, ds in items for f in _file_frames(path, ds, len(items))]
    first = frames[0]
    for f in frames:
        in_file = "frames differ in {} (several stacks in one file); not one volume" if f.count > 1 else None
        if not np.allclose(f.orientation, first.orientation, atol=1e-4):
            raise DataError(f.path, in_file.format("orientation") if in_file and f.path == first.path
                            else "slice orientation differs from the rest of the series")
        if not np.allclose(f.spacing, first.spacing, atol=1e-4):
            raise DataError(f.path, "pixel spacing differs from the rest of the series; not one volume")
        if f.shape != first.shape:
            raise DataError(f.path, f"slice size {f.shape[0]}x{f.shape[1]} differs from "
                                    f"{first.shape[0]}x{first.shape[1]}")
    row_dir, col_dir = first.orientation[:3], first.orientation[3:]
    normal = np.cross(row_dir, col_dir)
    dist = np.array([float(f.position @ normal) for f in frames])
    order = np.argsort(dist, kind="stable")
    dist, frames = dist[order], [frames[i] for i in order]
    where = frames[0].path if len(items) == 1 else folder
    if len(frames) > 1:
        gaps = np.diff(dist)
        if np.any(gaps < 1e-4):
            raise DataError(frames[int(np.argmin(gaps)) + 1].path,
                            "two slices share the same position (duplicates, or several stacks or time points)")
        step = float(np.median(gaps))
        if np.max(np.abs(gaps - step)) > SPACING_RTOL * step:
            raise DataError(where, f"non-uniform slice spacing (gaps from {gaps.min():.3f} to {gaps.max():.3f} mm);"
                                   " resample the series before use")
        slice_vec = (frames[-1].position - frames[0].position) / (len(frames) - 1)
        check_no_tilt(where, slice_vec, normal, len(frames), first.spacing)
    else:
        slice_vec = normal * first.thickness
    return str(series_uid), frames, _affine_lps(row_dir, col_dir, first.spacing, slice_vec, frames[0].position)


def read_dicom_series(folder: str | Path, series_uid: str | None = None) -> DicomSeries:
    """Read one DICOM series from a folder into a (column, row, slice) array and RAS affine.

    Classic series (a file per slice), enhanced multi-frame files and enhanced series stored a
    frame per file all read the same way (:func:`plan_series`).

    Args:
        folder: the series folder.
        series_uid: which SeriesInstanceUID to read when the folder mixes several.

    Returns:
        The sorted series.

    Raises:
        DataError: no DICOM, several series and none chosen, inconsistent or non-uniform slices.
    """
    series_uid, frames, affine_lps = plan_series(folder, series_uid)
    pixels: dict[Path, np.ndarray] = {}
    slices = []
    for f in frames:
        if f.path not in pixels:
            pixels[f.path] = _pixels(f.path, pydicom.dcmread(f.path)).reshape(f.count, *f.shape)
        slices.append(pixels[f.path][f.index] * np.float32(f.rescale[0]) + np.float32(f.rescale[1]))
    volume = np.stack(slices, axis=-1).transpose(1, 0, 2)  # (rows, cols, k) -> (cols, rows, k)
    per_slice = all(f.count == 1 for f in frames)  # a file per slice: the files name the slices
    files = [f.path for f in frames] if per_slice else list(dict.fromkeys(f.path for f in frames))
    return DicomSeries(np.ascontiguousarray(volume, dtype=np.float32), LPS_TO_RAS @ affine_lps, series_uid, files,
                       [f.sop_uid for f in frames] if per_slice else [])


GEOMETRY_TAGS = {"ImageOrientationPatient": ("(0020,0037)", 6), "ImagePositionPatient": ("(0020,0032)", 3),
                 "PixelSpacing": ("(0028,0030)", 2)}


def geometry_tag(path: Path, ds: pydicom.Dataset, keyword: str, what: str = "slice") -> np.ndarray:
    """The numbers of a geometry tag (orientation, position, pixel spacing) of one slice or frame.

    Args:
        path: the file, named in the error.
        ds: the dataset (a slice, or a frame's functional-group item).
        keyword: ``ImageOrientationPatient``, ``ImagePositionPatient`` or ``PixelSpacing``.
        what: how the error calls ``ds`` (``slice``, ``frame 3``).

    Raises:
        DataError: naming ``path`` and the tag, when the tag is missing, empty, not numbers or of the wrong length.
    """
    tag, count = GEOMETRY_TAGS[keyword]
    value = ds.get(keyword)
    if value is None or value == "":
        raise DataError(path, f"{what} has no {keyword} {tag}: it cannot be placed in the volume")
    try:
        numbers = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise DataError(path, f"{what} has a {keyword} {tag} that is not numbers ({exc})") from exc
    if numbers.size != count or not np.all(np.isfinite(numbers)):
        raise DataError(path, f"{what} has a {keyword} {tag} of {numbers.size} values; {count} finite numbers expected")
    return numbers


def check_no_tilt(where: Path, slice_vec: np.ndarray, normal: np.ndarray, count: int, spacing_rc: np.ndarray) -> None:
    """Refuse a sheared stack: slices that step sideways as well as along their normal (CT gantry tilt).

    The affine could hold the shear, but a NIfTI qform cannot, and ITK (3D Slicer) places such a
    file by its qform: the same voxels would lie elsewhere there. Tolerated: a sideways drift over
    the whole stack under half the smallest pixel (rounding of ImagePositionPatient).

    Raises:
        DataError: naming ``where`` and the tilt angle.
    """
    along = float(slice_vec @ normal)
    sideways = slice_vec - along * normal
    if np.linalg.norm(sideways) * (count - 1) <= 0.5 * float(np.min(spacing_rc)):
        return
    angle = float(np.degrees(np.arctan2(np.linalg.norm(sideways), abs(along))))
    raise DataError(where, f"gantry tilt of {angle:.1f} degrees: resample it first (e.g. dcm2niix)")


def _affine_lps(row_dir: np.ndarray, col_dir: np.ndarray, spacing_rc: np.ndarray, slice_vec: np.ndarray,
                origin: np.ndarray) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, 0] = row_dir * spacing_rc[1]  # column index i walks along the row direction
    affine[:3, 1] = col_dir * spacing_rc[0]  # row index j walks along the column direction
    affine[:3, 2] = slice_vec
    affine[:3, 3] = origin
    return affine


def _pixels(path: Path, ds: pydicom.Dataset) -> np.ndarray:
    """Decoded pixels (any transfer syntax pydicom's plugins handle: JPEG, JPEG-LS, JPEG 2000, RLE)."""
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for bad pixel data
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", syntax)
        raise DataError(path, f"cannot decode pixel data (transfer syntax {name}: {str(exc).splitlines()[0]})") from exc
    return scalar_float32(path, pixels)


def _check_greyscale_slice(path: Path, ds: pydicom.Dataset) -> None:
    """Refuse what cannot be a greyscale volume: colour / secondary-capture pictures, Siemens mosaics."""
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if samples != 1 or not photometric.startswith("MONOCHROME"):
        raise DataError(path, f"is a colour image ({photometric}, {samples} samples per pixel); "
                              "a greyscale CT/MR volume is expected")
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    if "MOSAIC" in image_type:
        raise DataError(path, "is a Siemens mosaic (several slices tiled in one image); convert the series with "
                              "dcm2niix first")


def _frame_item(ds: pydicom.Dataset, i: int, name: str) -> pydicom.Dataset | None:
    """Functional-group macro ``name`` of frame ``i`` (per-frame first, then shared)."""
    for groups in (ds.get("PerFrameFunctionalGroupsSequence"), ds.get("SharedFunctionalGroupsSequence")):
        if groups is None:
            continue
        group = groups[i] if groups is ds.get("PerFrameFunctionalGroupsSequence") else groups[0]
        seq = group.get(name)
        if seq:
            return seq[0]
    return None
