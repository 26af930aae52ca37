"""3D Slicer's "Next sample" on a studies folder of DICOM series: the real server serves each series as one NRRD.

Studies: the MNI head as a DICOM series (as in ``test_label_server.py``), GE's real ``….299``
series (its b=0 volume) in a folder named by its UID, and a NIfTI file. The server starts and
stops here.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests

from medimg.io.image import read_image
from tests.cli.label_client import LabelServer
from tests.helpers import write_dicom_series
from tests.label.vendors import GE_299, copy_files, one_volume, vendor_series

TOKEN = "medimg-series-token-0123456789"


@pytest.fixture(scope="module")
def studies(tmp_path_factory, mni_dir) -> Path:
    folder = tmp_path_factory.mktemp("studies")
    image = read_image(mni_dir / "t1.nii.gz")
    affine = image.affine.copy()
    affine[:3, :3] *= 3
    write_dicom_series(np.round(image.array[::3, ::3, ::3]), affine, folder / "mni_series")
    copy_files(one_volume(vendor_series()[GE_299]), folder / GE_299)
    nib.save(nib.load(mni_dir / "t1.nii.gz"), folder / "mni_t1.nii.gz")
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory, studies, mni_run):
    models = tmp_path_factory.mktemp("models")
    shutil.copytree(mni_run / "bundle", models / "swin_unetr")
    srv = LabelServer(models, studies, tmp_path_factory.mktemp("label"), token=TOKEN,
                      env={"TMPDIR": str(tmp_path_factory.mktemp("server_tmp"))})
    yield srv
    srv.stop()


def test_next_sample_downloads_a_series_as_one_nrrd_in_its_geometry(server, studies, tmp_path):
    objects = server.get("/datastore/", params={"output": "all"})["objects"]
    assert sorted(objects) == sorted(["mni_series", GE_299, "mni_t1"])
    for image in ("mni_series", GE_299):
        info = server.get("/datastore/image/info", params={"image": image})  # what "Next sample" names the file
        assert info["name"] == f"{image}.nrrd" and "path" not in info
        r = server.session.get(f"{server.url}/datastore/image", params={"image": image}, timeout=300)
        assert r.status_code == 200, r.text[:300]
        assert r.headers["content-disposition"] == f'attachment; filename="{image}.nrrd"'
        (tmp_path / info["name"]).write_bytes(r.content)
        served, source = read_image(tmp_path / info["name"], spatial_dims=None), read_image(studies / image)
        np.testing.assert_array_equal(served.array, source.array)
        np.testing.assert_allclose(served.affine, source.affine, atol=1e-5)
        assert server.session.head(f"{server.url}/datastore/image", params={"image": image}, timeout=60).ok
    r = server.session.get(f"{server.url}/datastore/image", params={"image": "mni_t1"}, timeout=300)
    assert r.content == (studies / "mni_t1.nii.gz").read_bytes()  # a file: MONAI Label's own answer
    assert server.session.get(f"{server.url}/datastore/image", params={"image": "none"}, timeout=60).status_code == 404
    assert requests.get(f"{server.url}/datastore/image", params={"image": "mni_series"}, timeout=60).status_code == 401
    assert not [p for p in server.temp_files() if p.startswith("medimg-series-")]  # each NRRD deleted once sent
    sample = server.session.post(f"{server.url}/activelearning/random", json={}, timeout=60).json()
    assert sample["name"] == f"{sample['id']}.nrrd" or sample["name"] == "mni_t1.nii.gz"


def test_the_server_stops_and_leaves_no_process(server):
    server.stop()
    assert not server.alive()
