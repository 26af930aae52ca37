"""Real vendors' DICOM series (``/work/shared/dicom-vendors``, see its README) for the datastore tests.

Their UIDs are the scanners' own and are never rewritten. GE's two series differ only in their last
component (``.299``, ``.303``), the Siemens ones end in ``.0.0.0``. Every one of them holds several
volumes (GE: diffusion directions, Philips: fMRI time points, Siemens: mosaics of time points),
which medimg's series reader refuses; :func:`one_volume` picks the first instance at each slice
position (GE's b=0 volume, Philips' first time point), a volume it reads. Siemens mosaics it
refuses whatever is picked. A Toshiba/Canon-style UID, which MONAI Label cuts to ``1``, is given to
a small synthetic series (no such real series is at hand).

:data:`SLICER_SEG` is a DICOM SEG 3D Slicer wrote (``data/README.md``); :func:`slicer_seg_source`
rebuilds the CT slices around its segment from the SEG's own references and frame positions.
"""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from medimg.io.dicom import is_dicom_file
from tests.helpers import REPO, write_dicom_series

VENDORS = Path(os.environ.get("MEDIMG_DICOM_VENDORS") or REPO.parent / "shared" / "dicom-vendors")
GE_299 = "1.2.840.113619.2.44.7088985.14091324.23121.1601318184.299"
GE_303 = "1.2.840.113619.2.44.7088985.14091324.23121.1601318184.303"
PHILIPS = "1.3.46.670589.11.38317.5.0.4496.2014021409060423022"
SIEMENS = ("1.3.12.2.1107.5.2.32.35131.2014031012574456721089244.0.0.0",
           "1.3.12.2.1107.5.2.32.35131.2014031012594252969190142.0.0.0",
           "1.3.12.2.1107.5.2.32.35131.2014031012581381872989464.0.0.0")
TOSHIBA_STYLE = "1.2.392.200036.9116.2.6.1.48.1214833767.1398645654.89.7007"
SLICER_SEG = Path(__file__).parent / "data" / "slicer_reporting_seg.dcm.gz"


def vendor_series() -> dict[str, list[Path]]:
    """SeriesInstanceUID -> the readable DICOM files of each real vendor series."""
    if not VENDORS.is_dir():  # the suite's reference data: a missing folder fails, like the MONAI schema
        pytest.fail(f"real vendor DICOM series not found at {VENDORS}; set MEDIMG_DICOM_VENDORS")
    series: dict[str, list[Path]] = {}
    for path in sorted(VENDORS.glob("*/*/*")):
        if path.is_file() and is_dicom_file(path):
            try:
                ds = pydicom.dcmread(path)
                ds.pixel_array  # noqa: B018 - one Philips file is truncated: Orthanc refuses it
            except Exception:  # noqa: BLE001, S112 - skip what does not read whole
                continue
            series.setdefault(str(ds.SeriesInstanceUID), []).append(path)
    assert {GE_299, GE_303, PHILIPS, *SIEMENS} <= set(series), sorted(series)
    return series


def one_volume(files: list[Path]) -> list[Path]:
    """The first instance (by InstanceNumber) at each slice position: one volume of a multi-volume series."""
    first: dict[tuple[float, ...], tuple[int, Path]] = {}
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        key = tuple(round(float(v), 2) for v in ds.ImagePositionPatient)
        number = int(ds.get("InstanceNumber", 0) or 0)
        if key not in first or number < first[key][0]:
            first[key] = (number, path)
    return sorted(p for _, p in first.values())


