"""Findings of the third cold review of ``medimg/label/``, each reproduced: label saves that a full disk
or a kill interrupts, a PACS listed on every click, label values a SEG cannot hold, header-only
uploads that name files elsewhere, trainings that read live label files, ``run_sync``."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medimg.errors import DataError


@pytest.fixture()
def store(tmp_path, monkeypatch):
    from medimg.label.compat import install

    install()
    from medimg.label.datastore import SeriesDatastore

    studies = tmp_path / "studies"
    studies.mkdir()
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((16, 16, 16)).astype(np.float32), np.eye(4)),
             studies / "case1.nii.gz")
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(uploads))
    return SeriesDatastore(str(studies), extensions=["*.nii.gz", "*.nii", "*.nrrd"], auto_reload=False), uploads


def _upload(folder: Path, labels: np.ndarray, name: str) -> str:
    path = folder / name
    nib.save(nib.Nifti1Image(labels.astype(np.uint8), np.eye(4)), path)
    return str(path)


def test_a_save_that_fails_midway_leaves_the_stored_label_whole(store, monkeypatch):
    """MONAI Label copied the upload over the stored label in place: a full disk left it truncated."""
    ds, uploads = store
    first = np.zeros((16, 16, 16))
    first[2:8, 2:8, 2:8] = 1
    ds.save_label("case1", _upload(uploads, first, "a.nii"), "final", {})
    stored = Path(ds.get_label_uri("case1", "final"))
    before = stored.read_bytes()

    def disk_full(src, dst, *args, **kwargs):
        Path(dst).write_bytes(Path(src).read_bytes()[:1000])  # part of it written, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shutil, "copyfile", disk_full)
    from medimg.errors import ConfigError

    with pytest.raises(ConfigError, match="case1.nii: cannot be written: No space"):  # one line naming the file
        ds.save_label("case1", _upload(uploads, np.ones((16, 16, 16)), "b.nii"), "final", {})
    assert stored.read_bytes() == before and np.asarray(nib.load(stored).dataobj).sum() == first.sum()
    assert sorted(p.name for p in stored.parent.iterdir()) == ["case1.nii"]  # no partial file left or listed
    ds.refresh()
    assert ds.get_labeled_images() == ["case1"]


def test_a_training_reads_its_own_copies_of_the_labels(store, tmp_path):
    """A save during a long fine-tune replaced the file the run was reading."""
    from medimg.label.train import BundleTrain

    ds, uploads = store
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 16), np.float32), np.eye(4)), Path(ds._root()) / "case2.nii.gz")
    ds.refresh()
    for image in ("case1", "case2"):
        ds.save_label(image, _upload(uploads, np.ones((16, 16, 16)), f"{image}.nii"), "final", {})
    trainer = BundleTrain(_segmentation_bundle(tmp_path), tmp_path / "runs")
    work = tmp_path / "run"
    work.mkdir()
    import json

    doc = json.loads(trainer.manifest(ds, work, 1).read_text())
    used = [Path(item["label"]) for item in doc["training"] + doc["validation"]]
    assert all(p.is_relative_to(work) for p in used)
    ds.save_label("case1", _upload(uploads, np.zeros((16, 16, 16)) + 2, "again.nii"), "final", {})
    assert np.asarray(nib.load(used[0]).dataobj).max() == 1  # the run's copy is the label it started from


def test_a_label_fine_tune_never_shares_its_run_folder_with_a_cli_run(store, tmp_path, monkeypatch):
    """A CLI run started in the same second claimed runs/<bundle>/<second>: the label task must not use it.

    It used to write finetune.yaml there anyway, its run trained in ``-2``, and it published the
    CLI run's bundle from the shared folder.
    """
    import subprocess
    import time

    import yaml

    from medimg.bundles import shipped_bundles
    from medimg.label.train import BundleTrain

    ds, uploads = store
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 16), np.float32), np.eye(4)), Path(ds._root()) / "case2.nii.gz")
    ds.refresh()
    for image in ("case1", "case2"):
        ds.save_label(image, _upload(uploads, np.ones((16, 16, 16)), f"{image}.nii"), "final", {})
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "20250101-120000")
    cli = tmp_path / "runs" / "tissue_t1" / "20250101-120000"
    cli.mkdir(parents=True)
    (cli / "config.yaml").write_text("the CLI run\n")

    class Started(Exception):
        pass

    def popen(cmd, **kwargs):
        raise Started(cmd)

    monkeypatch.setattr(subprocess, "Popen", popen)
    with pytest.raises(Started) as started:
        BundleTrain(shipped_bundles()["tissue_t1"], tmp_path / "runs")({}, ds)
    mine = Path(started.value.args[0][started.value.args[0].index("--config-path") + 1])
    assert mine.name == "20250101-120000-2" and sorted(p.name for p in cli.iterdir()) == ["config.yaml"]
    cfg = yaml.safe_load((mine / "finetune.yaml").read_text())
    assert cfg["run_dir"] == str(mine) and cfg["run_dir_claimed"] is True  # its run takes this folder over


def _segmentation_bundle(tmp_path: Path) -> Path:
    import json

    bundle = tmp_path / "bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "configs" / "metadata.json").write_text(json.dumps({"labels": {"tissue": 1}}))
    return bundle


class FakePacs:
    """A DICOMweb client over ``n`` image series and no SEG, counting the QIDO requests."""

    base_url = "http://pacs/dicom-web"

    def __init__(self, n: int) -> None:
        self.n, self.calls = n, 0

    def search_for_series(self, search_filters=None, fields=None, limit=None, offset=0, **kwargs):
        self.calls += 1
        if (search_filters or {}).get("Modality") == "SEG":
            return []
        limit = limit or self.n
        return [{"0020000E": {"vr": "UI", "Value": [f"1.2.3.{i}"]}, "00080060": {"vr": "CS", "Value": ["CT"]}}
                for i in range(offset, min(offset + limit, self.n))]


def test_the_pacs_is_listed_once_for_many_clicks_and_again_after_a_save(tmp_path, monkeypatch):
    """MONAI Label asks for the datastore's status on every /info/ and inference: 83 QIDO pages each."""
    from medimg.label.compat import install

    install()
    from medimg.label.dicomweb import PacsDatastore

    ds = PacsDatastore("http://pacs/dicom-web", cache_path=str(tmp_path / "cache"))
    ds._client = FakePacs(5000)
    first = ds.status()
    assert first["total"] == 5000
    one_listing = ds._client.calls
    for _ in range(5):
        ds.status()
        ds.get_unlabeled_images()
    assert ds._client.calls == one_listing
    ds.invalidate_listing()  # what this server's own save or clear does
    ds.status()
    assert ds._client.calls == 2 * one_listing
    monkeypatch.setattr("medimg.label.dicomweb.LISTING_TTL_S", 0.0)  # expired: listed afresh
    ds.list_images()
    assert ds._client.calls == 3 * one_listing


