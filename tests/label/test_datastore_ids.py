"""Series named by real vendors' UIDs keep distinct ids in a studies folder; an empty label clears."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.label import vendors
from tests.label.vendors import GE_299, GE_303, PHILIPS, SIEMENS, TOSHIBA_STYLE


def _store(studies: Path):
    from medimg.label.compat import install

    install()
    from monailabel.config import settings

    from medimg.label.datastore import SeriesDatastore

    return SeriesDatastore(str(studies), extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT, auto_reload=False)


@pytest.fixture()
def studies(tmp_path) -> Path:
    """The real GE, Philips and Siemens series, each in a folder named by its SeriesInstanceUID, plus files."""
    folder = tmp_path / "studies"
    for uid, files in vendors.vendor_series().items():
        vendors.copy_files(files, folder / uid)
    vendors.toshiba_style_series(folder / TOSHIBA_STYLE)
    nib.save(nib.Nifti1Image(np.zeros((6, 7, 8), np.float32), np.eye(4)), folder / "1.2.840.99.7.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((6, 7, 8), np.float32), np.eye(4)), folder / "scan.nii.gz")
    return folder


def test_series_named_by_vendor_uids_get_one_id_each(studies):
    store = _store(studies)
    series = [GE_299, GE_303, PHILIPS, *SIEMENS, TOSHIBA_STYLE]
    assert sorted(store.list_images()) == sorted([*series, "1.2.840.99.7", "scan"])
    for uid in series:
        assert store.get_image_uri(uid) == os.path.realpath(studies / uid)
        info = store.get_image_info(uid)
        assert info["name"] == f"{uid}.nrrd" and "path" not in info  # what 3D Slicer downloads and loads
    assert store.get_image_uri("1.2.840.99.7") == os.path.realpath(studies / "1.2.840.99.7.nii.gz")
    assert store.get_image_info("scan")["path"] == os.path.realpath(studies / "scan.nii.gz")
    assert store._to_id("label.seg.nrrd") == ("label", ".seg.nrrd") and store._to_id("x.DCM") == ("x", ".DCM")
    assert store._to_id("1.2.3.4.0.0.0") == ("1.2.3.4.0.0.0", "")  # not a folder here, still no extension


def test_entries_recorded_under_a_collapsed_id_are_listed_afresh(studies):
    from monailabel.datastore.local import DataModel, ImageLabelModel

    store = _store(studies)
    collapsed = GE_299.rsplit(".", 1)[0]  # what MONAI Label's own rule recorded: ….1601318184 + ".299"
    del store._datastore.objects[GE_299], store._datastore.objects[GE_303]
    store._datastore.objects[collapsed] = ImageLabelModel(image=DataModel(info={}, ext=".299"))
    store._update_datastore_file()
    again = _store(studies)
    assert collapsed not in again.list_images() and {GE_299, GE_303} <= set(again.list_images())


def test_an_empty_label_clears_the_stored_one(tmp_path):
    folder = tmp_path / "studies"
    folder.mkdir()
    nib.save(nib.Nifti1Image(np.zeros((6, 7, 8), np.float32), np.eye(4)), folder / "scan.nii.gz")
    store = _store(folder)
    drawn, empty = tmp_path / "drawn.nii.gz", tmp_path / "empty.nii.gz"
    labels = np.zeros((6, 7, 8), np.uint8)
    labels[2:4, 2:4, 2:4] = 1
    nib.save(nib.Nifti1Image(labels, np.eye(4)), drawn)
    nib.save(nib.Nifti1Image(np.zeros_like(labels), np.eye(4)), empty)
    assert store.save_label("scan", str(drawn), "final", {}) == "scan"
    stored = Path(store.get_label_uri("scan", "final"))
    assert stored.is_file() and store.get_labeled_images() == ["scan"]
    assert store.save_label("scan", str(empty), "final", {}) == "scan"
    assert not stored.exists() and store.get_label_uri("scan", "final") == ""
    assert store.get_labeled_images() == [] and store.get_unlabeled_images() == ["scan"]
    assert store.save_label("scan", str(empty), "final", {}) == "scan"  # clearing nothing: nothing stored
    assert not stored.exists() and store.status()["completed"] == 0


def _nrrd(labels: np.ndarray, path: Path) -> Path:
    """``labels`` as NRRD on the identity RAS grid (ITK stores LPS: x and y flipped)."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(labels.transpose(2, 1, 0))
    img.SetDirection((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(img, str(path))
    return path


def test_a_label_saved_in_another_format_replaces_the_first_and_a_clear_removes_both(tmp_path):
    from medimg.io.image import read_image

    folder = tmp_path / "studies"
    folder.mkdir()
    for name in ("scan", "scan.2"):  # "scan" is a prefix of the other id
        nib.save(nib.Nifti1Image(np.zeros((6, 7, 8), np.float32), np.eye(4)), folder / f"{name}.nii.gz")
    store = _store(folder)
    labels = np.zeros((6, 7, 8), np.uint8)
    labels[2:4, 2:4, 2:4] = 1
    nib.save(nib.Nifti1Image(labels, np.eye(4)), tmp_path / "drawn.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros_like(labels), np.eye(4)), tmp_path / "empty.nii.gz")
    store.save_label("scan.2", str(tmp_path / "drawn.nii.gz"), "final", {})
    store.save_label("scan", str(tmp_path / "drawn.nii.gz"), "final", {})
    store.save_label("scan", str(_nrrd(labels * 2, tmp_path / "edit.nrrd")), "final", {})  # 3D Slicer's format
    final = folder / "labels" / "final"
    assert sorted(p.name for p in final.iterdir()) == ["scan.2.nii.gz", "scan.nrrd"]
    assert np.unique(read_image(store.get_label_uri("scan", "final"), spatial_dims=None).array).tolist() == [0, 2]
    (final / "scan.nii.gz").write_bytes((tmp_path / "drawn.nii.gz").read_bytes())  # as an older server left it
    assert store.save_label("scan", str(tmp_path / "empty.nii.gz"), "final", {}) == "scan"
    store.refresh()
    assert sorted(p.name for p in final.iterdir()) == ["scan.2.nii.gz"] and store.get_label_uri("scan", "final") == ""
    assert store.get_labeled_images() == ["scan.2"]
    store.save_label("scan", str(tmp_path / "edit.nrrd"), "final", {})
    (final / "scan.nii.gz").write_bytes((tmp_path / "drawn.nii.gz").read_bytes())
    store.remove_label("scan", "final")  # DELETE /datastore/label
    assert sorted(p.name for p in final.iterdir()) == ["scan.2.nii.gz"] and store.get_labeled_images() == ["scan.2"]


def test_a_label_upload_must_lie_on_its_images_grid(tmp_path):
    from medimg.errors import DataError
    from medimg.io.dicomseg import write_dicom_seg
    from medimg.io.image import read_image
    from tests.helpers import write_dicom_series

    folder = tmp_path / "studies"
    folder.mkdir()
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    nib.save(nib.Nifti1Image(np.zeros((6, 7, 8), np.float32), affine), folder / "scan.nii.gz")
    write_dicom_series(np.zeros((24, 20, 6)), np.diag([-1.2, -1.2, 3.0, 1.0]), folder / "ct")
    write_dicom_series(np.zeros((24, 20, 6)), np.diag([-1.2, -1.2, 3.0, 1.0]), tmp_path / "other")
    store = _store(folder)
    labels = np.zeros((6, 7, 8), np.uint8)
    labels[2:4, 2:4, 2:4] = 1
    flipped, shifted = np.diag([-1.0, 1.0, 1.0, 1.0]), np.eye(4)
    flipped[0, 3], shifted[:3, 3] = 5.0, [0.0, 50.0, 0.0]
    for name, grid in (("flipped", flipped), ("2mm", np.diag([2.0, 2.0, 2.0, 1.0])), ("shifted", shifted)):
        nib.save(nib.Nifti1Image(labels, grid), tmp_path / f"{name}.nii.gz")
        with pytest.raises(DataError, match="does not lie on the image's grid"):
            store.save_label("scan", str(tmp_path / f"{name}.nii.gz"), "final", {})
    assert store.get_label_uri("scan", "final") == ""
    # a DICOM SEG: for a series, read onto its grid (and stored as NIfTI); of another series or for a file, refused
    drawn = np.zeros((24, 20, 6), np.uint8)
    drawn[3:9, 4:10, 1:4], drawn[12:16, 2:6, 2] = 2, 3
    seg = write_dicom_seg(drawn, folder / "ct", tmp_path / "seg.dcm", {2: "white matter", 3: "csf"})
    assert store.save_label("ct", str(seg), "final", {}) == "ct"
    stored = read_image(store.get_label_uri("ct", "final"), spatial_dims=None)
    np.testing.assert_array_equal(stored.array, drawn)
    np.testing.assert_allclose(stored.affine, read_image(folder / "ct").affine, atol=1e-4)
    other = write_dicom_seg(drawn, tmp_path / "other", tmp_path / "other.dcm", {2: "white matter", 3: "csf"})
    with pytest.raises(DataError, match="references series"):
        store.save_label("ct", str(other), "final", {})
    with pytest.raises(DataError, match="a DICOM SEG label is for a DICOM series"):
        store.save_label("scan", str(seg), "final", {})
    np.testing.assert_array_equal(read_image(store.get_label_uri("ct", "final"), spatial_dims=None).array, drawn)


def test_a_datastore_file_cut_short_by_a_kill_is_rebuilt_and_never_written_in_place(tmp_path, monkeypatch, caplog):
    import json
    import logging

    folder = tmp_path / "studies"
    folder.mkdir()
    nib.save(nib.Nifti1Image(np.zeros((6, 7, 8), np.float32), np.eye(4)), folder / "scan.nii.gz")
    store = _store(folder)
    config = folder / "datastore_v2.json"
    whole = config.read_text()
    # a write that dies midway (kill -9 while MONAI Label writes the file) leaves the old file whole
    monkeypatch.setattr(json, "dumps", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        store.update_image_info("scan", {"seen": 1})
    monkeypatch.undo()
    assert config.read_text() == whole and not [p for p in folder.iterdir() if p.name.startswith(".datastore")]
    # a file truncated anyway (an older server): the next start rebuilds it from the folder, with a warning
    config.write_text(whole[: len(whole) // 2])
    with caplog.at_level(logging.WARNING, logger="medimg.label.datastore"):
        again = _store(folder)
    assert again.list_images() == ["scan"] and json.loads(config.read_text())["objects"]
    assert any("datastore_v2.json" in r.getMessage() and "rebuilt" in r.getMessage() for r in caplog.records)
