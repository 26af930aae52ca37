"""The ASGI app ``python -m medimg.label serve`` runs: MONAI Label's, with inference off the event loop.

MONAI Label 0.8.5 declares ``POST /infer/{model}`` as ``async`` but runs the model synchronously
inside it, so one inference blocks every other request (``/info/``, ``/train/`` status, other
models) until it ends. This module registers the same endpoint (MONAI Label's own
``run_inference``, same parameters and authorisation) as a plain function ahead of the original;
FastAPI runs plain endpoints in its worker threads, so the server stays responsive. Each medimg
infer task serialises its own requests (:class:`medimg.label.infer.BundleInfer`). ``output=dicom_seg``
(OHIF) answers medimg's own DICOM SEG of the result (``result_extension`` ``.dcm``,
:mod:`medimg.label.results`): MONAI Label's converter needs dcmqi and a NIfTI image path, and
answered 500 for a folder and a PACS datastore alike. A non-DICOM image gets 400.

It also narrows cross-origin access to the origins ``python -m medimg.label serve`` passes in
``MEDIMG_LABEL_CORS_ORIGINS`` (MONAI Label allows every origin by default, and its own
``MONAI_LABEL_CORS_ORIGINS`` setting crashes its start-up under pydantic 2).

Outermost, on every request, :class:`medimg.label.origin.OriginGuardMiddleware` answers only the
hosts ``serve`` passes in ``MEDIMG_LABEL_ALLOWED_HOSTS`` besides loopback (DNS rebinding: 421)
and refuses requests from other web pages' origins (CSRF: 403; links to its pages pass), token
or not; without ``serve`` (the variables unset) it answers loopback names and takes requests from
its own origin only.
Next, with ``serve --token-file``, it demands the bearer token on every endpoint
(:class:`medimg.label.auth.BearerTokenMiddleware`). Request bodies are limited
(``serve --max-upload-mb``, :mod:`medimg.label.limits`). Image ids must be plain names inside the
studies folder: MONAI Label would read any existing server path given as ``image``
(:mod:`medimg.label.datastore`). Malformed requests (a body FastAPI cannot parse, ``params`` that
is not JSON, an id that reaches outside) get 400 with the reason, not 422 or 500.

Three more holes of MONAI Label 0.8.5 are closed here:

- **``params`` re-routing inference.** MONAI Label copies the form ``params`` over the request it
  built from the query (``model``, ``image``, the upload's path) and its session (``session``),
  and reads any existing path it then finds as ``image``. ``params`` must be a JSON object that
  names no other ``image``, ``model`` or ``session`` than the request's own (400, one line, the
  same whatever the path); the tasks' own keys pass (``label`` is 3D Slicer's segment name).
  :meth:`medimg.label.main.MedimgApp.infer` checks the image again, whatever the route (an id is
  never a file of that name in the working folder), and MONAI Label's whole-slide routes
  (``/infer/wsi/...``, which read any path given) answer 400.
- **The DICOM proxy** (``/proxy/dicom/...``, the PACS with the server's credentials, for OHIF)
  forwards only DICOMweb reads: GET of ``studies``, ``series`` or ``instances`` paths made of
  DICOMweb words and UIDs. Any other method gets 403; a percent-escape, backslash, ``..``, an
  absolute URL or any other path (Orthanc's ``/system``, ``/tools/lookup``) 400, before the PACS
  is asked (:func:`proxy_refusal`). OHIF's MONAI Label mode reads through it with GET only and
  saves labels through the server (``PUT /datastore/label``); OHIF's own DICOM upload and reject
  buttons (POST through the proxy) are refused.
- **``GET /datastore/dataset``** left each ZIP archive of the whole dataset in the temporary
  folder; here the archive is deleted as soon as it is opened and streamed from the open file.

MONAI Label's ``start_server --uvicorn_app`` option exists for such custom apps.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from typing import IO, Any, Optional
from urllib.parse import parse_qs

from fastapi import BackgroundTasks, Depends, File, Form, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, StreamingResponse
from monailabel.app import app
from monailabel.config import RBAC_ANNOTATOR, RBAC_USER, settings
from monailabel.endpoints.infer import ResultType, run_inference
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.utils.app import app_instance
from monailabel.utils.async_tasks.task import AsyncTask

from medimg.errors import DataError
from medimg.label import routes  # noqa: F401 - registers GET/HEAD /datastore/image for DICOM series (NRRD)
from medimg.label.auth import DIGEST_ENV, BearerTokenMiddleware
from medimg.label.datastore import plain_name
from medimg.label.limits import DEFAULT_MAX_UPLOAD_MB, UPLOAD_ENV, BodyLimitMiddleware
from medimg.label.main import REQUEST_FILES
from medimg.label.origin import HOSTS_ENV, ORIGINS_ENV, OriginGuardMiddleware

__all__ = ["app", "checked_params", "proxy_refusal", "session_refusal"]

API = settings.MONAI_LABEL_API_STR
DICOMWEB_WORDS = frozenset({"studies", "series", "instances", "metadata", "frames", "rendered", "thumbnail",
                            "bulk", "bulkdata"})
_UID = re.compile(r"[0-9a-fA-F][0-9a-fA-F.,]*")  # UIDs, frame lists (1,2) and bulk data tags (7fe00010)


def checked_params(params: str, image: str, model: str) -> dict[str, Any]:
    """The form ``params`` as a JSON object naming no other image, model or session than the request's.

    Args:
        params: the form field, JSON text.
        image: the query's image id.
        model: the model named in the path.

    Returns:
        The parsed object.

    Raises:
        DataError: ``params`` is no JSON object, or re-routes the request (one message per key, whatever
            its value: no answer tells whether a path exists).
        json.JSONDecodeError: ``params`` is not JSON.
    """
    value = json.loads(params or "{}")
    if not isinstance(value, dict):
        raise DataError("params", "must be a JSON object")
    for key, own in (("image", image), ("model", model), ("session", None)):
        if key in value and value[key] != own:
            raise DataError("params", f"{key!r} cannot be set in params, only by the request itself "
                                      "(image=ID in the query, the model in the path, session_id)")
    if value.get("save_label") or "label_tag" in value:  # an inference never overwrites annotators' labels
        raise DataError("params", "save_label / label_tag: an inference does not store labels; save with "
                                  "PUT /datastore/label")
    return value


_SESSION_ID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def session_refusal(method: str, path: str, query: str) -> tuple[int, str] | None:
    """``(status, reason)`` refusing a bad session id, an archive to unpack or ``run_sync``; else ``None``.

    MONAI Label joins a ``session_id`` onto its session folder as given (an absolute one replaces
    it, and a session whose image is missing is removed with ``rmtree``), and unpacks
    ``uncompress=true`` uploads with ``shutil.unpack_archive``, which writes ``../`` members and
    links anywhere. Its own session ids are UUIDs; neither Slicer nor OHIF uploads archives.
    """
    fields = parse_qs(query, keep_blank_values=True)
    ids = fields.get("session_id", [])
    if path.startswith(f"{API}/session/") and path.rstrip("/") != f"{API}/session":
        ids = [*ids, path[len(f"{API}/session/"):].strip("/")]
    if any(i and not _SESSION_ID.fullmatch(i) for i in ids):
        return 400, "session_id: not a session id (MONAI Label's are UUIDs)"
    unpack = any(v.lower() in ("1", "true", "yes") for v in fields.get("uncompress", []))
    if path.rstrip("/") == f"{API}/session" and unpack:
        return 400, "uncompress: archives are not unpacked on this server; upload the image itself"
    if path.startswith(f"{API}/train/") and any(v.lower() in ("1", "true", "yes") for v in fields.get("run_sync", [])):
        # a training inside the server process: on its event loop, and the train task's parent-death
        # signal would then bind the server itself to the shell that started it
        return 400, "run_sync: trainings run in their own process; poll GET /train/ for their status"
    return None


def _server_keys_refused(run: Any) -> Any:
    """``AsyncTask.run`` refusing request bodies that set what only the server sets (``bundle_path``).

    MONAI Label adds a request's ``bundle_path`` to the ``PYTHONPATH`` of the train, scoring or
    batch subprocess it starts: a caller naming an uploaded folder there would run its code.
    """
    def checked(method: str, request: Any = None, params: Any = None, force_sync: bool = False,
                enqueue: bool = False) -> Any:
        for doc in (request, params):
            if isinstance(doc, dict) and "bundle_path" in doc:
                raise HTTPException(status_code=400, detail="bundle_path: set by the server, not by a request")
        return run(method, request=request, params=params, force_sync=force_sync, enqueue=enqueue)

    return staticmethod(checked)


AsyncTask.run = _server_keys_refused(AsyncTask.run)


def infer_in_worker_thread(background_tasks: BackgroundTasks, model: str, image: str = "",  # noqa: B008 - FastAPI
                           session_id: str = "", params: str = Form("{}"), file: UploadFile = File(None),  # noqa: B008
                           label: UploadFile = File(None),  # noqa: B008
                           output: Optional[ResultType] = None,  # noqa: UP045 - FastAPI reads the annotation
                           user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))):  # noqa: B008
    """MONAI Label's inference endpoint, run in a worker thread; ``image`` must be a plain id."""
    plain_name("image id", image)
    checked = checked_params(params, image, model)  # 400 before any work (bad_request)
    if output == ResultType.dicom_seg:  # medimg writes the SEG (MONAI Label's converter: dcmqi, NIfTI paths only)
        params, output = json.dumps({**checked, "result_extension": ".dcm"}), ResultType.image
    # the files MONAI Label copies this request's uploads to: the only paths MedimgApp.infer reads as is
    files = REQUEST_FILES.set(lambda: {str(t.args[0]) for t in background_tasks.tasks if t.args})
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
    finally:
        REQUEST_FILES.reset(files)


