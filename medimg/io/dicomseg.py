"""DICOM Segmentation (SEG) output with highdicom, referencing the series the labels came from.

:func:`write_dicom_seg` turns a label map on a DICOM series' own grid (the (column, row, slice)
array :func:`~medimg.io.dicom.read_dicom_series` gives, in its geometric slice order) into a
binary DICOM SEG: one segment per label value, named from the bundle's labels, one frame per
source slice that holds the segment, each frame referencing its source image (SOP instance) and
carrying its position, so viewers (3D Slicer, OHIF) place it exactly on the series.

:func:`seg_to_labels` reads a SEG back onto its source series' grid (by the source instances its
frames reference); :func:`raw_labels` reads OHIF's ``label.bin`` (raw voxels of the series grid).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pydicom

from medimg.errors import DataError, atomic_output
from medimg.io.dicom import read_dicom_series

# Type 2 patient / study attributes a SEG copies from its source: present, if empty, when a source lacks them
TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                "ReferringPhysicianName", "StudyID", "AccessionNumber")
# a generic SNOMED-CT category/type pair for segments of unknown anatomy (the bundle names them)
CATEGORY = ("91723000", "SCT", "Anatomical Structure")
PROPERTY = ("85756007", "SCT", "Tissue")


def write_dicom_seg(labels: np.ndarray, series_folder: str | Path, out: str | Path,
                    segment_names: Mapping[int, str], algorithm: str = "medimg",
                    algorithm_version: str = "0") -> Path:
    """Write ``labels`` (the series' own grid and slice order) as a DICOM SEG referencing the series.

    Args:
        labels: integer label map, shape ``(columns, rows, slices)`` as read from ``series_folder``.
        series_folder: the DICOM series the labels were predicted on (classic, one file per slice).
        out: the ``.dcm`` file to write (atomically).
        segment_names: label value -> segment label (values absent from ``labels`` get no segment).
        algorithm: the algorithm's name (the bundle), stored in the segment descriptions.
        algorithm_version: its version.

    Returns:
        ``out``.

    Raises:
        DataError: a multi-frame source, a label map that does not fit the series, or no segment.
    """
    import highdicom as hd
    from pydicom.sr.coding import Code

    series = read_dicom_series(series_folder)
    if len(series.files) == 1 and series.array.shape[2] > 1:
        raise DataError(series_folder, "DICOM SEG output needs a classic series (one file per slice), "
                                       "not an enhanced multi-frame image")
    labels = np.asarray(labels)
    if labels.shape != series.array.shape:
        raise DataError(out, f"label map shape {labels.shape} does not fit the series {series.array.shape}")
    values = [int(v) for v in np.unique(labels) if v > 0]
    if not values:
        raise DataError(out, "the prediction is empty: a DICOM SEG needs at least one segment")
    sources = [pydicom.dcmread(p) for p in series.files]
    for ds in sources:
        for keyword in TYPE2_COPIED:
            if keyword not in ds:
                setattr(ds, keyword, "")
    algo = hd.AlgorithmIdentificationSequence(name=algorithm, version=algorithm_version,
                                              family=Code("113110", "DCM", "Artificial Intelligence"))
    descriptions = [hd.seg.SegmentDescription(
        segment_number=n, segment_label=str(segment_names.get(v, f"label {v}"))[:64],
        segmented_property_category=Code(*CATEGORY), segmented_property_type=Code(*PROPERTY),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algo)
        for n, v in enumerate(values, start=1)]
    # frames (slice, row, column) holding segment numbers 1..n in the order of the descriptions
    remap = np.zeros(int(labels.max()) + 1, dtype=np.uint8)
    remap[values] = np.arange(1, len(values) + 1)
    frames = np.ascontiguousarray(remap[labels.astype(np.int64)].transpose(2, 1, 0))
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=9001,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="medimg", manufacturer_model_name=algorithm[:64],
        software_versions=algorithm_version, device_serial_number="0", content_label="MEDIMG",
        content_description=f"{algorithm} segmentation"[:64], omit_empty_frames=True)
    out = Path(out)
    with atomic_output(out) as tmp:
        seg.save_as(tmp)
    return out


def seg_to_labels(seg_file: str | Path, series_folder: str | Path) -> np.ndarray:
    """A DICOM SEG as a label map on its source series' stored grid (segment number = label value)."""
    import highdicom as hd

    series = read_dicom_series(series_folder)
    seg = hd.seg.segread(str(seg_file))
    referenced = {str(r.ReferencedSOPInstanceUID) for item in seg.ReferencedSeriesSequence
                  for r in item.ReferencedInstanceSequence}
    slices = {u: k for k, u in enumerate(series.sop_uids) if u in referenced}  # source instance -> slice k
    if not slices:
        raise DataError(seg_file, f"references no instance of the series in {series_folder}")
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=list(slices), combine_segments=True,
                                               skip_overlap_checks=True)
    labels = np.zeros(series.array.shape, dtype=np.uint8)
    for k, frame in zip(slices.values(), pixels):
        labels[:, :, k] = np.asarray(frame).T
    return labels


def raw_labels(path: str | Path, shape: tuple[int, ...]) -> np.ndarray:
    """OHIF's ``label.bin``: uint8 (or uint16) voxels of the series grid, column fastest (Fortran order)."""
    data = Path(path).read_bytes()
    n = int(np.prod(shape))
    for dtype in (np.uint8, np.uint16):
        if len(data) == n * np.dtype(dtype).itemsize:
            return np.frombuffer(data, dtype=dtype).reshape(shape, order="F").astype(np.uint8)
    raise DataError(Path(path).name, f"holds {len(data)} bytes, not the {n} voxels of the series (uint8 or uint16)")
