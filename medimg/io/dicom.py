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


def read_dicom_series(folder: str | Path, series_uid: str | None = None) -> DicomSeries:
    """Read one DICOM series from a folder into a (column, row, slice) array and RAS affine.

    Args:
        folder: the series folder.
        series_uid: which SeriesInstanceUID to read when the folder mixes several.

    Returns:
        The sorted series.

    Raises:
        DataError: no DICOM, several series and none chosen, inconsistent or non-uniform slices.
    """
    folder = Path(folder)
    series = _scan(folder)
    if series_uid is not None:
        if series_uid not in series:
            raise DataError(folder, f"no series with SeriesInstanceUID {series_uid}; found: {_describe(series)}")
        items = series[series_uid]
    elif len(series) > 1:
        raise DataError(folder, f"folder mixes {len(series)} series; choose one by SeriesInstanceUID: "
                                f"{_describe(series)}")
    else:
        series_uid, items = next(iter(series.items()))

    for path, ds in items:
        _check_greyscale_slice(path, ds)
    frames = [(path, int(ds.get("NumberOfFrames", 1) or 1)) for path, ds in items]
    if len(items) == 1 and frames[0][1] > 1:
        return _read_multiframe(items[0][0], str(series_uid))
    several = [(path, n) for path, n in frames if n > 1]
    if several:
        raise DataError(several[0][0], f"multi-frame file ({several[0][1]} frames) in one series of several files; "
                                       "give each multi-frame file a folder of its own")
    first = items[0][1]
    iop = geometry_tag(items[0][0], first, "ImageOrientationPatient")
    spacing_rc = geometry_tag(items[0][0], first, "PixelSpacing")
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    shape = (int(first.Rows), int(first.Columns))
    positions = []
    for path, ds in items:
        if not np.allclose(geometry_tag(path, ds, "ImageOrientationPatient"), iop, atol=1e-4):
            raise DataError(path, "slice orientation differs from the rest of the series")
        if (int(ds.Rows), int(ds.Columns)) != shape:
            raise DataError(path, f"slice size {ds.Rows}x{ds.Columns} differs from {shape[0]}x{shape[1]}")
        positions.append(geometry_tag(path, ds, "ImagePositionPatient"))
    dist = np.array([float(p @ normal) for p in positions])
    order = np.argsort(dist, kind="stable")
    dist = dist[order]
    items = [items[i] for i in order]
    positions = [positions[i] for i in order]

    if len(items) > 1:
        gaps = np.diff(dist)
        if np.any(gaps < 1e-4):
            dup = items[int(np.argmin(gaps)) + 1][0]
            raise DataError(dup, "two slices share the same position (duplicate or mixed acquisitions)")
        step = float(np.median(gaps))
        if np.max(np.abs(gaps - step)) > SPACING_RTOL * step:
            raise DataError(folder, f"non-uniform slice spacing (gaps from {gaps.min():.3f} to {gaps.max():.3f} mm);"
                                    " resample the series before use")
        slice_vec = (positions[-1] - positions[0]) / (len(items) - 1)
        check_no_tilt(folder, slice_vec, normal, len(items), spacing_rc)
    else:
        thickness = float(first.get("SpacingBetweenSlices", first.get("SliceThickness", 1.0)) or 1.0)
        slice_vec = normal * thickness

    affine_lps = _affine_lps(row_dir, col_dir, spacing_rc, slice_vec, positions[0])
    slices = []
    for path, _ in items:
        ds = pydicom.dcmread(path)
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        slices.append(_pixels(path, ds) * slope + intercept)
    volume = np.stack(slices, axis=-1).transpose(1, 0, 2)  # (rows, cols, k) -> (cols, rows, k)
    return DicomSeries(np.ascontiguousarray(volume), LPS_TO_RAS @ affine_lps, str(series_uid),
                       [p for p, _ in items], [str(ds.get("SOPInstanceUID", "")) for _, ds in items])


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


def _read_multiframe(path: Path, series_uid: str) -> DicomSeries:
    """One enhanced multi-frame CT/MR file: the geometry of each frame from its functional groups."""
    ds = pydicom.dcmread(path)
    n = int(ds.NumberOfFrames)
    if "PerFrameFunctionalGroupsSequence" not in ds:
        raise DataError(path, f"multi-frame image ({n} frames) without per-frame functional groups: "
                              "its frames cannot be placed in space")
    positions, orients, spacings, rescale = [], [], [], []
    for i in range(n):
        plane = _frame_item(ds, i, "PlanePositionSequence")
        orient = _frame_item(ds, i, "PlaneOrientationSequence")
        measures = _frame_item(ds, i, "PixelMeasuresSequence")
        if plane is None or orient is None or measures is None:
            raise DataError(path, f"frame {i + 1} lacks its position, orientation or pixel spacing")
        positions.append(geometry_tag(path, plane, "ImagePositionPatient", f"frame {i + 1}"))
        orients.append(geometry_tag(path, orient, "ImageOrientationPatient", f"frame {i + 1}"))
        spacings.append(geometry_tag(path, measures, "PixelSpacing", f"frame {i + 1}"))
        value = _frame_item(ds, i, "PixelValueTransformationSequence")
        rescale.append((float(value.get("RescaleSlope", 1.0)), float(value.get("RescaleIntercept", 0.0)))
                       if value is not None else (1.0, 0.0))
    if any(not np.allclose(o, orients[0], atol=1e-4) for o in orients):
        raise DataError(path, "frames differ in orientation (several stacks in one file); not one volume")
    if any(not np.allclose(sp, spacings[0], atol=1e-4) for sp in spacings):
        raise DataError(path, "frames differ in pixel spacing; not one volume")
    row_dir, col_dir = orients[0][:3], orients[0][3:]
    normal = np.cross(row_dir, col_dir)
    dist = np.array([p @ normal for p in positions])
    order = np.argsort(dist, kind="stable")
    if n > 1:
        gaps = np.diff(dist[order])
        if np.any(gaps < 1e-4):
            raise DataError(path, "two frames share the same position (several stacks or time points in one file)")
        step = float(np.median(gaps))
        if np.max(np.abs(gaps - step)) > SPACING_RTOL * step:
            raise DataError(path, "non-uniform frame spacing; resample before use")
        slice_vec = (positions[order[-1]] - positions[order[0]]) / (n - 1)
        check_no_tilt(path, slice_vec, normal, n, spacings[0])
    else:
        slice_vec = normal * float(_frame_item(ds, 0, "PixelMeasuresSequence").get("SliceThickness", 1.0) or 1.0)
    frames = _pixels(path, ds).reshape(n, int(ds.Rows), int(ds.Columns))
    volume = np.stack([frames[i] * rescale[i][0] + rescale[i][1] for i in order], axis=-1).transpose(1, 0, 2)
    affine = _affine_lps(row_dir, col_dir, spacings[0], slice_vec, positions[order[0]])
    return DicomSeries(np.ascontiguousarray(volume, dtype=np.float32), LPS_TO_RAS @ affine, series_uid, [path])