app.router.add_api_route(f"{settings.MONAI_LABEL_API_STR}/infer/{{model}}", infer_in_worker_thread, methods=["POST"],
                         summary=f"{RBAC_USER}Run Inference for supported model", tags=["Infer"])
app.router.routes.insert(0, app.router.routes.pop())  # ahead of MONAI Label's blocking route


def _chunks(handle: IO[bytes]) -> Iterator[bytes]:
    with handle:
        while chunk := handle.read(1 << 20):
            yield chunk


def download_dataset(limit_cases: Optional[int] = None,  # noqa: UP045 - FastAPI reads the annotation
                     user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR))):  # noqa: B008
    """The dataset as MONAI Label's ZIP archive, sent from a file deleted once opened (none is left behind)."""
    try:
        path = app_instance().datastore().get_dataset_archive(limit_cases)
    except AssertionError as exc:  # MONAI Label's "nothing to include"
        raise HTTPException(status_code=404, detail=str(exc)) from exc
    handle = open(path, "rb")  # noqa: SIM115 - closed by _chunks once sent
    os.unlink(path)  # the open file keeps the data until the answer is sent (or the client goes)
    return StreamingResponse(_chunks(handle), media_type="application/zip",
                             headers={"Content-Length": str(os.fstat(handle.fileno()).st_size),
                                      "Content-Disposition": 'attachment; filename="dataset.zip"'})


