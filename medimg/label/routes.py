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
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
from fastapi import BackgroundTasks, Depends, HTTPException
from fastapi.responses import FileResponse
from monailabel.app import app
from monailabel.config import RBAC_USER, settings
from monailabel.endpoints import datastore as ml_datastore
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.utils.app import app_instance

from medimg.label.datastore import plain_name

__all__ = ["series_as_nrrd"]


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


for _method, _endpoint, _summary in (("GET", download_image, "Download Image (a DICOM series as NRRD)"),
                                     ("HEAD", check_image, "Check If Image Exists")):
    app.router.add_api_route(f"{settings.MONAI_LABEL_API_STR}/datastore/image", _endpoint, methods=[_method],
                             summary=f"{RBAC_USER}{_summary}", tags=["Datastore"])
    app.router.routes.insert(0, app.router.routes.pop())  # ahead of MONAI Label's route
