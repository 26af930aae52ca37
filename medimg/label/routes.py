"""``GET`` / ``HEAD /datastore/image`` for DICOM series: one NRRD file a client loads, in the series' geometry.

MONAI Label 0.8.5 serves image *files* only: for an image that is a DICOM series folder (a studies
folder's series, a series fetched from a PACS) its endpoint answers 404, and 3D Slicer's "Next
sample", which downloads the image through it, fails. These routes, registered ahead of MONAI
Label's with the same parameters and authorisation (RBAC, user role), answer a series folder with
an NRRD written from :func:`medimg.io.image.read_image` in the series' exact geometry (voxels in the
stored (column, row, slice) order, direction, spacing and origin from its affine; see
:func:`medimg.label.results.write_itk_like`), named ``<id>.nrrd`` in its Content-Disposition.
Voxels stay exact: ``int16`` / ``uint16`` when every value is an integer in range, else ``float32``.
The file is written to the temporary folder and deleted once sent. Any other image goes to MONAI
Label's own handler. An id that is not a plain name is refused (400, :mod:`medimg.label.datastore`).

``PUT /datastore/label``, ``PUT /datastore/image``, ``GET /datastore/``, ``POST
/activelearning/{strategy}`` and ``GET /info/`` are MONAI Label's own handlers run in a worker
thread: MONAI Label declares them ``async`` and so runs them on the event loop, where a label
read, checked and stored in a PACS, or a listing of the PACS (seconds), stalled every other
request, inference status included.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
from fastapi import BackgroundTasks, Depends, File, Form, HTTPException, UploadFile
from fastapi.responses import FileResponse
from monailabel.app import app
from monailabel.config import RBAC_ANNOTATOR, RBAC_USER, settings
from monailabel.endpoints import activelearning as ml_activelearning
from monailabel.endpoints import datastore as ml_datastore
from monailabel.endpoints import info as ml_info
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.utils.app import app_instance

from medimg.label.datastore import plain_name

__all__ = ["add_image", "app_info", "datastore_listing", "next_sample", "save_label", "series_as_nrrd"]


def _dtype(array: np.ndarray) -> np.dtype:
    """The smallest exact type for the voxels: int16 / uint16 for integers in range, else float32."""
    if array.size and np.all(np.isfinite(array)) and np.array_equal(array, np.round(array)):
        lo, hi = float(array.min()), float(array.max())
        for dtype in (np.int16, np.uint16):
            if np.iinfo(dtype).min <= lo and hi <= np.iinfo(dtype).max:
                return np.dtype(dtype)
    return np.dtype(np.float32)


def series_as_nrrd(folder: str) -> Path:
    """A new temporary NRRD of the series in ``folder``, in its exact geometry (the caller deletes it)."""
    from medimg.io.image import read_image
    from medimg.label.results import write_itk_like

    image = read_image(folder)
    with tempfile.NamedTemporaryFile(prefix="medimg-series-", suffix=".nrrd", delete=False) as fh:
        out = Path(fh.name)
    try:
        return write_itk_like(image.array, image, out, _dtype(image.array))
    except BaseException:
        out.unlink(missing_ok=True)
        raise


def _series_folder(image: str) -> str | None:
    """The image's folder when it is a series; ``None`` for a file (MONAI Label's handler serves it)."""
    uri = app_instance().datastore().get_image_uri(plain_name("image id", image))
    return uri if uri and os.path.isdir(uri) else None


def download_image(background_tasks: BackgroundTasks, image: str,
                   user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))):  # noqa: B008 - FastAPI
    """The image: a series folder as ``<id>.nrrd``, a file as MONAI Label serves it."""
    folder = _series_folder(image)
    if folder is None:
        return ml_datastore.download_image(image)
    path = series_as_nrrd(folder)
    background_tasks.add_task(os.unlink, path)
    return FileResponse(path, media_type="application/octet-stream", filename=f"{image}.nrrd")


def check_image(image: str, check_sum: Optional[str] = None,  # noqa: UP045 - FastAPI reads the annotation
                user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))):  # noqa: B008 - FastAPI
    """Whether the image exists; a series folder has no file checksum to compare."""
    if _series_folder(image) is None:
        return ml_datastore.download_image(image, check_only=True, check_sum=check_sum)
    if check_sum:
        raise HTTPException(status_code=404, detail="Image NOT Found (a DICOM series has no file checksum)")
    return {}


def save_label(background_tasks: BackgroundTasks, image: str, params: str = Form("{}"),
               tag: str = DefaultLabelTag.FINAL.value, label: UploadFile = File(...),  # noqa: B008 - FastAPI
               user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR))):  # noqa: B008
    """MONAI Label's label save, in a worker thread: reading, checking and storing (STOW to a PACS) take seconds."""
    return ml_datastore.save_label(background_tasks, image, params, tag, label, user.username)


def add_image(background_tasks: BackgroundTasks, image: Optional[str] = None,  # noqa: UP045 - FastAPI
              params: str = Form("{}"), file: UploadFile = File(...),  # noqa: B008 - FastAPI
              user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR))):  # noqa: B008
    """MONAI Label's image upload, in a worker thread (the upload is read whole to check it)."""
    return ml_datastore.add_image(background_tasks, image, params, file, user.username)


def datastore_listing(output: Optional[ml_datastore.ResultType] = None,  # noqa: UP045 - FastAPI
                      user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))):  # noqa: B008
    """MONAI Label's datastore listing, in a worker thread (a PACS datastore lists the PACS)."""
    return ml_datastore.datastore(output)


def next_sample(strategy: str, params: Optional[dict] = None,  # noqa: UP045 - FastAPI
                user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))):  # noqa: B008
    """MONAI Label's active-learning sample, in a worker thread (it lists the datastore)."""
    return ml_activelearning.sample(strategy, params, user.username)


def app_info(user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))):  # noqa: B008 - FastAPI
    """MONAI Label's ``/info/``, in a worker thread (it holds the datastore's counts)."""
    return ml_info.app_info()


for _method, _path, _endpoint, _summary, _role, _tag in (
        ("GET", "/datastore/image", download_image, "Download Image (a DICOM series as NRRD)", RBAC_USER, "Datastore"),
        ("HEAD", "/datastore/image", check_image, "Check If Image Exists", RBAC_USER, "Datastore"),
        ("PUT", "/datastore/label", save_label, "Save Finished Label", RBAC_ANNOTATOR, "Datastore"),
        ("PUT", "/datastore/image", add_image, "Upload new Image", RBAC_ANNOTATOR, "Datastore"),
        ("GET", "/datastore/", datastore_listing, "Get All Images/Labels from datastore", RBAC_USER, "Datastore"),
        ("POST", "/activelearning/{strategy}", next_sample, "Run Active Learning strategy to get next sample",
         RBAC_USER, "ActiveLearning"),
        ("GET", "/info/", app_info, "Get App Info", RBAC_USER, "App")):
    app.router.add_api_route(f"{settings.MONAI_LABEL_API_STR}{_path}", _endpoint, methods=[_method],
                             summary=f"{_role}{_summary}", tags=[_tag])
    app.router.routes.insert(0, app.router.routes.pop())  # ahead of MONAI Label's route