app.router.add_api_route(f"{API}/datastore/dataset", download_dataset, methods=["GET"],
                         summary=f"{RBAC_ANNOTATOR}Download full dataset as ZIP archive", tags=["Datastore"])
app.router.routes.insert(0, app.router.routes.pop())  # ahead of MONAI Label's route, which leaves the file


def proxy_refusal(method: str, path: str, raw_path: bytes = b"") -> tuple[int, str] | None:
    """``(status, reason)`` refusing a request to MONAI Label's DICOM proxy that is no DICOMweb read; else ``None``.

    Args:
        method: the HTTP method.
        path: the request's path, percent-decoded (as routes see it).
        raw_path: the path as sent, without the query.
    """
    if not path.startswith(f"{API}/proxy/"):
        return None
    if "%" in raw_path.decode("latin-1") or "\\" in path:
        return 400, "proxy: a percent-escape or backslash in the path is refused (DICOMweb paths need none)"
    if method.upper() not in ("GET", "OPTIONS"):  # OPTIONS: CORS pre-flights
        return 403, f"proxy: {method.upper()} refused; the proxy only reads (GET) DICOMweb resources"
    parts = path[len(f"{API}/proxy/"):].split("/")
    resource = parts[2:] if parts[1:2] and parts[1] in ("wado", "qido", "stow") else parts[1:]  # MONAI Label's routes
    if (parts[0] != "dicom" or not resource or resource[0] not in ("studies", "series", "instances")
            or not all(p in DICOMWEB_WORDS or _UID.fullmatch(p) for p in resource)):
        return 400, (f"proxy: {path!r} is not a DICOMweb read (studies, series or instances, their UIDs, "
                     "metadata, frames, rendered, thumbnail, bulk data)")
    return None


