"""The ASGI app ``python -m medimg.label serve`` runs: MONAI Label's, with inference off the event loop.

MONAI Label 0.8.5 declares ``POST /infer/{model}`` as ``async`` but runs the model synchronously
inside it, so one inference blocks every other request (``/info/``, ``/train/`` status, other
models) until it ends. This module registers the same endpoint (MONAI Label's own
``run_inference``, same parameters and authorisation) as a plain function ahead of the original;
FastAPI runs plain endpoints in its worker threads, so the server stays responsive. Each medimg
infer task serialises its own requests (:class:`medimg.label.infer.BundleInfer`).

It also narrows cross-origin access to the origins ``python -m medimg.label serve`` passes in
``MEDIMG_LABEL_CORS_ORIGINS`` (MONAI Label allows every origin by default, and its own
``MONAI_LABEL_CORS_ORIGINS`` setting crashes its start-up under pydantic 2).

MONAI Label's ``start_server --uvicorn_app`` option exists for such custom apps.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from fastapi import BackgroundTasks, Depends, File, Form, UploadFile
from fastapi.middleware.cors import CORSMiddleware
from monailabel.app import app
from monailabel.config import RBAC_USER, settings
from monailabel.endpoints.infer import ResultType, run_inference
from monailabel.endpoints.user.auth import RBAC, User

__all__ = ["app"]


def infer_in_worker_thread(background_tasks: BackgroundTasks, model: str, image: str = "",  # noqa: B008 - FastAPI
                           session_id: str = "", params: str = Form("{}"), file: UploadFile = File(None),  # noqa: B008
                           label: UploadFile = File(None),  # noqa: B008
                           output: Optional[ResultType] = None,  # noqa: UP045 - FastAPI reads the annotation
                           user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))):  # noqa: B008
    """MONAI Label's inference endpoint, run in a worker thread."""
    return run_inference(background_tasks, model, image, session_id, params, file, label, output)


app.router.add_api_route(f"{settings.MONAI_LABEL_API_STR}/infer/{{model}}", infer_in_worker_thread, methods=["POST"],
                         summary=f"{RBAC_USER}Run Inference for supported model", tags=["Infer"])
app.router.routes.insert(0, app.router.routes.pop())  # ahead of MONAI Label's blocking route

ORIGINS_ENV = "MEDIMG_LABEL_CORS_ORIGINS"
if os.environ.get(ORIGINS_ENV):
    for middleware in app.user_middleware:
        if middleware.cls is CORSMiddleware:
            middleware.kwargs["allow_origins"] = json.loads(os.environ[ORIGINS_ENV])
