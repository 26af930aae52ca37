"""DICOM SEG in and out beyond medimg's own files: provenance per segment, real GE slices, 3D Slicer's SEG."""

from __future__ import annotations

import gzip
import os

import numpy as np
import pydicom
import pytest

from medimg.errors import DataError
from medimg.io.dicomseg import seg_to_labels, write_dicom_seg
from medimg.io.image import read_image
from tests.helpers import write_dicom_series
from tests.label import vendors


@pytest.fixture()
def series(tmp_path):
    folder = tmp_path / "series"
    write_dicom_series(np.random.default_rng(1).integers(0, 900, (20, 18, 5)).astype(float),
                       np.diag([-0.9, -0.9, 2.5, 1.0]), folder)
    labels = np.zeros((20, 18, 5), np.uint8)
    labels[3:9, 4:10, 1:4], labels[12:16, 2:6, 2] = 1, 2
    return folder, labels


def test_each_segment_says_how_it_was_made(series, tmp_path):
    import highdicom as hd

    folder, labels = series
    names = {1: "a", 2: "b"}
    for kind, algorithm in (("AUTOMATIC", ("medimg swin_unetr", "0.2.0")), ("SEMIAUTOMATIC", ("swin_unetr", "7")),
                            ("MANUAL", None)):
        out = write_dicom_seg(labels, folder, tmp_path / f"{kind}.dcm", names, *(algorithm or ("medimg label", "1")),
                              algorithm_type=kind)
        seg = hd.seg.segread(out)
        assert [s.SegmentAlgorithmType for s in seg.SegmentSequence] == [kind, kind]
        for s in seg.SegmentSequence:
            if algorithm is None:
                assert "SegmentationAlgorithmIdentificationSequence" not in s and "SegmentAlgorithmName" not in s
            else:
                algo = s.SegmentationAlgorithmIdentificationSequence[0]
                assert (s.SegmentAlgorithmName, algo.AlgorithmName, algo.AlgorithmVersion) == (algorithm[0], *algorithm)
        np.testing.assert_array_equal(seg_to_labels(out, folder), labels)
    with pytest.raises(ValueError, match="algorithm_type"):
        write_dicom_seg(labels, folder, tmp_path / "x.dcm", names, algorithm_type="GUESSED")
    # the positional call of inference's callers (medimg.infer, medimg.label.results): AUTOMATIC, the bundle named
    seg = pydicom.dcmread(write_dicom_seg(labels, folder, tmp_path / "old.dcm", names, "medimg bundle", "0.3"))
    algo = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert (seg.SegmentSequence[0].SegmentAlgorithmType, algo.AlgorithmName, algo.AlgorithmVersion) == (
        "AUTOMATIC", "medimg bundle", "0.3")


def test_a_models_dicom_seg_result_is_automatic_and_names_its_bundle(series):
    from medimg.label.results import write_result

    folder, labels = series
    path = write_result(labels, read_image(folder), ".dcm", None, {1: "a", 2: "b"}, "medimg swin_unetr", "0.4.1")
    try:
        for s in pydicom.dcmread(path).SegmentSequence:
            algo = s.SegmentationAlgorithmIdentificationSequence[0]
            assert (s.SegmentAlgorithmType, algo.AlgorithmName, algo.AlgorithmVersion) == (
                "AUTOMATIC", "medimg swin_unetr", "0.4.1")
    finally:
        os.unlink(path)


def test_a_real_ge_series_whose_slices_round_their_orientation_apart(tmp_path):
    """GE writes each slice's ImageOrientationPatient rounded on its own (1e-8 apart); highdicom wants one."""
    folder = vendors.copy_files(vendors.one_volume(vendors.vendor_series()[vendors.GE_299]), tmp_path / "ge")
    orientations = {tuple(pydicom.dcmread(p).ImageOrientationPatient) for p in folder.iterdir()}
    assert len(orientations) == 2  # the scanner's own values, unchanged
    labels = np.zeros(read_image(folder).array.shape, np.uint8)
    labels[100:140, 90:150, :] = 1
    out = write_dicom_seg(labels, folder, tmp_path / "ge.dcm", {1: "lesion"}, "medimg label", "1", "MANUAL")
    np.testing.assert_array_equal(seg_to_labels(out, folder), labels)


