"""``GET`` / ``HEAD /datastore/image`` on MONAI Label's own app, without a server: series as NRRD, RBAC kept."""

from __future__ import annotations

import tempfile
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest

from medimg.io.image import read_image
from tests.helpers import write_dicom_series
from tests.label import vendors


@pytest.fixture()
def client(tmp_path, monkeypatch):
    from medimg.label.compat import install

    install()
    from fastapi.testclient import TestClient
    from monailabel.app import app
    from monailabel.config import settings
    from monailabel.endpoints import datastore as ml_datastore
    from monailabel.endpoints.user.auth import User, get_current_user

    import medimg.label.asgi  # noqa: F401 - the served app's routes and error handlers
    from medimg.label import routes
    from medimg.label.datastore import SeriesDatastore

    studies = tmp_path / "studies"
    write_dicom_series(np.random.default_rng(2).integers(-1000, 2000, (30, 24, 6)).astype(float),
                       np.diag([-0.7, -0.8, 2.5, 1.0]), studies / "ct_series")
    vendors.copy_files(vendors.one_volume(vendors.vendor_series()[vendors.PHILIPS]), studies / vendors.PHILIPS)
    nib.save(nib.Nifti1Image(np.ones((4, 5, 6), np.float32), np.eye(4)), studies / "scan.nii.gz")
    store = SeriesDatastore(str(studies), extensions=["*.nii.gz"], auto_reload=False)
    instance = SimpleNamespace(datastore=lambda: store)
    monkeypatch.setattr(routes, "app_instance", lambda: instance)
    monkeypatch.setattr(ml_datastore, "app_instance", lambda: instance)
    monkeypatch.setattr(settings, "MONAI_LABEL_AUTH_ENABLE", True)  # RBAC checks the roles
    user = {"roles": [settings.MONAI_LABEL_AUTH_ROLE_USER]}
    app.dependency_overrides[get_current_user] = lambda: User(username="someone", roles=user["roles"])
    tmp = tmp_path / "server_tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    yield TestClient(app, base_url="http://127.0.0.1"), studies, user, tmp  # a loopback Host (origin guard)
    app.dependency_overrides.pop(get_current_user, None)


def test_a_series_folder_downloads_as_one_nrrd_in_its_geometry(client, tmp_path):
    http, studies, _, tmp = client
    # Philips' series has a fractional rescale slope: float voxels
    for image, dtype in (("ct_series", "16-bit signed integer"), (vendors.PHILIPS, "32-bit float")):
        r = http.get("/datastore/image", params={"image": image})
        assert r.status_code == 200, r.text
        assert r.headers["content-disposition"] == f'attachment; filename="{image}.nrrd"'
        path = tmp_path / f"{image}.nrrd"
        path.write_bytes(r.content)
        served, source = read_image(path, spatial_dims=None), read_image(studies / image)
        np.testing.assert_array_equal(served.array, source.array)
        np.testing.assert_allclose(served.affine, source.affine, atol=1e-5)
        import SimpleITK as sitk

        assert sitk.ReadImage(str(path)).GetPixelIDTypeAsString() == dtype  # exact voxels, smallest exact type
        assert http.head("/datastore/image", params={"image": image}).status_code == 200
    assert list(tmp.iterdir()) == []  # each NRRD is deleted once sent
    # files are still MONAI Label's to serve; unknown ids 404, ids reaching out 400
    assert http.get("/datastore/image", params={"image": "scan"}).content == (studies / "scan.nii.gz").read_bytes()
    assert http.get("/datastore/image", params={"image": "nothing"}).status_code == 404
    assert http.get("/datastore/image", params={"image": "../studies"}).status_code == 400
    assert http.head("/datastore/image", params={"image": "ct_series", "check_sum": "abc"}).status_code == 404


