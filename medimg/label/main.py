"""The medimg MONAI Label app: every bundle in the models folder, served and trainable.

MONAI Label finds an app as a class in ``<app>/main.py`` whose *direct* base is
``MONAILabelApp``; :class:`MedimgApp` is that class (``python -m medimg.label serve`` writes an app
folder whose ``main.py`` imports it). Conf values (``--conf key value``, all strings):

- ``models``: the folder of medimg bundles (required); each sub-folder with
  ``configs/metadata.json`` is one model, named after the folder.
- ``runs``: where fine-tuning runs are kept (default: ``<app>/runs``).
- ``device``: ``cpu``, ``cuda`` or ``cuda:N`` (default: CUDA when available).
- ``embedding_cache_mb``: the bound of each interactive 2D model's slice-embedding cache, over
  all images, least recently used first (default 512).
- ``schema``: a local MONAI metadata schema for verifying fine-tuned bundles offline (default:
  ``MEDIMG_MONAI_SCHEMA``).

Inference reads a datastore image, an upload or a session's image, nothing else
(:meth:`MedimgApp.infer`): MONAI Label reads ``request["image"]`` as is whenever such a path
exists, a file named like the id in the server's working folder included.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Collection
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.train import TrainTask

from medimg.bundles import serving_order
from medimg.errors import DataError
from medimg.io.jsonfile import finite
from medimg.label.datastore import SeriesDatastore, plain_name
from medimg.label.infer import BundleInfer, infer_task
from medimg.label.train import TRAINABLE, BundleTrain
from medimg.predictors.embedding_cache import DEFAULT_CACHE_MB

log = logging.getLogger(__name__)

# the temporary files MONAI Label copied the current request's uploads to (set by medimg.label.asgi)
REQUEST_FILES: ContextVar[Callable[[], Collection[str]]] = ContextVar("medimg_label_request_files",
                                                                      default=frozenset)


def _inside(path: str, folder: str) -> bool:
    """Whether ``path`` resolves strictly inside ``folder`` (links followed)."""
    real, root = os.path.realpath(path), os.path.realpath(folder)
    return real.startswith(root + os.sep)


def find_bundles(models: Path) -> list[Path]:
    """The bundle folders directly inside ``models`` (hidden folders, such as publication leftovers, skipped).

    In serving order (:func:`medimg.bundles.serving_order`): the model whose card measured the best
    held-out 3D Dice first, so ``/info/`` lists it, and 3D Slicer selects it, before the others.
    """
    return serving_order([p for p in models.iterdir()
                          if p.is_dir() and not p.name.startswith(".") and (p / "configs" / "metadata.json").is_file()])


def pacs_session() -> Any:
    """A ``requests`` session with the PACS login MONAI Label's settings hold (``None``: no login).

    ``MONAI_LABEL_DICOMWEB_USERNAME`` and ``MONAI_LABEL_DICOMWEB_PASSWORD`` (HTTP basic), as MONAI
    Label's own DICOMweb datastore reads them; credentials written in the ``--studies`` URL work
    too (``requests`` takes them from the URL).
    """
    user, password = settings.MONAI_LABEL_DICOMWEB_USERNAME, settings.MONAI_LABEL_DICOMWEB_PASSWORD
    if not (user and password):
        return None
    from dicomweb_client.session_utils import create_session_from_user_pass

    return create_session_from_user_pass(user, password)


class MedimgApp(MONAILabelApp):
    """MONAI Label app serving medimg bundles (see the module docstring for its conf keys)."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        models = conf.get("models")
        if not models or not Path(models).is_dir():
            raise ValueError(f"--conf models DIR: {models!r} is not a folder of medimg bundles")
        self.models = Path(models).resolve()
        self.bundles = find_bundles(self.models)
        if not self.bundles:
            raise ValueError(f"{self.models}: no medimg bundle (a folder with configs/metadata.json) found")
        self.device = conf.get("device") or None
        self.cache_mb = float(conf.get("embedding_cache_mb") or DEFAULT_CACHE_MB)
        self.runs = Path(conf.get("runs") or Path(app_dir) / "runs")
        self.schema = conf.get("schema") or os.environ.get("MEDIMG_MONAI_SCHEMA")
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="medimg",
                         description="medimg bundles: automatic, interactive 2D/3D and classification models",
                         version="1")

    def init_datastore(self) -> Datastore:
        """A local datastore that also lists DICOM series folders as images."""
        if self.studies.startswith(("http://", "https://")):  # a PACS: DICOMweb, SEG through highdicom
            from medimg.label.dicomweb import PacsDatastore

            cache = settings.MONAI_LABEL_DICOMWEB_CACHE_PATH.strip() or None
            return PacsDatastore(self.studies, cache_path=cache, session=pacs_session())
        return SeriesDatastore(self.studies, extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
                               auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
                               read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY)

    def init_infers(self) -> dict[str, InferTask]:
        """One task per bundle; nothing is loaded until its first request."""
        return {b.name: infer_task(b, self.device, self.cache_mb) for b in self.bundles}

    def init_trainers(self) -> dict[str, TrainTask]:
        """A fine-tuning task per segmentation and promptable bundle."""
        trainers: dict[str, TrainTask] = {}
        for name, task in self._infers.items():
            if isinstance(task, BundleInfer) and task.meta.get("medimg_task", "segmentation") in TRAINABLE:
                trainers[name] = BundleTrain(task.bundle, self.runs, self.schema)
        return trainers

    def _request_file(self, image: str) -> bool:
        """Whether ``image`` is this request's upload, or an image of MONAI Label's sessions folder."""
        if image in REQUEST_FILES.get()():
            return os.path.isfile(image)
        sessions = self.sessions()
        return bool(sessions and sessions.store_path and _inside(image, sessions.store_path))

    def infer(self, request: dict[str, Any], datastore: Datastore | None = None) -> dict[str, Any]:
        """MONAI Label's inference, on a datastore image, this request's upload or a session's image only.

        An id is always the datastore's image, resolved inside its studies (or PACS cache) folder,
        never a file of that name in the working folder; ``save_label`` stores the result under it.

        Raises:
            DataError: (HTTP 400) the image is none of these; a path that exists and one that does not
                get the same answer.
        """
        store = datastore or self.datastore()
        image = request.get("image")
        if isinstance(image, str) and image and self._request_file(image):
            return super().infer(request, store)
        if not isinstance(image, str) or not image:
            raise DataError("image", "no image given (image=ID in the query, a file upload or a session_id)")
        uri = store.get_image_uri(plain_name("image id", image))
        if not uri or not _inside(uri, store._datastore.image_path()):
            raise DataError(repr(image), "no such image in the datastore")
        result = super().infer({**request, "image": uri}, store)  # MONAI Label does not save for a path
        if request.get("save_label", False) and result.get("file") and os.path.exists(result["file"]):
            result["label"] = store.save_label(image, result["file"],
                                               request.get("label_tag", DefaultLabelTag.ORIGINAL),
                                               {"model": request.get("model"), "params": result["params"]})
        return result

    def infer_wsi(self, request: dict[str, Any], datastore: Datastore | None = None) -> dict[str, Any]:
        """Refused: medimg serves no whole-slide models (MONAI Label reads any existing path it is given here).

        Raises:
            DataError: (HTTP 400) always.
        """
        raise DataError("/infer/wsi", "medimg serves no whole-slide (WSI) models; use POST /infer/{model}")

    def info(self) -> dict[str, Any]:
        """MONAI Label's app info plus the models folder, as strict JSON (a card's NaN metric is ``null``).

        ``/info/`` is the first call 3D Slicer and OHIF make: one bundle whose card holds a metric
        that could not be computed must not answer it with HTTP 500 for every model.
        """
        return finite({**super().info(), "models_dir": str(self.models)})
