"""A PACS that needs a login: the server logs in as MONAI Label's settings say, and names no folder by it."""

from __future__ import annotations

import numpy as np
import pytest
import requests

from tests.cli.orthanc import OrthancServer
from tests.helpers import write_dicom_series

USER, PASSWORD = "pacs-reader", "S3cret-pacs-password"


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    server = OrthancServer(tmp_path_factory.mktemp("orthanc-login"), users={USER: PASSWORD})
    folder = tmp_path_factory.mktemp("series") / "s"
    uid = write_dicom_series(np.arange(8 * 8 * 4, dtype=np.float32).reshape(8, 8, 4), np.diag([2.0, 2.0, 3.0, 1.0]),
                             folder)
    server.upload(sorted(folder.iterdir()))
    server.uid = uid
    yield server
    server.stop()


def test_the_pacs_datastore_logs_in_with_monai_labels_settings(orthanc, tmp_path, monkeypatch):
    from medimg.label.compat import install

    install()  # MONAI Label's datastore imports pydicom-seg, which wants pydicom 2's module names
    from monailabel.config import settings

    from medimg.label.dicomweb import PacsDatastore
    from medimg.label.main import pacs_session

    assert requests.get(f"{orthanc.dicomweb}/series", timeout=30).status_code == 401  # it does need a login
    monkeypatch.setattr(settings, "MONAI_LABEL_DICOMWEB_USERNAME", USER)
    monkeypatch.setattr(settings, "MONAI_LABEL_DICOMWEB_PASSWORD", PASSWORD)
    store = PacsDatastore(orthanc.dicomweb, cache_path=str(tmp_path / "cache"), session=pacs_session())
    assert store.list_images() == [orthanc.uid]
    folder = store.get_image_uri(orthanc.uid)  # WADO-RS with the same login
    from medimg.io.image import read_image

    assert read_image(folder).array.shape == (8, 8, 4)


def test_credentials_in_the_studies_url_name_no_folder():
    from medimg.label.serve import default_app_dir

    with_login = default_app_dir(f"http://{USER}:{PASSWORD}@pacs.hospital.org:8042/dicom-web/")
    assert PASSWORD not in str(with_login) and USER not in str(with_login)
    assert with_login == default_app_dir("http://pacs.hospital.org:8042/dicom-web")  # a new password, same folder
    assert with_login.name.startswith("pacs.hospital.org-8042-")
