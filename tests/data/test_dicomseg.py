"""DICOM SEG output: highdicom reads back exactly the prediction, on the source frames; dciodvfy finds no error."""

from __future__ import annotations

import subprocess

import numpy as np
import pydicom
import pytest

from medimg.errors import DataError
from medimg.io.dicom import read_dicom_series
from medimg.io.dicomseg import write_dicom_seg
from tests.helpers import dciodvfy, oblique_affine, sphere_phantom, write_dicom_series


@pytest.fixture()
def series(tmp_path):
    image, label = sphere_phantom(np.random.default_rng(3), size=32, num=3)
    affine = oblique_affine(np.diag([-0.8, -0.8, 1.5, 1.0]), 15.0)  # LPS-stored and oblique
    folder = tmp_path / "series"
    write_dicom_series(np.round(image * 1000), affine, folder)
    return folder, label.astype(np.uint8)


def test_round_trip_through_highdicom(series, tmp_path):
    import highdicom as hd

    folder, label = series
    names = {1: "left thing", 2: "right thing", 3: "third thing"}
    out = write_dicom_seg(label, folder, tmp_path / "seg.dcm", names, algorithm="medimg swin_unetr",
                          algorithm_version="0.1.0")
    source = read_dicom_series(folder)
    seg = hd.seg.segread(out)
    assert seg.SeriesInstanceUID != pydicom.dcmread(source.files[0]).SeriesInstanceUID
    assert [d.SegmentLabel for d in seg.SegmentSequence] == ["left thing", "right thing", "third thing"]
    uids = [pydicom.dcmread(p).SOPInstanceUID for p in source.files]
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, combine_segments=True,
                                               skip_overlap_checks=True)
    np.testing.assert_array_equal(pixels.transpose(2, 1, 0), label)  # (slice, row, col) -> (col, row, slice)
    # every frame sits where its source slice is
    positions = {pydicom.dcmread(p).SOPInstanceUID: np.asarray(pydicom.dcmread(p).ImagePositionPatient, float)
                 for p in source.files}
    for frame in seg.PerFrameFunctionalGroupsSequence:
        ref = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        pos = np.asarray(frame.PlanePositionSequence[0].ImagePositionPatient, float)
        np.testing.assert_allclose(pos, positions[ref], atol=1e-4)
    assert len(seg.PerFrameFunctionalGroupsSequence) < 3 * len(uids)  # empty frames are omitted


def test_dciodvfy_reports_no_error(series, tmp_path):
    tool = dciodvfy()
    folder, label = series
    out = write_dicom_seg(label, folder, tmp_path / "seg.dcm", {1: "a", 2: "b", 3: "c"})
    proc = subprocess.run([tool, str(out)], capture_output=True, text=True)
    report = proc.stdout + proc.stderr
    errors = [line for line in report.splitlines() if line.startswith("Error")]
    assert errors == [], report[-3000:]
    assert "Segmentation" in report


def test_bad_label_maps_are_data_errors(series, tmp_path):
    folder, label = series
    with pytest.raises(DataError, match="does not fit"):
        write_dicom_seg(label[:, :, :-1], folder, tmp_path / "a.dcm", {})
    with pytest.raises(DataError, match="empty"):
        write_dicom_seg(np.zeros_like(label), folder, tmp_path / "b.dcm", {})
    assert not (tmp_path / "a.dcm").exists() and not (tmp_path / "b.dcm").exists()


def test_label_values_that_are_not_1_to_n_come_back_unchanged(series, tmp_path):
    """Values 2 and 3 alone: the SEG's segments are numbered 1, 2 (BINARY SEGs must be), each keeps its value."""
    import highdicom as hd

    from medimg.io.dicomseg import seg_to_labels

    folder, label = series
    labels = np.where(label >= 2, label, 0).astype(np.uint8)  # white_matter (2) and csf (3), no grey_matter (1)
    assert np.unique(labels).tolist() == [0, 2, 3]
    out = write_dicom_seg(labels, folder, tmp_path / "seg.dcm", {1: "grey_matter", 2: "white_matter", 3: "csf"})
    seg = hd.seg.segread(out)
    assert [(d.SegmentNumber, d.SegmentLabel) for d in seg.SegmentSequence] == [(1, "white_matter"), (2, "csf")]
    np.testing.assert_array_equal(seg_to_labels(out, folder), labels)
    # the bundle's labels given: mapped by name (case and underscores aside), the same values
    np.testing.assert_array_equal(seg_to_labels(out, folder, {"Grey Matter": 1, "WHITE MATTER": 2, "csf": 3}), labels)
