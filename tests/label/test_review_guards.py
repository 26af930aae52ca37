"""Requests that must not reach outside the studies, the PACS' admin API, or costly work from another site.

In-process checks run MONAI Label's own app (``medimg.label.asgi``) through a test client; the
inference checks start one real server on 127.0.0.1 with the shipped ``tissue_t1`` bundle and a
studies folder holding one small NIfTI, its working folder holding another that is no study.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from medimg.bundles import shipped_bundles
from medimg.label.origin import OriginGuardMiddleware
from tests.cli.label_client import LabelServer

OHIF = "http://ohif.lab:3000"  # a --cors origin
OWN = ["http://127.0.0.1:8000", "http://localhost:8000", OHIF]
EVIL = "http://evil.example"
TOKEN = "medimg-review-token-0123456789"


def _nifti(path: Path, seed: int = 0) -> Path:
    data = np.random.default_rng(seed).uniform(0, 100, (32, 32, 32)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    return path


def _one_line(r) -> str:
    detail = r.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail, detail
    return detail


@pytest.fixture()
def served(tmp_path, monkeypatch):
    """MONAI Label's app as ``serve`` runs it, with a stand-in app instance over a studies folder."""
    from medimg.label.compat import install

    install()
    from monailabel.endpoints import datastore as ml_datastore

    import medimg.label.asgi as asgi
    from medimg.label.datastore import SeriesDatastore

    studies = tmp_path / "studies"
    studies.mkdir()
    _nifti(studies / "scan.nii.gz")
    store = SeriesDatastore(str(studies), extensions=["*.nii.gz"], auto_reload=False)
    instance = SimpleNamespace(datastore=lambda: store)
    for module in (asgi, ml_datastore):
        monkeypatch.setattr(module, "app_instance", lambda: instance, raising=False)
    tmp = tmp_path / "server_tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return TestClient(asgi.app, base_url="http://127.0.0.1"), asgi, store, tmp


def test_params_cannot_name_another_image_model_or_session(served, monkeypatch):
    http, asgi, _, _ = served
    calls = []
    monkeypatch.setattr(asgi, "run_inference", lambda *args: calls.append(args) or {})
    refused = {}
    for params in ({"image": "/etc/passwd"}, {"image": "/no/such/file.nii.gz"}, {"image": "other"},
                   {"model": "other"}, {"session": {"image": "/etc/passwd"}}, [["image", "/etc/passwd"]],
                   "image", None, 3):
        r = http.post("/infer/m", params={"image": "scan"}, data={"params": json.dumps(params)})
        assert r.status_code == 400, (params, r.status_code, r.text)
        refused[json.dumps(params)] = _one_line(r)
    assert calls == []
    # no oracle: a path that exists and one that does not get the same answer
    assert refused['{"image": "/etc/passwd"}'] == refused['{"image": "/no/such/file.nii.gz"}']
    # what MONAI Label itself would set passes, and so do the tasks' own parameters ("label": Slicer's segment name)
    for params in ({}, {"image": "scan", "model": "m"}, {"label": "white matter", "foreground": [[1, 2, 3]]}):
        assert http.post("/infer/m", params={"image": "scan"}, data={"params": json.dumps(params)}).status_code == 200
    assert len(calls) == 3