def test_3d_slicers_seg_is_read_by_frame_position(tmp_path):
    seg_file = tmp_path / "slicer.dcm"
    seg_file.write_bytes(gzip.open(vendors.SLICER_SEG).read())
    first, count = 148, 21
    source = vendors.slicer_seg_source(tmp_path / "source", first, count)
    expected = vendors.slicer_seg().pixel_array[first:first + count].transpose(2, 1, 0)  # (frames, rows, columns)
    labels = seg_to_labels(seg_file, source)
    assert labels.shape == (512, 512, count) and expected.sum() == 3338
    np.testing.assert_array_equal(labels, expected)
    # the SEG's series, but slices its frames do not lie on: refused, naming the SEG
    other = tmp_path / "other"
    series_uid = str(vendors.slicer_seg().ReferencedSeriesSequence[0].SeriesInstanceUID)
    write_dicom_series(np.zeros((512, 512, 3)), np.diag([-0.78125, -0.78125, 1.0, 1.0]), other, series_uid=series_uid)
    with pytest.raises(DataError, match="no frame lies on a slice"):
        seg_to_labels(seg_file, other)
    # another series: refused whatever its slices
    write_dicom_series(np.zeros((512, 512, 3)), np.diag([-0.78125, -0.78125, 1.0, 1.0]), tmp_path / "unrelated")
    with pytest.raises(DataError, match="references series .* not the series in"):
        seg_to_labels(seg_file, tmp_path / "unrelated")


def _foreign_seg(folder, labels: np.ndarray, names: list[str], out) -> str:
    """A SEG another tool (3D Slicer / dcmqi) wrote: segments numbered 1..n, known only by their labels."""
    return str(vendors.foreign_seg(folder, labels, names, out))


def test_another_tools_segments_map_to_the_bundles_values_by_name(series, tmp_path):
    folder, numbered = series  # segment numbers 1 and 2 as Slicer writes them
    seg = _foreign_seg(folder, numbered, ["White_Matter", "CSF"], tmp_path / "slicer.dcm")
    tissue = {"background": 0, "grey matter": 1, "white matter": 2, "csf": 3}
    expected = np.select([numbered == 1, numbered == 2], [2, 3], 0)
    np.testing.assert_array_equal(seg_to_labels(seg, folder, tissue), expected)
    np.testing.assert_array_equal(seg_to_labels(seg, folder), numbered)  # no names to go by: its segment numbers
    other = _foreign_seg(folder, numbered, ["white matter", "GTV tumour"], tmp_path / "rt.dcm")
    with pytest.raises(DataError, match=r"segment 2 'GTV tumour' is not one of the labels"):
        seg_to_labels(other, folder, tissue)


def test_a_seg_of_another_series_is_refused(series, tmp_path):
    folder, labels = series
    seg = write_dicom_seg(labels, folder, tmp_path / "seg.dcm", {1: "a", 2: "b"})
    twin = tmp_path / "twin"  # the same grid, another series
    write_dicom_series(np.zeros(labels.shape), np.diag([-0.9, -0.9, 2.5, 1.0]), twin)
    with pytest.raises(DataError, match="references series .* not the series in"):
        seg_to_labels(seg, twin)


def test_the_served_segmentation_bundles_name_the_values(monkeypatch):
    """What another tool's segments are mapped by: the served segmentation bundles' labels, names two disagree
    on left out, other kinds of bundle not asked."""
    from types import SimpleNamespace

    from medimg.label.compat import install

    install()
    from monailabel.interfaces.tasks.infer_v2 import InferType
    from monailabel.interfaces.utils import app as app_module

    from medimg.label.uploads import served_labels

    tissue = SimpleNamespace(type=InferType.SEGMENTATION, meta={"labels": {"background": 0, "grey_matter": 1,
                                                                           "white_matter": 2}})
    other = SimpleNamespace(type=InferType.SEGMENTATION, meta={"labels": {"Grey Matter": 3, "csf": 3}})
    classes = SimpleNamespace(type=InferType.CLASSIFICATION, meta={"labels": {"tumour": 1}})
    app = SimpleNamespace(_infers={"a": tissue, "b": other, "c": classes})
    monkeypatch.setattr(app_module, "apps", {"app": app}, raising=False)
    assert served_labels() == {"background": 0, "white_matter": 2, "csf": 3}
    monkeypatch.setattr(app_module, "apps", {}, raising=False)
    assert served_labels() == {}
