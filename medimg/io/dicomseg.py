"""DICOM Segmentation (SEG) output with highdicom, referencing the series the labels came from.

:func:`write_dicom_seg` turns a label map on a DICOM series' own grid (the (column, row, slice)
array :func:`~medimg.io.dicom.read_dicom_series` gives, in its geometric slice order) into a
binary DICOM SEG: one segment per label value, named from the bundle's labels, one frame per
source slice that holds the segment, each frame referencing its source image (SOP instance) and
carrying its position, so viewers (3D Slicer, OHIF) place it exactly on the series.

Label values: a BINARY SEG numbers its segments 1, 2, ... n (the standard requires it), so the
values present (say 2 and 3, with no 1) are not the segment numbers. Each segment's label is the
value's name, and its ``SegmentDescription`` says ``medimg label value <v>``; the SEG's
``Manufacturer`` is ``medimg`` (:data:`MANUFACTURER`). ``ContentLabel`` is ``MEDIMG`` unless the
caller names the SEG otherwise (the PACS datastore marks its final labels).

Each segment says how it was made (``SegmentAlgorithmType``): ``AUTOMATIC`` for a model's output
and ``SEMIAUTOMATIC`` for an annotator's edit of one (both name the model, its bundle name and
version, as the algorithm), ``MANUAL`` for a label an annotator drew (no algorithm).

:func:`seg_to_labels` reads a SEG back onto its source series' grid: by the source instances its
frames reference, or, where a SEG's frames do not name one source instance each (3D Slicer's
Reporting module referenced every source image from every frame; highdicom refuses such a file),
by each frame's position on the series' slices. A SEG that references other series but not this
one is refused. Each segment becomes a label value (:func:`segment_values`): given the bundle's
labels (``{name: value}``), by the segment's label (case, spaces and underscores aside), then by
the value medimg stored, and a segment known by neither is refused; without them, by the value
medimg stored, else (another tool's SEG) by its segment number. :func:`raw_labels` reads OHIF's
``label.bin`` (raw voxels of the series grid).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pydicom

from medimg.errors import DataError, atomic_output
from medimg.io.dicom import DicomSeries, read_dicom_series

# Type 2 patient / study attributes a SEG copies from its source: present, if empty, when a source lacks them
TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                "ReferringPhysicianName", "StudyID", "AccessionNumber")
# a generic SNOMED-CT category/type pair for segments of unknown anatomy (the bundle names them)
CATEGORY = ("91723000", "SCT", "Anatomical Structure")
PROPERTY = ("85756007", "SCT", "Tissue")
ALGORITHM_TYPES = ("AUTOMATIC", "SEMIAUTOMATIC", "MANUAL")
MANUFACTURER = "medimg"  # the SEG's Manufacturer: its SegmentDescription values are medimg's own
VALUE_NOTE = "medimg label value "  # + the label value: each segment's SegmentDescription


def write_dicom_seg(labels: np.ndarray, series_folder: str | Path, out: str | Path,
                    segment_names: Mapping[int, str], algorithm: str = "medimg",
                    algorithm_version: str = "0", algorithm_type: str = "AUTOMATIC",
                    content_label: str = "MEDIMG") -> Path:
    """Write ``labels`` (the series' own grid and slice order) as a DICOM SEG referencing the series.

    Args:
        labels: integer label map, shape ``(columns, rows, slices)`` as read from ``series_folder``.
        series_folder: the DICOM series the labels were predicted on (classic, one file per slice).
        out: the ``.dcm`` file to write (atomically).
        segment_names: label value -> segment label (values absent from ``labels`` get no segment).
        algorithm: the algorithm's name (the bundle), stored in the segment descriptions; for a
            ``MANUAL`` label the software that wrote it (the SEG's equipment, no algorithm).
        algorithm_version: its version.
        algorithm_type: ``AUTOMATIC`` (a model's output), ``SEMIAUTOMATIC`` (an annotator's edit
            of a model's output) or ``MANUAL`` (drawn by an annotator).
        content_label: the SEG's ``ContentLabel`` (a DICOM CS: capitals, digits, ``_``, 16 at most).

    Returns:
        ``out``.

    Raises:
        DataError: a multi-frame source, a label map that does not fit the series, or no segment.
        ValueError: an unknown ``algorithm_type``.
    """
    import highdicom as hd
    from pydicom.sr.coding import Code

    kind = algorithm_type.upper()
    if kind not in ALGORITHM_TYPES:
        raise ValueError(f"algorithm_type {algorithm_type!r}: use one of {', '.join(ALGORITHM_TYPES)}")
    series = read_dicom_series(series_folder)
    if len(series.files) != series.array.shape[2]:  # a multi-frame file holds several slices
        raise DataError(series_folder, "DICOM SEG output needs a classic series (one file per slice), "
                                       "not an enhanced multi-frame image")
    labels = np.asarray(labels)
    if labels.shape != series.array.shape:
        raise DataError(out, f"label map shape {labels.shape} does not fit the series {series.array.shape}")
    values = [int(v) for v in np.unique(labels) if v > 0]
    if not values:
        raise DataError(out, "the prediction is empty: a DICOM SEG needs at least one segment")
    sources = [pydicom.dcmread(p) for p in series.files]
    iop = sources[0].get("ImageOrientationPatient")
    for ds in sources:
        if iop is not None and "ImageOrientationPatient" in ds:
            # scanners round each slice's orientation on its own (GE: 1e-8 apart); the reader checked
            # they agree, highdicom wants them equal: the SEG's one orientation is the first slice's
            ds.ImageOrientationPatient = iop
        for keyword in TYPE2_COPIED:
            if keyword not in ds:
                setattr(ds, keyword, "")
    algo = None if kind == "MANUAL" else hd.AlgorithmIdentificationSequence(
        name=algorithm, version=algorithm_version, family=Code("113110", "DCM", "Artificial Intelligence"))
    descriptions = [hd.seg.SegmentDescription(
        segment_number=n, segment_label=str(segment_names.get(v, f"label {v}"))[:64],
        segmented_property_category=Code(*CATEGORY), segmented_property_type=Code(*PROPERTY),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues(kind), algorithm_identification=algo)
        for n, v in enumerate(values, start=1)]
    for description, v in zip(descriptions, values):
        description.SegmentDescription = f"{VALUE_NOTE}{v}"  # the value, as the number need not be it
    # frames (slice, row, column) holding segment numbers 1..n in the order of the descriptions
    remap = np.zeros(int(labels.max()) + 1, dtype=np.uint8)
    remap[values] = np.arange(1, len(values) + 1)
    frames = np.ascontiguousarray(remap[labels.astype(np.int64)].transpose(2, 1, 0))
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=9001,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer=MANUFACTURER,
        manufacturer_model_name=algorithm[:64], software_versions=algorithm_version, device_serial_number="0",
        content_label=content_label,
        content_description=f"{algorithm} segmentation"[:64], omit_empty_frames=True)
    out = Path(out)
    with atomic_output(out) as tmp:
        seg.save_as(tmp)
    return out


def seg_to_labels(seg_file: str | Path, series_folder: str | Path,
                  label_values: Mapping[str, int] | None = None) -> np.ndarray:
    """A DICOM SEG as a label map on its source series' stored grid, each segment as its label value.

    Frames are placed by the source instance each references (highdicom), else by their position
    on the series' slices (module docstring).

    Args:
        seg_file: the SEG.
        series_folder: the series it labels.
        label_values: the bundle's labels ``{name: value}``: segments are mapped by name
            (:func:`segment_values`); ``None``: by medimg's stored value, else the segment number.

    Raises:
        DataError: a SEG that references other series but not this one, none of whose frames lies
            on the series, or (with ``label_values``) with a segment of no known label.
    """
    import highdicom as hd

    series = read_dicom_series(series_folder)
    header = pydicom.dcmread(seg_file, stop_before_pixels=True)
    referenced_series = {str(item.get("SeriesInstanceUID", "")) for item in header.get("ReferencedSeriesSequence", [])}
    if referenced_series and series.series_uid not in referenced_series:
        raise DataError(seg_file, f"references series {', '.join(sorted(referenced_series))}, "
                                  f"not the series in {series_folder} ({series.series_uid})")
    values = segment_values(header, label_values, seg_file)
    try:
        seg = hd.seg.segread(str(seg_file))
        referenced = {str(r.ReferencedSOPInstanceUID) for item in seg.ReferencedSeriesSequence
                      for r in item.ReferencedInstanceSequence}
        slices = {u: k for k, u in enumerate(series.sop_uids) if u in referenced}  # source instance -> slice k
        pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=list(slices), combine_segments=True,
                                                   skip_overlap_checks=True) if slices else None
    except Exception:  # noqa: BLE001 - highdicom refuses SEGs whose frames name several source images
        pixels = None
    if pixels is None:
        numbers = _labels_by_position(pydicom.dcmread(seg_file), series, seg_file, series_folder)
    else:
        numbers = np.zeros(series.array.shape, dtype=np.uint16)
        for k, frame in zip(slices.values(), pixels):
            numbers[:, :, k] = np.asarray(frame).T
    lut = np.zeros(max(values, default=0) + 1, dtype=np.uint8)
    for number, value in values.items():
        lut[number] = value
    if numbers.max() >= len(lut):
        raise DataError(seg_file, f"frames hold segment {int(numbers.max())}, which the SEG does not describe")
    return lut[numbers]


def label_key(label: str) -> str:
    """A label name as segments are compared: case-insensitively, underscores and spaces alike."""
    return " ".join(label.replace("_", " ").casefold().split())


def stored_value(segment: pydicom.Dataset) -> int | None:
    """The label value medimg stored in a segment's ``SegmentDescription`` (module docstring), if any."""
    note = str(segment.get("SegmentDescription", ""))
    tail = note[len(VALUE_NOTE):]
    return int(tail) if note.startswith(VALUE_NOTE) and tail.isdigit() else None


def segment_values(ds: pydicom.Dataset, label_values: Mapping[str, int] | None = None,
                   source: str | Path = "SEG") -> dict[int, int]:
    """``{segment number: label value}`` of a SEG (its header is enough; module docstring).

    Raises:
        DataError: with ``label_values``, a segment whose label is none of them and that holds no
            medimg value; a value beyond 255.
    """
    known = {label_key(str(k)): int(v) for k, v in (label_values or {}).items()}
    ours = str(ds.get("Manufacturer", "")) == MANUFACTURER
    values = {}
    for segment in ds.get("SegmentSequence", []):
        number, label = int(segment.SegmentNumber), str(segment.get("SegmentLabel", ""))
        stored = stored_value(segment) if ours else None
        if label_values is not None:
            value = known.get(label_key(label), stored)
        else:
            value = number if stored is None else stored
        if value is None:
            raise DataError(source, f"segment {number} {label!r} is not one of the labels "
                                    f"{', '.join(sorted(map(str, label_values or {})))}")
        if not 0 <= value <= 255:
            raise DataError(source, f"segment {number} {label!r} has label value {value}, beyond 0-255")
        values[number] = value
    return values


def _labels_by_position(ds: pydicom.Dataset, series: DicomSeries, seg_file: str | Path,
                        series_folder: str | Path) -> np.ndarray:
    """Each SEG frame's segment number onto the series slice at its position (origin and orientation must agree)."""
    from medimg.io.dicom import LPS_TO_RAS, _frame_item, geometry_tag

    if ds.get("Modality") != "SEG" or "PixelData" not in ds:
        raise DataError(seg_file, "is not a DICOM SEG with frames")
    frames = np.asarray(ds.pixel_array).reshape(int(ds.get("NumberOfFrames", 1) or 1), int(ds.Rows), int(ds.Columns))
    if str(ds.get("SegmentationType", "BINARY")).upper() == "FRACTIONAL":
        frames = frames > float(ds.get("MaximumFractionalValue", 255)) / 2
    lps = LPS_TO_RAS @ series.affine
    axes = lps[:3, :2] / np.linalg.norm(lps[:3, :2], axis=0)  # the series' row and column directions
    to_voxel = np.linalg.inv(lps)  # LPS mm -> (column, row, slice) index
    labels = np.zeros(series.array.shape, dtype=np.uint16)  # segment numbers
    placed = 0
    for i, frame in enumerate(frames):
        plane, orient = _frame_item(ds, i, "PlanePositionSequence"), _frame_item(ds, i, "PlaneOrientationSequence")
        ident = _frame_item(ds, i, "SegmentIdentificationSequence")
        if plane is None or ident is None or frame.shape != series.array.shape[1::-1]:
            continue
        what = f"frame {i + 1}"
        if orient is not None and not np.allclose(geometry_tag(seg_file, orient, "ImageOrientationPatient", what),
                                                  axes.T.reshape(-1), atol=1e-3):
            continue  # another orientation than the series'
        ijk = to_voxel @ np.append(geometry_tag(seg_file, plane, "ImagePositionPatient", what), 1.0)
        k = int(round(ijk[2]))
        if abs(ijk[0]) > 0.05 or abs(ijk[1]) > 0.05 or abs(ijk[2] - k) > 0.05 or not 0 <= k < labels.shape[2]:
            continue  # not on one of the series' slices
        labels[:, :, k][np.asarray(frame).T > 0] = int(ident.ReferencedSegmentNumber)
        placed += 1
    if not placed:
        raise DataError(seg_file, f"no frame lies on a slice of the series in {series_folder}")
    return labels


def label_map(array: np.ndarray, what: str | Path) -> np.ndarray:
    """``array`` as a uint8 label map, or :class:`DataError` naming ``what`` for values a SEG cannot hold.

    A SEG stores label values 1..255 (:data:`VALUE_NOTE`): a value outside 0..255 or not a whole
    number is refused, never wrapped (256 would become 0 and the label read as empty).
    """
    array = np.asarray(array)
    if array.size:
        lo, hi = float(np.min(array)), float(np.max(array))
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0 or hi > 255:
            raise DataError(what, f"label values must lie in 0..255, found {lo:g}..{hi:g}")
        if array.dtype.kind == "f" and not np.array_equal(array, np.rint(array)):
            raise DataError(what, "label values must be whole numbers")
    return np.rint(array).astype(np.uint8) if array.dtype.kind == "f" else array.astype(np.uint8)


def raw_labels(path: str | Path, shape: tuple[int, ...]) -> np.ndarray:
    """OHIF's ``label.bin``: uint8 (or uint16) voxels of the series grid, column fastest (Fortran order)."""
    data = Path(path).read_bytes()
    n = int(np.prod(shape))
    for dtype in (np.uint8, np.uint16):
        if len(data) == n * np.dtype(dtype).itemsize:
            return label_map(np.frombuffer(data, dtype=dtype).reshape(shape, order="F"), Path(path).name)
    raise DataError(Path(path).name, f"holds {len(data)} bytes, not the {n} voxels of the series (uint8 or uint16)")