def test_the_routes_keep_monai_labels_role_check(client):
    http, _, user, _ = client
    user["roles"] = ["someone-else"]
    for method in ("get", "head"):
        r = getattr(http, method)("/datastore/image", params={"image": "ct_series"})
        assert r.status_code == 403, (method, r.status_code)
    assert http.get("/datastore/image/info", params={"image": "ct_series"}).status_code == 403  # MONAI Label's own


def test_label_saves_and_image_uploads_run_off_the_event_loop(client, monkeypatch):
    """MONAI Label declares them async: a PACS save (seconds) would stall every other request."""
    import asyncio

    from monailabel.config import settings

    from medimg.label import routes

    http, studies, user, _ = client
    user["roles"] = [settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR]
    instance = routes.app_instance()
    store, seen = instance.datastore(), []
    monkeypatch.setattr(instance, "on_save_label", lambda image, label: {}, raising=False)

    def on_loop() -> bool:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return False
        return True

    monkeypatch.setattr(store, "save_label", lambda *a, **k: seen.append(on_loop()) or "scan")
    monkeypatch.setattr(store, "add_image", lambda *a, **k: seen.append(on_loop()) or "new")
    label = nib.Nifti1Image(np.zeros((4, 5, 6), np.uint8), np.eye(4))
    body = {"label": ("l.nii.gz", _gz(label))}
    assert http.put("/datastore/label", params={"image": "scan"}, files=body).status_code == 200
    assert http.put("/datastore/image", params={"image": "new"},
                    files={"file": ("n.nii.gz", _gz(label))}).status_code == 200
    assert seen == [False, False]


def _gz(image: nib.Nifti1Image) -> bytes:
    import gzip

    return gzip.compress(image.to_bytes())


def test_an_image_upload_never_replaces_another_study(client):
    """Same voxels again (Slicer re-uploads the volume it shows): nothing stored; other voxels: 409; junk: 400."""
    from monailabel.config import settings

    http, studies, user, tmp = client
    user["roles"] = [settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR]
    stored = (studies / "scan.nii.gz").read_bytes()
    same = nib.Nifti1Image(np.ones((4, 5, 6), np.float32), np.eye(4))
    other = nib.Nifti1Image(np.full((4, 5, 6), 7, np.float32), np.eye(4))
    r = http.put("/datastore/image", params={"image": "scan"}, files={"file": ("scan.nii.gz", _gz(same))})
    assert r.status_code == 200 and r.json()["image"] == "scan"
    r = http.put("/datastore/image", params={"image": "scan"}, files={"file": ("scan.nii.gz", _gz(other))})
    assert r.status_code == 409 and "another image" in r.json()["detail"]
    r = http.put("/datastore/image", params={"image": "junk"}, files={"file": ("junk.nii.gz", b"not an image")})
    assert r.status_code == 400 and "junk" in r.json()["detail"]
    assert (studies / "scan.nii.gz").read_bytes() == stored and not list(studies.glob("junk*"))
    r = http.put("/datastore/image", params={"image": "fresh"}, files={"file": ("fresh.nii.gz", _gz(other))})
    assert r.status_code == 200
    assert np.asarray(nib.load(studies / "fresh.nii.gz").dataobj).max() == 7
    assert list(tmp.iterdir()) == []  # no copy of an upload left behind


def test_every_route_that_reads_lists_or_stores_runs_in_a_worker_thread():
    """MONAI Label's are ``async`` and do their work on the event loop: one PACS listing stalled every user."""
    import inspect

    from medimg.label.compat import install

    install()
    from monailabel.app import app

    import medimg.label.asgi  # noqa: F401 - the served app's routes

    first: dict[tuple[str, str], object] = {}
    for route in app.router.routes:
        for method in getattr(route, "methods", None) or ():
            first.setdefault((method, route.path), route.endpoint)
    for key in (("PUT", "/datastore/label"), ("PUT", "/datastore/image"), ("GET", "/datastore/"),
                ("POST", "/activelearning/{strategy}"), ("GET", "/info/"), ("POST", "/infer/{model}"),
                ("GET", "/datastore/image")):
        assert not inspect.iscoroutinefunction(first[key]), key
