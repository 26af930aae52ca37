"""A local MONAI Label datastore that also serves DICOM series folders as images.

MONAI Label's ``LocalDatastore`` lists image *files* by extension; DICOM series reach it only
through a DICOMweb server. Here a sub-folder of the studies folder that directly holds DICOM files
is one image (a series): its id is the folder name and ``request["image"]`` is the folder, which
MONAI Label itself treats as DICOM and medimg reads with its own series reader.
"""

from __future__ import annotations

import os
from pathlib import Path

from monailabel.datastore.local import LocalDatastore

from medimg.io.dicom import folder_has_dicom


class SeriesDatastore(LocalDatastore):
    """``LocalDatastore`` plus DICOM series folders (see the module docstring)."""

    def _list_files(self, path, patterns):  # noqa: ANN001, ANN202 - MONAI Label's signature
        files = super()._list_files(path, patterns)
        if os.path.realpath(path) != os.path.realpath(self._datastore.image_path()):
            return files
        labels = Path(self._datastore.label_path(None)).resolve()
        for entry in sorted(Path(path).iterdir()):
            if (entry.is_dir() and not entry.name.startswith(".") and entry.resolve() != labels
                    and folder_has_dicom(entry)):
                files[entry.name] = entry.name
        return files