@pytest.mark.parametrize("values", [[0, 256], [0, 300, 1], [-1, 1], [0, 1.5]])
def test_label_values_a_seg_cannot_hold_are_refused_not_wrapped(values, tmp_path):
    """256 became 0 (and an upload of 256 alone read as empty, which deleted the stored SEGs)."""
    from medimg.io.dicomseg import label_map, raw_labels

    array = np.asarray(values * 4, dtype=np.float32).reshape(2, 2, -1)
    with pytest.raises(DataError, match="label values"):
        label_map(array, "upload")
    if float(np.max(values)) <= 65535 and min(values) >= 0 and all(float(v).is_integer() for v in values):
        raw = tmp_path / "label.bin"
        raw.write_bytes(array.astype(np.uint16).tobytes(order="F"))
        with pytest.raises(DataError, match="label values"):
            raw_labels(raw, array.shape)
    assert label_map(np.array([[[0, 3], [255, 1]]], np.int32), "ok").dtype == np.uint8


@pytest.mark.parametrize("suffix,field", [(".nrrd", "data file: {path}"), (".nhdr", "data file: ../{name}"),
                                          (".mhd", "ElementDataFile = {path}")])
def test_a_header_only_upload_cannot_name_a_file_elsewhere(tmp_path, suffix, field):
    """The server read whatever file a header's data file named (absolute or ../), as voxels."""
    from medimg.io.image import read_image

    secret = tmp_path / "secret.bin"
    secret.write_bytes(bytes(range(256)) * 2)
    upload = tmp_path / "uploads" / f"label{suffix}"
    upload.parent.mkdir()
    line = field.format(path=secret, name=secret.name)
    if suffix == ".mhd":
        text = ("ObjectType = Image\nNDims = 3\nDimSize = 8 8 8\nElementType = MET_UCHAR\n"
                f"{line}\n")
    else:
        text = ("NRRD0004\ntype: uint8\ndimension: 3\nsizes: 8 8 8\nspace: left-posterior-superior\n"
                "space directions: (1,0,0) (0,1,0) (0,0,1)\nspace origin: (0,0,0)\nencoding: raw\n"
                f"{line}\n\n")
    upload.write_text(text)
    with pytest.raises(DataError, match="plain file name beside the header"):
        read_image(upload, spatial_dims=None)
    shutil.copy(secret, upload.parent / "secret.bin")  # beside the header: a detached header still reads
    upload.write_text(text.replace(line, field.format(path="secret.bin", name="x").replace("../x", "secret.bin")))
    assert read_image(upload, spatial_dims=None).array.shape == (8, 8, 8)