def copy_files(files: list[Path], folder: Path) -> Path:
    """Copy ``files`` into ``folder`` (writable copies of the read-only originals)."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in files:
        shutil.copyfile(path, folder / path.name)
    return folder


def philips_volume(folder: Path, without: str | None = None, position: int = 0) -> list[Path]:
    """Philips' real fMRI series, its first time point (9 slices of 64x64), copied into ``folder``, sorted by name.

    ``without``: a tag keyword deleted from the ``position``-th file (a slice as a broken exporter writes it).
    """
    files = sorted(copy_files(one_volume(vendor_series()[PHILIPS]), folder).iterdir())
    if without is not None:
        ds = pydicom.dcmread(files[position])
        delattr(ds, without)
        ds.save_as(files[position])
    return files


def toshiba_style_series(folder: Path) -> Path:
    """A small synthetic series whose SeriesInstanceUID has Toshiba/Canon's shape (all short components)."""
    rng = np.random.default_rng(7)
    write_dicom_series(rng.integers(0, 1000, (16, 16, 4)).astype(float), np.diag([0.8, 0.8, 2.0, 1.0]), folder,
                       series_uid=TOSHIBA_STYLE)
    return folder


def slicer_seg() -> pydicom.Dataset:
    """3D Slicer's SEG (every frame references all 275 source images; 16 frames hold the segment)."""
    with gzip.open(SLICER_SEG) as fh:
        return pydicom.dcmread(fh)


def slicer_seg_source(folder: Path, first: int = 148, count: int = 21) -> Path:
    """CT slices ``first .. first + count - 1`` of the SEG's source series: its UIDs, frame positions, blank pixels.

    Which referenced SOP instance sat at which position is not in the SEG; the ``k``-th reference
    is given to the ``k``-th frame's position.
    """
    seg = slicer_seg()
    ref = seg.ReferencedSeriesSequence[0]
    uids = [str(r.ReferencedSOPInstanceUID) for r in ref.ReferencedInstanceSequence]
    frames = seg.PerFrameFunctionalGroupsSequence
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(first, first + count):
        ds = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uids[k]
        ds.StudyInstanceUID, ds.SeriesInstanceUID = seg.StudyInstanceUID, ref.SeriesInstanceUID
        ds.FrameOfReferenceUID, ds.PatientID, ds.PatientName = seg.FrameOfReferenceUID, seg.PatientID, seg.PatientName
        ds.ImagePositionPatient = list(frames[k].PlanePositionSequence[0].ImagePositionPatient)
        ds.ImageOrientationPatient, ds.PixelSpacing, ds.InstanceNumber = [1, 0, 0, 0, 1, 0], [0.78125] * 2, k + 1
        ds.Rows = ds.Columns = 512
        ds.PixelData = np.zeros((512, 512), np.int16).tobytes()
        ds.save_as(folder / f"{k}.dcm")
    return folder


def foreign_seg(folder: Path, numbered: np.ndarray, names: list[str], out: Path, *, manufacturer: str = "Slicer",
                series_number: int = 5) -> Path:
    """A SEG another tool (3D Slicer / dcmqi) wrote with highdicom: segments 1..n of ``numbered`` (the series'
    ``(X, Y, Z)`` grid), known only by ``names``, algorithm type MANUAL."""
    import highdicom as hd
    from pydicom.sr.coding import Code

    from medimg.io.dicom import read_dicom_series
    from medimg.io.dicomseg import TYPE2_COPIED

    sources = [pydicom.dcmread(p) for p in read_dicom_series(folder).files]
    for ds in sources:  # what highdicom copies from a source
        for keyword in TYPE2_COPIED:
            setattr(ds, keyword, ds.get(keyword, ""))
    segments = [hd.seg.SegmentDescription(
        segment_number=n, segment_label=name, segmented_property_category=Code("91723000", "SCT", "Anatomical"),
        segmented_property_type=Code("85756007", "SCT", "Tissue"), algorithm_type="MANUAL")
        for n, name in enumerate(names, start=1)]
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=np.ascontiguousarray(numbered.transpose(2, 1, 0)),
        segmentation_type="BINARY", segment_descriptions=segments, series_instance_uid=hd.UID(),
        series_number=series_number, sop_instance_uid=hd.UID(), instance_number=1, manufacturer=manufacturer,
        manufacturer_model_name="dcmqi", software_versions="1", device_serial_number="1")
    seg.save_as(out)
    return Path(out)