class DicomProxyGuardMiddleware:
    """Pure ASGI middleware: MONAI Label's DICOM proxy answers DICOMweb reads only (:func:`proxy_refusal`)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        """Refuse (one line) what :func:`proxy_refusal` refuses; pass everything else on."""
        if scope["type"] == "http":
            raw = (scope.get("raw_path") or b"").split(b"?", 1)[0]
            refusal = (proxy_refusal(scope.get("method", "GET"), scope.get("path", ""), raw)
                       or session_refusal(scope.get("method", "GET"), scope.get("path", ""),
                                          (scope.get("query_string") or b"").decode("latin-1")))
            if refusal is not None:
                await JSONResponse({"detail": refusal[1]}, status_code=refusal[0])(scope, receive, send)
                return
        await self.app(scope, receive, send)

if os.environ.get(ORIGINS_ENV):
    for middleware in app.user_middleware:
        if middleware.cls is CORSMiddleware:
            middleware.kwargs["allow_origins"] = json.loads(os.environ[ORIGINS_ENV])


async def bad_request(request: Request, exc: Exception) -> JSONResponse:
    """400 with the reason: an unparsable body, ``params`` not JSON, a path outside the studies, a bad upload.

    An upload under another image's id answers 409 (``http_status`` of the error).
    """
    if isinstance(exc, RequestValidationError):
        detail: object = exc.errors()
    elif isinstance(exc, json.JSONDecodeError):
        detail = f"params: not valid JSON ({exc.msg} at character {exc.pos})"
    else:
        detail = str(exc)
    return JSONResponse({"detail": detail}, status_code=int(getattr(exc, "http_status", 400)))


for error in (RequestValidationError, json.JSONDecodeError, DataError):  # DataError: paths, uploads
    app.add_exception_handler(error, bad_request)
app.add_middleware(DicomProxyGuardMiddleware)
app.add_middleware(BodyLimitMiddleware,
                   max_bytes=int(float(os.environ.get(UPLOAD_ENV, DEFAULT_MAX_UPLOAD_MB)) * 2**20))
if os.environ.get(DIGEST_ENV):  # nothing is reached without the token
    app.add_middleware(BearerTokenMiddleware, token_sha256=os.environ[DIGEST_ENV])
# outermost, ahead of the token: a foreign Host or a cross-site request is refused whatever the credentials
app.add_middleware(OriginGuardMiddleware, allowed_hosts=json.loads(os.environ.get(HOSTS_ENV) or "[]"),
                   allowed_origins=json.loads(os.environ.get(ORIGINS_ENV) or "[]"), api_prefix=API)