def test_the_dicom_proxy_forwards_dicomweb_reads_only(served, monkeypatch):
    http, _, _, _ = served
    from monailabel.config import settings
    from monailabel.endpoints import proxy

    forwarded = []

    def pacs(url, **kwargs):
        forwarded.append(url)
        return SimpleNamespace(raw=SimpleNamespace(read=lambda: b"[]"), status_code=200,
                               headers={"content-type": "application/dicom+json"})

    monkeypatch.setattr(proxy, "requests", SimpleNamespace(get=pacs, post=pacs))
    monkeypatch.setattr(settings, "MONAI_LABEL_STUDIES", "http://pacs.lab/dicom-web")
    for method, path in (("GET", "..%2Fsystem"), ("POST", "..%2Ftools%2Flookup"), ("GET", "%2E%2E/system"),
                         ("GET", "studies/..%5C..%5Csystem"), ("GET", "studies%2F..%2F..%2Fsystem"),
                         ("GET", "system"), ("GET", "tools/lookup"), ("GET", "http:%2F%2Fevil.example/x"),
                         ("GET", "studies/1.2/../../system"), ("GET", "qido/patients"),
                         ("POST", "wado/studies"), ("POST", "stow/studies/1.2.3"), ("POST", "qido/studies"),
                         ("DELETE", "studies/1.2.3"), ("PUT", "studies/1.2.3"), ("GET", "wado/studies//1.2")):
        r = http.request(method, f"/proxy/dicom/{path}")
        assert r.status_code in (400, 403), (method, path, r.status_code)
        assert "proxy" in _one_line(r)
    assert forwarded == []
    reads = ("qido/studies", "qido/studies/1.2.840.1/series", "wado/studies/1.2.3/series/4.5.6/metadata",
             "wado/studies/1.2.3/series/4.5.6/instances/7.8.9/frames/1,2", "studies/1.2.3/series",
             "wado/studies/1.2.3/series/4.5.6/instances/7.8.9/bulk/7fe00010", "qido/series", "instances")
    for path in reads:
        assert http.get(f"/proxy/dicom/{path}").status_code == 200, path
    assert forwarded == [f"http://pacs.lab/dicom-web/{p.split('/', 1)[1] if p.startswith(('qido/', 'wado/')) else p}"
                         for p in reads]


def test_the_dataset_zip_is_deleted_once_sent(served):
    http, _, store, tmp = served
    label = _nifti(tmp.parent / "label.nii.gz")
    store.save_label("scan", str(label), "final", {})
    r = http.get("/datastore/dataset")
    assert r.status_code == 200, r.text
    (tmp.parent / "got.zip").write_bytes(r.content)
    names = zipfile.ZipFile(tmp.parent / "got.zip").namelist()
    assert "image/scan.nii.gz" in names and "label/scan.nii.gz" in names
    assert list(tmp.iterdir()) == []  # MONAI Label leaves every archive in the temporary folder


def _guarded() -> tuple[TestClient, list[str]]:
    calls: list[str] = []

    async def endpoint(request):
        calls.append(f"{request.method} {request.url.path}")
        return PlainTextResponse("done")

    app = Starlette(routes=[Route("/{path:path}", endpoint, methods=["GET", "HEAD", "POST"])],
                    middleware=[Middleware(OriginGuardMiddleware, allowed_origins=OWN),
                                Middleware(CORSMiddleware, allow_origins=OWN, allow_credentials=True,
                                           allow_methods=["*"], allow_headers=["*"])])
    return TestClient(app, base_url="http://127.0.0.1:8000"), calls


