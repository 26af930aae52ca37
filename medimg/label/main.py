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
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.train import TrainTask

from medimg.io.jsonfile import finite
from medimg.label.datastore import SeriesDatastore
from medimg.label.infer import BundleInfer, infer_task
from medimg.label.train import TRAINABLE, BundleTrain
from medimg.predictors.embedding_cache import DEFAULT_CACHE_MB

log = logging.getLogger(__name__)


def find_bundles(models: Path) -> list[Path]:
    """The bundle folders directly inside ``models`` (hidden folders, such as publication leftovers, skipped)."""
    return sorted(p for p in models.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and (p / "configs" / "metadata.json").is_file())


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
            return PacsDatastore(self.studies, cache_path=cache)
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

    def info(self) -> dict[str, Any]:
        """MONAI Label's app info plus the models folder, as strict JSON (a card's NaN metric is ``null``).

        ``/info/`` is the first call 3D Slicer and OHIF make: one bundle whose card holds a metric
        that could not be computed must not answer it with HTTP 500 for every model.
        """
        return finite({**super().info(), "models_dir": str(self.models)})
