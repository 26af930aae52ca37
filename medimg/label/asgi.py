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

Outermost, on every request, :class:`medimg.label.origin.OriginGuardMiddleware` answers only the
hosts ``serve`` passes in ``MEDIMG_LABEL_ALLOWED_HOSTS`` besides loopback (DNS rebinding: 421)
and refuses writes from other web pages' origins (CSRF: 403), token or not; without ``serve``
(the variables unset) it answers loopback names and takes writes from its own origin only.
Next, with ``serve --token-file``, it demands the bearer token on every endpoint
(:class:`medimg.label.auth.BearerTokenMiddleware`). Request bodies are limited
(``serve --max-upload-mb``, :mod:`medimg.label.limits`). Image ids must be plain names inside the
studies folder: MONAI Label would read any existing server path given as ``image``
(:mod:`medimg.label.datastore`). Malformed requests (a body FastAPI cannot parse, ``params`` that
is not JSON, an id that reaches outside) get 400 with the reason, not 422 or 500.

MONAI Label's ``start_server --uvicorn_app`` option exists for such custom apps.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Optional

from fastapi import BackgroundTasks, Depends, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from monailabel.app import app
from monailabel.config import RBAC_USER, settings
from monailabel.endpoints.infer import ResultType, run_inference
from monailabel.endpoints.user.auth import RBAC, User

from medimg.errors import DataError
from medimg.label.auth import DIGEST_ENV, BearerTokenMiddleware
from medimg.label.datastore import plain_name
from medimg.label.limits import DEFAULT_MAX_UPLOAD_MB, UPLOAD_ENV, BodyLimitMiddleware
from medimg.label.origin import HOSTS_ENV, ORIGINS_ENV, OriginGuardMiddleware

__all__ = ["app"]


def infer_in_worker_thread(background_tasks: BackgroundTasks, model: str, image: str = "",  # noqa: B008 - FastAPI
                           session_id: str = "", params: str = Form("{}"), file: UploadFile = File(None),  # noqa: B008
                           label: UploadFile = File(None),  # noqa: B008
                           output: Optional[ResultType] = None,  # noqa: UP045 - FastAPI reads the annotation
                           user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))):  # noqa: B008
    """MONAI Label's inference endpoint, run in a worker thread; ``image`` must be a plain id."""
    plain_name("image id", image)
    json.loads(params or "{}")  # not JSON: 400 before any work (bad_request)
    try:
        return run_inference(background_tasks, model, image, session_id, params, file, label, output)
    except BaseException:
        # FastAPI runs background tasks only after a successful response: the uploads' temporary
        # copies MONAI Label scheduled for removal are removed now
        for task in background_tasks.tasks:
            if not task.is_async:
                with contextlib.suppress(OSError):
                    task.func(*task.args, **task.kwargs)
        raise


app.router.add_api_route(f"{settings.MONAI_LABEL_API_STR}/infer/{{model}}", infer_in_worker_thread, methods=["POST"],
                         summary=f"{RBAC_USER}Run Inference for supported model", tags=["Infer"])
app.router.routes.insert(0, app.router.routes.pop())  # ahead of MONAI Label's blocking route

if os.environ.get(ORIGINS_ENV):
    for middleware in app.user_middleware:
        if middleware.cls is CORSMiddleware:
            middleware.kwargs["allow_origins"] = json.loads(os.environ[ORIGINS_ENV])


async def bad_request(request: Request, exc: Exception) -> JSONResponse:
    """400 with the reason: an unparsable body, ``params`` not JSON, a path outside the studies, a bad upload."""
    if isinstance(exc, RequestValidationError):
        detail: object = exc.errors()
    elif isinstance(exc, json.JSONDecodeError):
        detail = f"params: not valid JSON ({exc.msg} at character {exc.pos})"
    else:
        detail = str(exc)
    return JSONResponse({"detail": detail}, status_code=400)


for error in (RequestValidationError, json.JSONDecodeError, DataError):  # DataError: paths, uploads
    app.add_exception_handler(error, bad_request)
app.add_middleware(BodyLimitMiddleware,
                   max_bytes=int(float(os.environ.get(UPLOAD_ENV, DEFAULT_MAX_UPLOAD_MB)) * 2**20))
if os.environ.get(DIGEST_ENV):  # nothing is reached without the token
    app.add_middleware(BearerTokenMiddleware, token_sha256=os.environ[DIGEST_ENV])
# outermost, ahead of the token: a foreign Host or a cross-site write is refused whatever the credentials
app.add_middleware(OriginGuardMiddleware, allowed_hosts=json.loads(os.environ.get(HOSTS_ENV) or "[]"),
                   allowed_origins=json.loads(os.environ.get(ORIGINS_ENV) or "[]"))