def test_a_nifti_whose_qform_and_sform_disagree_gets_its_label_where_slicer_shows_it(tmp_path):
    """ITK (3D Slicer) placed the image by its qform, medimg's .nrrd answer by the sform: 10 mm apart,
    and Slicer's save of that label was then refused as off the grid."""
    import SimpleITK as sitk

    from medimg.io.image import read_image
    from medimg.label.results import write_result
    from medimg.label.uploads import check_label_upload

    q = np.eye(4)
    q[:3, 3] = [-32, -32, -32]
    s = q.copy()
    s[:3, 3] = [-22, -37, -42]  # an sform a registration wrote (code 2: aligned)
    img = nib.Nifti1Image(np.random.default_rng(1).random((24, 24, 24)).astype(np.float32), s)
    img.set_qform(q, code=1)
    img.set_sform(s, code=2)
    path = tmp_path / "qs.nii.gz"
    nib.save(img, path)
    labels = np.zeros((24, 24, 24), np.uint8)
    labels[5:9, 5:9, 5:9] = 1
    answer = sitk.ReadImage(write_result(labels, read_image(path, spatial_dims=None), ".nrrd"))
    shown = sitk.ReadImage(str(path))
    assert np.allclose(answer.GetOrigin(), shown.GetOrigin()) and np.allclose(answer.GetDirection(),
                                                                              shown.GetDirection())
    saved = sitk.Image(answer)
    saved.CopyInformation(shown)  # what Slicer exports: the label on the image's grid as it shows it
    sitk.WriteImage(saved, str(tmp_path / "from_slicer.nrrd"))
    assert check_label_upload(str(tmp_path / "from_slicer.nrrd"), str(path), "qs")
    off = sitk.Image(saved)
    off.SetOrigin([o + 5 for o in shown.GetOrigin()])
    sitk.WriteImage(off, str(tmp_path / "off.nrrd"))
    with pytest.raises(DataError, match="grid"):
        check_label_upload(str(tmp_path / "off.nrrd"), str(path), "qs")