def test_cross_site_gets_with_costs_or_side_effects_are_refused():
    client, calls = _guarded()
    costly = ("/datastore/dataset", "/datastore/?output=train", "/datastore/image?image=x", "/datastore/label",
              "/proxy/dicom/qido/studies", "/model/m", "/logs/", "/train/", "/session/x")
    for headers in ({"Origin": EVIL}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"},
                    {"Sec-Fetch-Site": "same-site"}, {"Origin": EVIL, "Sec-Fetch-Site": "same-origin"}):
        for path in costly:
            for method in ("GET", "HEAD"):
                r = client.request(method, path, headers=headers)
                assert r.status_code == 403, (headers, path, method, r.status_code)
            assert "cross-site" in _one_line(client.get(path, headers=headers))
    assert calls == []
    # allowed origins, the server's own pages and clients that are no web page pass everything
    for headers in ({"Origin": OHIF, "Sec-Fetch-Site": "same-site"}, {"Origin": "http://localhost:8000"},
                    {"Sec-Fetch-Site": "same-origin"}, {"Sec-Fetch-Site": "none"}, {}):
        for path in costly:
            assert client.get(path, headers=headers).status_code == 200, (headers, path)
    # pages a link from another site may open, and CORS pre-flights
    for path in ("/", "/docs", "/favicon.ico", "/info/", "/ohif/", "/ohif/viewer/1.2.3", "/static/x.js"):
        assert client.get(path, headers={"Sec-Fetch-Site": "cross-site"}).status_code == 200, path
    pre = client.options("/datastore/dataset", headers={"Origin": OHIF, "Access-Control-Request-Method": "GET"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == OHIF


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One real server: studies hold ``scan``; its working folder holds ``patient_x.nii.gz``, no study."""
    studies, cwd = tmp_path_factory.mktemp("studies"), tmp_path_factory.mktemp("elsewhere")
    _nifti(studies / "scan.nii.gz")
    _nifti(cwd / "patient_x.nii.gz", seed=1)
    models = tmp_path_factory.mktemp("models")
    shutil.copytree(shipped_bundles()["tissue_t1"], models / "tissue_t1")
    here = os.getcwd()
    os.chdir(cwd)  # the server's working folder (MONAI Label reads an existing relative path as is)
    try:
        srv = LabelServer(models, studies, tmp_path_factory.mktemp("label"), token=TOKEN,
                          env={"TMPDIR": str(tmp_path_factory.mktemp("server_tmp")),
                               "MONAI_LABEL_SESSION_PATH": str(tmp_path_factory.mktemp("sessions"))})
    finally:
        os.chdir(here)
    yield SimpleNamespace(srv=srv, studies=studies, outside=cwd / "patient_x.nii.gz")
    srv.stop()


def _infer(server, image: str, params: object, **kwargs):
    return server.srv.session.post(f"{server.srv.url}/infer/tissue_t1", params={"image": image, "output": "all"},
                                   data={"params": json.dumps(params)}, timeout=600, **kwargs)


def test_inference_reads_studies_and_uploads_only(server, tmp_path):
    labels_before = sorted(p.name for p in server.studies.rglob("*"))
    refused = {}
    for name, params in (("outside", {"image": str(server.outside)}), ("passwd", {"image": "/etc/passwd"}),
                         ("missing", {"image": str(server.outside.with_name("none.nii.gz"))}),
                         ("pairs", [["image", str(server.outside)]])):
        r = _infer(server, "scan", params)
        assert r.status_code == 400, (name, r.status_code, r.text[:300])
        refused[name] = _one_line(r)
    assert refused["passwd"] == refused["missing"] == refused["outside"]  # no existence oracle
    # a plain id naming a file in the server's working folder is no study either
    r = _infer(server, "patient_x.nii.gz", {})
    assert r.status_code == 400, r.text[:300]
    assert "patient_x.nii.gz" in _one_line(r)
    # nor do MONAI Label's whole-slide routes, which take any query image and read it as is
    for route in ("wsi", "wsi_v2"):
        r = server.srv.session.post(f"{server.srv.url}/infer/{route}/tissue_t1",
                                    params={"image": str(server.outside), "output": "json"}, timeout=600)
        assert r.status_code == 400, (route, r.status_code, r.text[:300])
    assert sorted(p.name for p in server.studies.rglob("*")) == labels_before  # no label stored
    # the study itself, and an uploaded file, are segmented
    code, result, path = server.srv.infer("tissue_t1", "scan", {}, tmp_path)
    assert code == 200 and path is not None, result
    url, upload = server.srv.url, ("upload.nii.gz", server.outside.read_bytes())
    r = server.srv.session.post(f"{url}/infer/tissue_t1", params={"output": "json"}, data={"params": "{}"},
                                files={"file": upload}, timeout=600)
    assert r.status_code == 200, r.text[:300]
    # and so is a session's image (3D Slicer's upload of a local volume)
    r = server.srv.session.put(f"{url}/session/", files=[("files", upload)], timeout=600)
    assert r.status_code == 200, r.text[:300]
    query = {"session_id": r.json()["session_id"], "output": "json"}
    r = server.srv.session.post(f"{url}/infer/tissue_t1", params=query, data={"params": "{}"}, timeout=600)
    assert r.status_code == 200, r.text[:300]


def test_the_server_stops_and_leaves_no_process(server):
    server.srv.stop()
    assert not server.srv.alive()


def test_session_ids_are_uuids_and_archives_are_not_unpacked(served, monkeypatch, tmp_path):
    """An absolute ``session_id`` made MONAI Label rmtree a folder; a tar with ``../`` members wrote anywhere."""
    import io
    import tarfile

    http, asgi, _, _ = served
    from monailabel.endpoints import session as ml_session

    calls = []
    monkeypatch.setattr(asgi, "run_inference", lambda *args: calls.append(args) or {})
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "meta.info").write_text(json.dumps({"image": "/nonexistent"}))
    for session_id in (str(victim), "../victim", "x"):
        r = http.post("/infer/m", params={"image": "scan", "session_id": session_id}, data={"params": "{}"})
        assert r.status_code == 400 and "session_id" in _one_line(r), (session_id, r.status_code)
        assert http.get(f"/session/{session_id.strip('/')}").status_code in (400, 404)
    assert calls == [] and (victim / "meta.info").is_file()  # nothing was removed
    uuid = "0f8fad5b-d9cb-469f-a165-70867728950e"
    assert http.post("/infer/m", params={"image": "scan", "session_id": uuid}, data={"params": "{}"}).status_code == 200
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        member = tarfile.TarInfo("../../escaped.txt")
        member.size = 2
        tar.addfile(member, io.BytesIO(b"hi"))
    unpacked = []
    monkeypatch.setattr(ml_session, "create_session", lambda *a, **k: unpacked.append(a) or {})
    r = http.put("/session/", params={"uncompress": "true"}, files={"files": ("x.tar", buf.getvalue())})
    assert r.status_code == 400 and "uncompress" in _one_line(r)
    assert unpacked == []
    # a training inside the server process (run_sync) would bind the server to its shell's life
    r = http.post("/train/m", params={"run_sync": "true"}, json={})
    assert r.status_code == 400 and "run_sync" in _one_line(r)


def test_a_request_body_cannot_set_the_subprocess_bundle_path(served, monkeypatch):
    """MONAI Label adds a request's ``bundle_path`` to its train / scoring / batch subprocess's PYTHONPATH."""
    http, _, _, _ = served
    from monailabel.utils.async_tasks import task as ml_task

    started = []
    monkeypatch.setattr(ml_task, "run_background_task", lambda request, method: started.append(request) or {})
    monkeypatch.setattr(ml_task, "app_instance", lambda: SimpleNamespace(info=lambda: {}, bundle_path=lambda m: None))
    for path in ("/scoring/x", "/train/m", "/batch/infer/m"):
        r = http.post(path, json={"bundle_path": "/tmp/uploaded-code"})
        assert r.status_code == 400 and "bundle_path" in _one_line(r), (path, r.status_code, r.text)
    assert started == []
    assert http.post("/scoring/x", json={}).status_code == 200 and len(started) == 1


def test_an_inference_cannot_overwrite_the_annotators_labels(served, monkeypatch):
    http, asgi, _, _ = served
    monkeypatch.setattr(asgi, "run_inference", lambda *args: {})
    for params in ({"save_label": True}, {"label_tag": "final"}):
        r = http.post("/infer/m", params={"image": "scan"}, data={"params": json.dumps(params)})
        assert r.status_code == 400 and "PUT /datastore/label" in _one_line(r)
