"""MONAI Label on a real DICOMweb PACS: Orthanc on 127.0.0.1, driven the way OHIF's MONAI Label mode drives it.

The request sequence is that of OHIF's extension (``MonaiLabelClient.js`` of MONAI Label's
``plugins/ohifv3``): ``GET /info/``; ``POST /infer/{model}?image=<SeriesInstanceUID>&output=all``
with form ``params`` (``result_extension`` .nrrd, ``result_dtype`` uint16, ``foreground`` /
``background`` for clicks); ``PUT /datastore/label?image=<SeriesInstanceUID>`` with ``params`` and
``label`` = ``label.bin`` (the raw voxels); ``POST /activelearning/random``; ``POST /train/``.
Orthanc and the MONAI Label server start and stop here.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from pydicom.data import get_testdata_file
from scipy import ndimage

from medimg.io.image import read_image
from tests.cli.label_client import LabelServer, pacs_server
from tests.cli.orthanc import OrthancServer
from tests.helpers import dciodvfy, write_dicom_series

TOKEN = "medimg-pacs-token-0123456789"
OHIF = {"result_extension": ".nrrd", "result_dtype": "uint16", "result_compress": False, "restore_label_idx": False}


@pytest.fixture(scope="module")
def pacs(tmp_path_factory, mni_dir):
    orthanc = OrthancServer(tmp_path_factory.mktemp("orthanc"))
    root = tmp_path_factory.mktemp("series")
    image = read_image(mni_dir / "t1.nii.gz")
    affine = image.affine.copy()
    affine[:3, :3] *= 3
    write_dicom_series(np.round(image.array[::3, ::3, ::3]), affine, root / "mni")
    shifted = affine.copy()  # a second subject: the same head one voxel over, its own series
    shifted[:3, 3] += affine[:3, 0]
    write_dicom_series(np.round(image.array[1::3, ::3, ::3]), shifted, root / "mni2")
    files = [*sorted((root / "mni").iterdir()), *sorted((root / "mni2").iterdir())]
    orthanc.upload([*files, Path(get_testdata_file("eCT_Supplemental.dcm"))])
    yield orthanc, root / "mni"
    orthanc.stop()
    assert orthanc.proc.poll() is not None


@pytest.fixture(scope="module")
def server(tmp_path_factory, pacs, mni_run, lite_run):
    srv = pacs_server(tmp_path_factory, pacs[0].dicomweb, {"swin_unetr": mni_run, "litemedsam": lite_run}, TOKEN)
    yield srv
    srv.stop()


def _uid(folder: Path) -> str:
    return str(pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True).SeriesInstanceUID)


def _ohif(server: LabelServer, method: str, path: str, params: dict | None = None, form: dict | None = None,
          files: dict | None = None, body: dict | None = None) -> requests.Response:
    """One request as OHIF sends it: form ``params`` (+ files) for infer and labels, a JSON body otherwise."""
    data = None if form is None else {"params": json.dumps(form)}
    r = server.session.request(method, f"{server.url}{path}", params=params, data=data, files=files, json=body,
                               timeout=900)
    assert r.status_code == 200, (path, r.status_code, r.text[:500])
    return r


def _infer(server: LabelServer, model: str, image: str, params: dict, tmp: Path) -> Path:
    """OHIF's infer call (the same form request as the suite's client): the label file it answers."""
    code, result, path = server.infer(model, image, params, tmp)
    assert code == 200 and path is not None, (model, code, str(result)[:500])
    return path


def test_the_datastore_lists_the_pacs_image_series(server, pacs):
    stats = server.get("/datastore/", params={"output": "stats"})
    assert stats["total"] == 3 and stats["completed"] == 0  # two MR series and the enhanced CT; no SEG yet
    sample = _ohif(server, "POST", "/activelearning/random", body={}).json()
    uids = {s["0020000E"]["Value"][0] for s in pacs[0].series()}
    assert sample["id"] in uids


def test_ohif_infers_on_pacs_series_saves_a_seg_into_the_pacs_and_trains_from_it(server, pacs, tmp_path):
    import highdicom as hd
    from dicomweb_client.api import DICOMwebClient

    from medimg.io.dicomseg import seg_to_labels

    orthanc, folder = pacs
    uid, local = _uid(folder), read_image(folder)
    info = _ohif(server, "GET", "/info/").json()
    assert sorted(info["models"]) == ["litemedsam", "swin_unetr"]
    # automatic segmentation of a series fetched from the PACS, on that series' grid
    auto = read_image(_infer(server, "swin_unetr", uid, OHIF, tmp_path), spatial_dims=None)
    assert auto.array.shape == local.array.shape and np.allclose(auto.affine, local.affine, atol=1e-4)
    assert set(np.unique(auto.array)) <= {0, 1, 2} and (auto.array > 0).sum() > 1000
    # a click (OHIF's deepgrow call) on the same series
    depth = ndimage.distance_transform_edt(auto.array == 2)
    click = [int(c) for c in np.unravel_index(np.argmax(depth), depth.shape)]  # the deepest white matter
    path = _infer(server, "litemedsam", uid, {**OHIF, "foreground": [click], "background": [], "slice": click[2]},
                  tmp_path)
    mask = read_image(path, spatial_dims=None).array
    # the suite's tiny debug-trained LiteMedSAM on a 3 mm series: an answer on the viewed slice, not a
    # quality figure (the shipped bundle's clicks are checked on a real head in test_shipped_bundles)
    assert mask.shape == local.array.shape and 0 < mask.sum() == mask[:, :, click[2]].sum()
    # save the label as OHIF does (label.bin: raw voxels, column fastest): a DICOM SEG goes into the PACS
    labels = auto.array.astype(np.uint8)
    info_labels = {"label_info": [{"idx": 1, "name": "grey_matter"}, {"idx": 2, "name": "white_matter"}]}
    _ohif(server, "PUT", "/datastore/label", params={"image": uid}, form=info_labels,
          files={"label": ("label.bin", labels.tobytes(order="F"))})
    segs = orthanc.series("SEG")
    assert len(segs) == 1
    client = DICOMwebClient(orthanc.dicomweb)
    seg_uid, study = segs[0]["0020000E"]["Value"][0], segs[0]["0020000D"]["Value"][0]
    seg_file = tmp_path / "seg.dcm"
    client.retrieve_series(study, seg_uid)[0].save_as(seg_file)
    seg = hd.seg.segread(seg_file)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == uid
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["grey_matter", "white_matter"]
    np.testing.assert_array_equal(seg_to_labels(seg_file, folder), labels)  # read back with highdicom
    report = subprocess.run([dciodvfy(), str(seg_file)], capture_output=True, text=True)
    assert [line for line in (report.stdout + report.stderr).splitlines() if line.startswith("Error")] == []
    assert server.get("/datastore/", params={"output": "stats"})["completed"] == 1
    # a label.bin that does not fit the series: 400, nothing goes to the PACS, the upload's copy is deleted
    before = server.temp_files()
    r = server.session.put(f"{server.url}/datastore/label", params={"image": uid},
                           data={"params": json.dumps(info_labels)},
                           files={"label": ("label.bin", labels.tobytes(order="F")[:-7])}, timeout=120)
    assert r.status_code == 400 and "not the" in r.text, r.text[:300]
    assert server.temp_files() == before and len(orthanc.series("SEG")) == 1
    # the second subject labelled the same way; the next sample is then the series nobody labelled
    second = _uid(folder.parent / "mni2")
    second_labels = read_image(_infer(server, "swin_unetr", second, OHIF, tmp_path), spatial_dims=None).array
    _ohif(server, "PUT", "/datastore/label", params={"image": second}, form=info_labels,
          files={"label": ("label.bin", second_labels.astype(np.uint8).tobytes(order="F"))})
    assert server.get("/datastore/", params={"output": "stats"})["completed"] == 2
    ct = _ohif(server, "POST", "/activelearning/random", body={}).json()["id"]
    assert ct not in (uid, second)  # the enhanced CT
    # training runs from the labels in the PACS
    _ohif(server, "POST", "/train/swin_unetr", body={"max_epochs": 1, "publish": "always"})
    deadline, status = time.monotonic() + 900, {}
    while time.monotonic() < deadline:
        status = server.get("/train/", params={"check_if_running": "false"})
        if isinstance(status, dict) and status.get("status") in ("DONE", "ERROR"):
            break
        time.sleep(2)
    assert status.get("status") == "DONE", "\n".join(status.get("details", [])[-25:])
    assert any("published" in line for line in status["details"])