def test_a_slicer_label_and_upload_of_a_qform_sform_nifti_are_stored_on_the_images_own_header(store, tmp_path):
    """Fourth review: Slicer's label on ITK's grid was stored as is, and then every fine-tune refused it
    (its affine is not the image's); Slicer's own upload of the study was refused with 409."""
    import SimpleITK as sitk

    from medimg.io.image import read_image
    from medimg.label.uploads import check_label_upload, same_image

    q, s = np.eye(4), np.eye(4)
    q[:3, 3], s[:3, 3] = [-8, -8, -8], [-3, -10, -13]
    img = nib.Nifti1Image(np.random.default_rng(2).random((16, 16, 16)).astype(np.float32), s)
    img.set_qform(q, code=1)
    img.set_sform(s, code=2)
    path = tmp_path / "qs.nii.gz"
    nib.save(img, path)
    shown = sitk.ReadImage(str(path))
    label = sitk.GetImageFromArray(np.ones((16, 16, 16), np.uint8))
    label.CopyInformation(shown)
    sitk.WriteImage(label, str(tmp_path / "slicer.nrrd"))
    stored = check_label_upload(str(tmp_path / "slicer.nrrd"), str(path), "qs", tmp_path / "stored.nii.gz")
    assert stored == str(tmp_path / "stored.nii.gz")
    np.testing.assert_allclose(nib.load(stored).affine, read_image(path, spatial_dims=None).affine, atol=1e-5)
    sitk.WriteImage(shown, str(tmp_path / "upload.nrrd"))  # Slicer's saveNode of the study it shows
    assert same_image(read_image(tmp_path / "upload.nrrd", spatial_dims=None), str(path))


def test_two_uploads_under_one_new_id_cannot_both_be_stored(store, monkeypatch):
    """Fourth review: uploads run in worker threads; both passed the check and the second overwrote the first."""
    import threading
    import time

    import medimg.io.image as image_module
    from medimg.label.uploads import ImageExists

    ds, uploads = store
    real = image_module.read_image

    def slow_read(*args, **kwargs):
        time.sleep(0.3)  # both uploads are read at once
        return real(*args, **kwargs)

    real_copy = shutil.copy

    def slow_copy(*args, **kwargs):
        time.sleep(0.3)  # a large volume being stored
        return real_copy(*args, **kwargs)

    monkeypatch.setattr(image_module, "read_image", slow_read)
    monkeypatch.setattr(shutil, "copy", slow_copy)
    outcomes: list[str] = []

    def upload(value: float) -> None:
        path = uploads / f"up{value}.nii.gz"
        nib.save(nib.Nifti1Image(np.full((8, 8, 8), value, np.float32), np.eye(4)), path)
        try:
            ds.add_image("MRHead", str(path), {})
            outcomes.append("stored")
        except ImageExists:
            outcomes.append("409")

    threads = [threading.Thread(target=upload, args=(v,)) for v in (1.0, 2.0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(outcomes) == ["409", "stored"]


def test_a_header_only_upload_is_refused_even_naming_a_file_beside_it(store):
    """Fourth review: beside an upload is the temporary folder, where other annotators' uploads are."""
    from medimg.label.uploads import check_label_upload

    ds, uploads = store
    (uploads / "someone-elses.raw").write_bytes(bytes(16 ** 3))
    header = uploads / "tmpabc.nrrd"
    header.write_text("NRRD0004\ntype: uint8\ndimension: 3\nsizes: 16 16 16\nspace: left-posterior-superior\n"
                      "space directions: (1,0,0) (0,1,0) (0,0,1)\nspace origin: (0,0,0)\nencoding: raw\n"
                      "data file: someone-elses.raw\n\n")
    image = str(Path(ds._root()) / "case1.nii.gz")
    with pytest.raises(DataError, match="separate data file"):
        check_label_upload(str(header), image, "case1")
    with pytest.raises(DataError, match="separate data file"):
        ds.add_image("new", str(header), {})
