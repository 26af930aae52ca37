"""The PACS datastore on a real Orthanc holding real vendors' series: ids, saves, clears, reads, fetches, paging.

The datastore is driven directly (as MONAI Label's endpoints and train task call it); the whole
server on the same kind of PACS is in ``test_label_pacs_vendors.py``. Each test uses a fresh cache.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import requests
from pydicom.uid import generate_uid

from medimg.errors import DataError
from medimg.io.image import read_image, write_like
from tests.cli.orthanc import OrthancServer, capped_qido_session
from tests.helpers import write_dicom_series
from tests.label.vendors import (
    GE_299,
    GE_303,
    PHILIPS,
    SIEMENS,
    SLICER_SEG,
    copy_files,
    foreign_seg,
    one_volume,
    slicer_seg,
    slicer_seg_source,
    vendor_series,
)

SIEMENS_STYLE = f"{generate_uid(prefix=None)}.0.0.0"  # a series UID shaped like Siemens' (``.0.0.0``)


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """Orthanc with GE's two series (b=0), Philips' first time point, the Siemens mosaics and a ``.0.0.0`` series."""
    orthanc = OrthancServer(tmp_path_factory.mktemp("orthanc"))
    local = tmp_path_factory.mktemp("series")
    series = vendor_series()
    for uid in (GE_299, GE_303, PHILIPS):
        orthanc.upload(one_volume(series[uid]))
        copy_files(one_volume(series[uid]), local / uid)
    for uid in SIEMENS:
        orthanc.upload(series[uid])
    rng = np.random.default_rng(5)
    write_dicom_series(rng.integers(0, 1000, (24, 20, 6)).astype(float), np.diag([-1.2, -1.2, 3.0, 1.0]),
                       local / SIEMENS_STYLE, series_uid=SIEMENS_STYLE)
    orthanc.upload(sorted((local / SIEMENS_STYLE).iterdir()))
    yield orthanc, local
    orthanc.stop()
    assert orthanc.proc.poll() is not None


def _store(orthanc: OrthancServer, cache: Path, session=None):
    from medimg.label.compat import install

    install()
    from medimg.label.dicomweb import PacsDatastore

    return PacsDatastore(orthanc.dicomweb, cache_path=str(cache), session=session)


def _label(folder: Path, out: Path, values: tuple[int, ...] = (1,)) -> np.ndarray:
    """A box per value on the series' grid, written as NIfTI in its geometry."""
    image = read_image(folder)
    labels = np.zeros(image.array.shape, np.uint8)
    for n, v in enumerate(values):
        labels[2 + 3 * n:5 + 3 * n, 2:6, : max(1, labels.shape[2] // 2)] = v
    write_like(labels, image, out)
    return labels


def _segs_of(orthanc: OrthancServer, series_uid: str) -> list[pydicom.Dataset]:
    """The SEG instances in Orthanc that reference ``series_uid``."""
    from dicomweb_client.api import DICOMwebClient

    client, out = DICOMwebClient(orthanc.dicomweb), []
    for item in orthanc.series("SEG"):
        study, uid = item["0020000D"]["Value"][0], item["0020000E"]["Value"][0]
        for ds in client.retrieve_series(study, uid):
            if any(r.SeriesInstanceUID == series_uid for r in ds.ReferencedSeriesSequence):
                out.append(ds)
    return out


def test_vendor_series_keep_their_uids_as_ids(pacs, tmp_path):
    orthanc, _ = pacs
    store = _store(orthanc, tmp_path / "cache")
    images = [GE_299, GE_303, PHILIPS, *SIEMENS, SIEMENS_STYLE]
    assert sorted(store.list_images()) == sorted(images)
    for uid in images:
        folder = store.get_image_uri(uid)
        assert Path(folder).name == uid and Path(folder).is_dir()
    assert sorted(store.json()["objects"]) == sorted(images)  # GET /datastore/?output=all
    with pytest.raises(DataError, match="mosaic"):
        read_image(store.get_image_uri(SIEMENS[0]))  # listed and fetched; medimg's reader refuses mosaics


def test_saving_validates_first_stores_one_seg_and_replaces_the_older(pacs, tmp_path):
    import highdicom as hd

    orthanc, local = pacs
    store = _store(orthanc, tmp_path / "cache")
    for uid in (SIEMENS_STYLE, GE_299):
        labels = _label(local / uid, tmp_path / f"{uid}.nii.gz")
        assert store.save_label(uid, str(tmp_path / f"{uid}.nii.gz"), "final", {}) == uid
        (seg,) = _segs_of(orthanc, uid)
        np.testing.assert_array_equal(read_image(store.get_label_uri(uid, "final"), spatial_dims=None).array, labels)
        assert [s.SegmentAlgorithmType for s in seg.SegmentSequence] == ["MANUAL"]  # drawn by an annotator
        assert "SegmentationAlgorithmIdentificationSequence" not in seg.SegmentSequence[0]
    assert sorted(store.get_labeled_images()) == sorted([SIEMENS_STYLE, GE_299])
    # a retried save (an edit of a model's answer): still one SEG, the new one, SEMIAUTOMATIC naming the model
    _label(local / GE_299, tmp_path / "edit.nii.gz", values=(1, 2))
    store.save_label(GE_299, str(tmp_path / "edit.nii.gz"), "final", {"model": "swin_unetr", "model_version": "0.3"})
    (seg,) = _segs_of(orthanc, GE_299)
    described = hd.seg.Segmentation.from_dataset(seg).SegmentSequence
    assert [s.SegmentAlgorithmType for s in described] == ["SEMIAUTOMATIC"] * 2
    algo = described[0].SegmentationAlgorithmIdentificationSequence[0]
    assert (algo.AlgorithmName, algo.AlgorithmVersion) == ("swin_unetr", "0.3")
    # refused before anything reaches the PACS: another grid, an unknown series
    misfit, image = tmp_path / "misfit.nii.gz", read_image(local / GE_303)
    nib.save(nib.Nifti1Image(np.ones(image.array.shape, np.uint8), np.diag([2.0, 2.0, 2.0, 1.0])), misfit)
    with pytest.raises(DataError, match="does not lie on the grid"):
        store.save_label(GE_303, str(misfit), "final", {})
    with pytest.raises(DataError, match="no such series"):
        store.save_label("1.2.3.4.5", str(misfit), "final", {})
    assert len(orthanc.series("SEG")) == 2 and _segs_of(orthanc, GE_303) == []


def test_an_empty_label_deletes_the_series_segs(pacs, tmp_path):
    orthanc, local = pacs
    store = _store(orthanc, tmp_path / "cache")
    _label(local / GE_303, tmp_path / "drawn.nii.gz")
    store.save_label(GE_303, str(tmp_path / "drawn.nii.gz"), "final", {})
    assert len(_segs_of(orthanc, GE_303)) == 1 and GE_303 in store.get_labeled_images()
    image = read_image(local / GE_303)
    write_like(np.zeros(image.array.shape, np.uint8), image, tmp_path / "empty.nii.gz")
    assert store.save_label(GE_303, str(tmp_path / "empty.nii.gz"), "final", {}) == GE_303
    assert _segs_of(orthanc, GE_303) == [] and GE_303 not in store.get_labeled_images()
    assert store.get_label_uri(GE_303, "final") == "" and GE_303 not in [d["image"] for d in store.datalist()]


def _philips_seg(folder: Path, labels: np.ndarray) -> bytes:
    """A SEG written by highdicom directly (not by medimg), as another tool would store it."""
    return _tool_seg(folder, labels, ["first", "second"], folder.parent / "other.dcm").read_bytes()


def _tool_seg(folder: Path, numbered: np.ndarray, names: list[str], out: Path) -> Path:
    """A SEG another tool wrote (:func:`tests.label.vendors.foreign_seg`), stored by that tool's maker."""
    return foreign_seg(folder, numbered, names, out, manufacturer="another tool", series_number=77)


def test_training_reads_segs_this_server_did_not_write(pacs, tmp_path):
    orthanc, local = pacs
    image = read_image(local / PHILIPS)
    labels = np.zeros(image.array.shape, np.uint8)
    labels[10:30, 20:40, 2:6], labels[40:50, 5:15, 6:8] = 1, 2
    requests.post(f"{orthanc.url}/instances", data=_philips_seg(local / PHILIPS, labels), timeout=60).raise_for_status()
    store = _store(orthanc, tmp_path / "fresh-cache")  # nothing cached: labels come from the PACS alone
    items = {Path(d["image"]).name: d["label"] for d in store.datalist()}  # what MONAI Label's training reads
    assert PHILIPS in items
    label = read_image(items[PHILIPS], spatial_dims=None)
    np.testing.assert_array_equal(label.array, labels)
    np.testing.assert_allclose(label.affine, image.affine, atol=1e-4)
    assert {Path(d["image"]).name: d["label"] for d in store.datalist()} == items  # again: from the cache


def test_a_3d_slicer_seg_is_read_by_frame_position(pacs, tmp_path):
    """3D Slicer's Reporting SEG (ami.js' sample): every frame references all 275 source images, which
    highdicom refuses; its frames are placed by position on a source series rebuilt from its references."""
    orthanc, _ = pacs
    seg, first = slicer_seg(), 148
    folder = slicer_seg_source(tmp_path / "source", first, 21)  # the slices around frames 152-167
    orthanc.upload(sorted(folder.iterdir()))
    requests.post(f"{orthanc.url}/instances", data=gzip.open(SLICER_SEG).read(), timeout=120).raise_for_status()
    store = _store(orthanc, tmp_path / "cache")
    items = {Path(d["image"]).name: d["label"] for d in store.datalist()}
    ref = seg.ReferencedSeriesSequence[0]
    expected = seg.pixel_array[first:first + 21].transpose(2, 1, 0)
    np.testing.assert_array_equal(read_image(items[str(ref.SeriesInstanceUID)], spatial_dims=None).array, expected)
    assert expected.sum() == 3338


def test_a_partly_fetched_series_is_fetched_again(pacs, tmp_path):
    orthanc, local = pacs
    _store(orthanc, tmp_path / "cache")
    store = _store(orthanc, tmp_path / "cache")
    partial = Path(store._datastore.image_path()) / PHILIPS  # an earlier run stopped after 4 of 9 instances
    copy_files(sorted((local / PHILIPS).iterdir())[:4], partial)
    store = _store(orthanc, tmp_path / "cache")  # restarted over that cache
    image = read_image(store.get_image_uri(PHILIPS))
    assert image.array.shape == (64, 64, 9)
    np.testing.assert_array_equal(image.array, read_image(local / PHILIPS).array)
    assert not [p for p in partial.parent.iterdir() if p.is_dir() and p.name.startswith(".")]  # none left behind


def test_listing_pages_through_a_pacs_that_caps_each_query(pacs, tmp_path):
    orthanc, _ = pacs
    session, adapter = capped_qido_session(2)
    store = _store(orthanc, tmp_path / "cache", session=session)
    every = {s["0020000E"]["Value"][0] for s in orthanc.series() if s["00080060"]["Value"][0] != "SEG"}
    assert len(every) > 4 and set(store.list_images()) == every
    assert sum("/series?" in q for q in adapter.queries) > len(every) // 2  # it asked page after page


def _new_series(orthanc: OrthancServer, folder: Path, seed: int) -> str:
    """A small CT series of its own in the PACS; its SeriesInstanceUID."""
    rng = np.random.default_rng(seed)
    uid = write_dicom_series(rng.integers(0, 900, (24, 20, 6)).astype(float), np.diag([-1.2, -1.2, 3.0, 1.0]), folder)
    orthanc.upload(sorted(folder.iterdir()))
    return uid


def _seg_uids(orthanc: OrthancServer, series_uid: str) -> set[str]:
    return {str(ds.SeriesInstanceUID) for ds in _segs_of(orthanc, series_uid)}


def _boxes(shape: tuple[int, ...], boxes: dict[int, tuple[slice, ...]]) -> np.ndarray:
    labels = np.zeros(shape, np.uint8)
    for value, box in boxes.items():
        labels[box] = value
    return labels


TISSUE = [{"idx": 2, "name": "white_matter"}, {"idx": 3, "name": "csf"}]  # OHIF's label_info (no grey_matter drawn)


def test_saves_and_clears_touch_only_this_servers_segs_and_values_round_trip(pacs, tmp_path):
    """Another tool's SEGs stay through saves and clears; training takes this server's final label first,
    else the newest other SEG (by its segment names); label values 2 and 3 come back 2 and 3."""
    orthanc, _ = pacs
    first, second = _new_series(orthanc, tmp_path / "a", 11), _new_series(orthanc, tmp_path / "b", 12)
    image = read_image(tmp_path / "a")
    gtv = _tool_seg(tmp_path / "a", _boxes(image.array.shape, {1: np.s_[3:9, 3:9, 2:4]}), ["GTV tumour"],
                    tmp_path / "gtv.dcm")
    orthanc.upload([gtv])
    (rt,) = _seg_uids(orthanc, first)
    store = _store(orthanc, tmp_path / "cache")
    drawn = _boxes(image.array.shape, {2: np.s_[10:14, 2:6, 1:3], 3: np.s_[2:6, 12:16, 3:5]})
    for uid, folder in ((first, tmp_path / "a"), (second, tmp_path / "b")):
        write_like(drawn, read_image(folder), tmp_path / "drawn.nii.gz")
        store.save_label(uid, str(tmp_path / "drawn.nii.gz"), "final", {"label_info": TISSUE})
    ours = _seg_uids(orthanc, first) - {rt}
    assert rt in _seg_uids(orthanc, first) and len(ours) == 1  # the other tool's SEG is still there
    store.save_label(first, str(tmp_path / "drawn.nii.gz"), "final", {"label_info": TISSUE})  # a retried save
    assert rt in _seg_uids(orthanc, first) and len(_seg_uids(orthanc, first) - {rt} - ours) == 1
    # another tool's newer SEG of the same series (white matter and csf as segments 1, 2): this server's still wins
    theirs = _boxes(image.array.shape, {1: np.s_[0:4, 0:4, 0:2], 2: np.s_[20:24, 16:20, 4:6]})
    orthanc.upload([_tool_seg(tmp_path / "a", theirs, ["White Matter", "CSF"], tmp_path / "wm.dcm")])
    fresh = _store(orthanc, tmp_path / "fresh")
    items = {Path(d["image"]).name: d["label"] for d in fresh.datalist()}
    for uid in (first, second):
        np.testing.assert_array_equal(read_image(items[uid], spatial_dims=None).array, drawn)  # 2 and 3, exactly
    # an empty save clears this server's SEG alone; training then reads the other tool's newest, by segment name
    write_like(np.zeros_like(drawn), image, tmp_path / "empty.nii.gz")
    store.save_label(first, str(tmp_path / "empty.nii.gz"), "final", {})
    assert len(_seg_uids(orthanc, first)) == 2 and rt in _seg_uids(orthanc, first)
    items = {Path(d["image"]).name: d["label"] for d in store.datalist()}
    np.testing.assert_array_equal(read_image(items[first], spatial_dims=None).array, np.where(theirs, theirs + 1, 0))


def test_an_unreadable_labelled_series_is_skipped_not_every_training(pacs, tmp_path, caplog, monkeypatch):
    """A SEG on a Siemens mosaic (listed, fetched, not readable), and with the served bundle's labels known,
    another tool's SEG whose segment none of them names: each skipped with a log line, the rest trained on."""
    import logging

    _store(orthanc := pacs[0], tmp_path / "first")  # MONAI Label's imports made to work first
    import medimg.label.dicomweb as dicomweb

    orthanc.upload([_tool_seg_on_instance(vendor_series()[SIEMENS[1]][0], tmp_path / "mosaic-seg.dcm")])
    uid = _new_series(orthanc, tmp_path / "c", 13)
    image = read_image(tmp_path / "c")
    orthanc.upload([_tool_seg(tmp_path / "c", _boxes(image.array.shape, {1: np.s_[3:9, 3:9, 2:4]}), ["GTV tumour"],
                              tmp_path / "gtv.dcm")])
    monkeypatch.setattr(dicomweb, "served_labels", lambda: {"background": 0, "lesion": 1}, raising=False)
    store = _store(orthanc, tmp_path / "cache")
    with caplog.at_level(logging.WARNING, logger="medimg.label.dicomweb"):
        items = {Path(d["image"]).name for d in store.datalist()}
    assert SIEMENS[1] not in items and uid not in items and GE_299 in items
    skipped = [r.getMessage() for r in caplog.records if "training skips" in r.getMessage()]
    assert any(SIEMENS[1] in m for m in skipped) and any(uid in m and "GTV tumour" in m for m in skipped), skipped
    assert any("skipped" in r.getMessage() and "labelled series" in r.getMessage() for r in caplog.records)


def _tool_seg_on_instance(source: Path, out: Path) -> Path:
    """A one-frame SEG another tool drew on one instance (a Siemens mosaic)."""
    import highdicom as hd
    from pydicom.sr.coding import Code

    src = pydicom.dcmread(source)
    frame = np.zeros((1, src.Rows, src.Columns), np.uint8)
    frame[0, 100:120, 100:120] = 1
    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label="lesion", segmented_property_category=Code("91723000", "SCT", "Anatomical"),
        segmented_property_type=Code("85756007", "SCT", "Tissue"), algorithm_type="MANUAL")
    hd.seg.Segmentation(
        source_images=[src], pixel_array=frame, segmentation_type="BINARY", segment_descriptions=[segment],
        series_instance_uid=hd.UID(), series_number=99, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="Slicer", manufacturer_model_name="dcmqi", software_versions="1",
        device_serial_number="1").save_as(out)
    return out


def test_a_killed_download_leaves_nothing_behind(pacs, tmp_path):
    """kill -9 midway through a series' download: its hidden folder is removed at the next start and fetch."""
    import subprocess
    import sys

    orthanc, _ = pacs
    store = _store(orthanc, tmp_path / "cache")
    cache = Path(store._datastore.image_path())
    script = f"""
import os
from pathlib import Path
from dicomweb_client.api import DICOMwebClient
from medimg.label.pacs import fetch_series

class Dying(DICOMwebClient):
    def retrieve_series(self, study, series, **kw):
        for n, ds in enumerate(super().retrieve_series(study, series, **kw)):
            if n == 3:
                os.kill(os.getpid(), 9)
            yield ds

fetch_series(Dying({orthanc.dicomweb!r}), {PHILIPS!r}, Path({str(cache)!r}) / {PHILIPS!r})
"""
    for _ in range(2):
        assert subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parents[2]).returncode == -9
    hidden = sorted(p.name for p in cache.iterdir() if p.name.startswith(f".{PHILIPS}."))
    assert len(hidden) == 1 and hidden[0].endswith(".partial")  # the second fetch removed the first's
    (live := cache / f".{GE_303}.pid{os.getpid()}.x.partial").mkdir()  # a download under way in this process
    _store(orthanc, tmp_path / "cache")  # the next start
    assert not [p for p in cache.iterdir() if p.name.startswith(f".{PHILIPS}.")] and live.is_dir()
    (cache / f".{PHILIPS}.abcd1234.old").mkdir()  # an older medimg's, no process named
    read_image(store.get_image_uri(PHILIPS))  # the next fetch
    assert sorted(p.name for p in cache.iterdir() if p.name.startswith(".") and p.is_dir()) == [live.name]
