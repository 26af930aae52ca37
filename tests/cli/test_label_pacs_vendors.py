"""MONAI Label on Orthanc holding real vendors' series, driven as OHIF and 3D Slicer drive it.

GE's two series differ only in ``.299`` / ``.303``; the Siemens ones end in ``.0.0.0`` and are
mosaics, which medimg's reader refuses (400, not 500). A readable series with a Siemens-shaped UID
(``….0.0.0``, the MNI head) is where MONAI Label's id rule answered a label save with HTTP 500
after storing its SEG. Orthanc and the server start and stop here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from medimg.io.image import read_image
from tests.cli.label_client import LabelServer, pacs_server
from tests.cli.orthanc import OrthancServer
from tests.helpers import write_dicom_series
from tests.label.vendors import GE_299, GE_303, SIEMENS, copy_files, one_volume, vendor_series

TOKEN = "medimg-vendor-token-0123456789"
OHIF = {"result_extension": ".nrrd", "result_dtype": "uint16"}
SIEMENS_STYLE = f"{generate_uid(prefix=None)}.0.0.0"


@pytest.fixture(scope="module")
def pacs(tmp_path_factory, mni_dir):
    orthanc = OrthancServer(tmp_path_factory.mktemp("orthanc"))
    local = tmp_path_factory.mktemp("series")
    series = vendor_series()
    for uid in (GE_299, GE_303):
        orthanc.upload(one_volume(series[uid]))  # the b=0 volume of each (medimg reads one volume)
        copy_files(one_volume(series[uid]), local / uid)
    for uid in SIEMENS:
        orthanc.upload(series[uid])
    image = read_image(mni_dir / "t1.nii.gz")
    affine = image.affine.copy()
    affine[:3, :3] *= 3
    write_dicom_series(np.round(image.array[::3, ::3, ::3]), affine, local / SIEMENS_STYLE, series_uid=SIEMENS_STYLE)
    orthanc.upload(sorted((local / SIEMENS_STYLE).iterdir()))
    yield orthanc, local
    orthanc.stop()
    assert orthanc.proc.poll() is not None


@pytest.fixture(scope="module")
def server(tmp_path_factory, pacs, mni_run):
    srv = pacs_server(tmp_path_factory, pacs[0].dicomweb, {"swin_unetr": mni_run}, TOKEN)
    yield srv
    srv.stop()


def _segs_of(orthanc: OrthancServer, series_uid: str) -> list[pydicom.Dataset]:
    from dicomweb_client.api import DICOMwebClient

    client, out = DICOMwebClient(orthanc.dicomweb), []
    for item in orthanc.series("SEG"):
        for ds in client.retrieve_series(item["0020000D"]["Value"][0], item["0020000E"]["Value"][0]):
            if any(r.SeriesInstanceUID == series_uid for r in ds.ReferencedSeriesSequence):
                out.append(ds)
    return out


def _save(server: LabelServer, uid: str, labels: np.ndarray, params: dict):
    """OHIF's save: ``label.bin`` (raw voxels, column fastest) and form ``params``."""
    return server.session.put(f"{server.url}/datastore/label", params={"image": uid},
                              data={"params": json.dumps(params)},
                              files={"label": ("label.bin", labels.astype(np.uint8).tobytes(order="F"))}, timeout=300)


def test_vendor_series_are_inferred_on_and_labelled_under_their_own_uids(server, pacs, tmp_path):
    orthanc, local = pacs
    assert server.get("/datastore/", params={"output": "stats"})["total"] == 6  # 2 GE, 3 Siemens, the .0.0.0 head
    names = {1: "grey_matter", 2: "white_matter"}
    info = {"label_info": [{"idx": k, "name": v} for k, v in names.items()]}
    for uid in (SIEMENS_STYLE, GE_299):
        code, result, path = server.infer("swin_unetr", uid, OHIF, tmp_path)
        assert code == 200 and path is not None, (uid, code, str(result)[:300])
        answer, image = read_image(path, spatial_dims=None), read_image(local / uid)
        assert answer.array.shape == image.array.shape and np.allclose(answer.affine, image.affine, atol=1e-3)
        labels = answer.array.astype(np.uint8)
        if not labels.any():  # a brain model on a diffusion b=0 slab may find nothing: draw a box
            labels[100:140, 90:150, :] = 1
        for attempt in range(2):  # a retried save: 200 each time, one SEG in the PACS, the latest
            r = _save(server, uid, labels, info)
            assert r.status_code == 200, (uid, attempt, r.status_code, r.text[:300])
            (seg,) = _segs_of(orthanc, uid)
            assert {s.SegmentAlgorithmType for s in seg.SegmentSequence} == {"MANUAL"}
    assert server.get("/datastore/", params={"output": "stats"})["completed"] == 2
    # an annotator's edit of the model's answer: SEMIAUTOMATIC, naming the served bundle
    meta = json.loads((Path(server.get("/info/")["models"]["swin_unetr"]["config"]["bundle"]) / "configs" /
                       "metadata.json").read_text())
    assert _save(server, GE_299, labels, {**info, "model": "swin_unetr"}).status_code == 200
    (seg,) = _segs_of(orthanc, GE_299)
    algo = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert seg.SegmentSequence[0].SegmentAlgorithmType == "SEMIAUTOMATIC"
    assert (algo.AlgorithmName, algo.AlgorithmVersion) == (meta["name"], meta["version"])
    # the model's own DICOM SEG answer: AUTOMATIC, naming the bundle
    code, _, path = server.infer("swin_unetr", SIEMENS_STYLE, {"result_extension": ".dcm"}, tmp_path)
    assert code == 200 and path is not None
    described = pydicom.dcmread(path).SegmentSequence
    assert {s.SegmentAlgorithmType for s in described} == {"AUTOMATIC"}
    assert described[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmName == meta["name"]
    # 3D Slicer's "Next sample" download of a PACS series: one NRRD on the series' grid
    r = server.session.get(f"{server.url}/datastore/image", params={"image": GE_303}, timeout=300)
    assert r.status_code == 200 and f'filename="{GE_303}.nrrd"' in r.headers["content-disposition"]
    (tmp_path / "ge.nrrd").write_bytes(r.content)
    np.testing.assert_array_equal(read_image(tmp_path / "ge.nrrd", spatial_dims=None).array,
                                  read_image(local / GE_303).array)
    objects = server.get("/datastore/", params={"output": "all"})["objects"]
    assert {GE_299, GE_303, SIEMENS_STYLE} <= set(objects)  # fetched series under their own UIDs
    assert objects[GE_299]["labels"]["final"]["info"]["SegmentAlgorithmType"] == "SEMIAUTOMATIC"
    # a Siemens mosaic: listed and fetched under its UID, refused by the reader with a reason
    code, text, _ = server.infer("swin_unetr", SIEMENS[0], OHIF, tmp_path)
    assert code == 400 and "mosaic" in str(text), (code, str(text)[:300])


def test_the_server_stops_and_leaves_no_process(server):
    server.stop()
    assert not server.alive()
