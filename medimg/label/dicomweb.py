"""Studies in a DICOMweb PACS (Orthanc and the like): what OHIF's MONAI Label mode and 3D Slicer use.

``python -m medimg.label serve --studies http://HOST:PORT/dicom-web`` serves a PACS.
:class:`PacsDatastore` is MONAI Label's ``DICOMWebDatastore`` (QIDO-RS to list, WADO-RS to fetch,
STOW-RS to store; its local cache) with medimg's DICOM handling in the three places where MONAI
Label 0.8.5 would download tools from the internet (dcmqi) or convert through other readers:

- **Images** stay DICOM series folders, read by :func:`medimg.io.image.read_image` in their exact
  geometry; predictions come back on that grid (or as DICOM SEG, :mod:`medimg.label.results`).
- **Saving a final label** writes a DICOM SEG with highdicom (:func:`medimg.io.dicomseg.write_dicom_seg`),
  one frame per source slice, referencing the series, and stores it in the PACS (STOW-RS). A label
  upload must lie on the series' grid: a NIfTI / NRRD with the same shape and affine, a SEG, or
  OHIF's ``label.bin`` (the raw voxels, column fastest).
- **Reading a label back** for training reads the SEG from the PACS with highdicom onto the
  series' grid, by the source instances its frames reference.

The image list is every series but segmentations and other non-image objects. The request
sequence follows OHIF's MONAI Label extension (``MonaiLabelClient.js``): ``GET /info/``,
``POST /infer/{model}?image=<SeriesInstanceUID>&output=all`` (form ``params``: ``foreground`` /
``background``, ``result_extension``), ``POST /activelearning/{strategy}``, ``PUT
/datastore/label?image=<SeriesInstanceUID>`` (form ``params`` + ``label`` = ``label.bin``) and
``POST /train/``.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from monailabel.datastore.dicom import DICOMwebClientX, DICOMWebDatastore
from monailabel.datastore.utils.dicom import dicom_web_upload_dcm
from monailabel.interfaces.datastore import DefaultLabelTag
from pydicom.dataset import Dataset

from medimg.errors import DataError
from medimg.io.dicomseg import raw_labels, seg_to_labels
from medimg.io.image import read_image, write_like
from medimg.label.datastore import SeriesDatastore, plain_name, upload_removed_if_refused

log = logging.getLogger(__name__)
NOT_IMAGES = {"SEG", "RTSTRUCT", "SR", "PR", "KO", "RTPLAN", "RTDOSE"}


class PacsDatastore(DICOMWebDatastore, SeriesDatastore):
    """MONAI Label's DICOMweb datastore with medimg's series reading and highdicom SEG (module docstring).

    Its local cache is a :class:`~medimg.label.datastore.SeriesDatastore`: fetched series folders are
    its images, with the same id and path checks as a studies folder.

    Args:
        url: the DICOMweb root, e.g. ``http://127.0.0.1:8042/dicom-web``.
        cache_path: where fetched series and labels are kept (default: MONAI Label's cache folder).
        session: a ``requests`` session (credentials) for the PACS.
    """

    def __init__(self, url: str, cache_path: str | None = None, session: Any = None) -> None:
        from monailabel.config import settings

        client = DICOMwebClientX(url=url.rstrip("/"), session=session,
                                 qido_url_prefix=settings.MONAI_LABEL_QIDO_PREFIX,
                                 wado_url_prefix=settings.MONAI_LABEL_WADO_PREFIX,
                                 stow_url_prefix=settings.MONAI_LABEL_STOW_PREFIX)
        super().__init__(client=client, search_filter={}, cache_path=cache_path, fetch_by_frame=False,
                         convert_to_nifti=False)

    def list_images(self) -> list[str]:
        """Every series in the PACS that is an image (not a SEG, structure set, report...)."""
        series = []
        for ds in self._client.search_for_series():
            d = Dataset.from_json(ds)
            if str(d.get("Modality", "")).upper() not in NOT_IMAGES:
                series.append(str(d.SeriesInstanceUID))
        return series

    def get_labeled_images(self, label_tag: str | None = None, labels: list[str] | None = None,
                           images: set[str] | None = None) -> list[str]:
        """Image series (of ``images``, default all) that a SEG in the PACS references, each once, asked afresh."""
        images, found = set(self.list_images()) if images is None else images, set()
        for ds in self._client.search_for_series(search_filters={"Modality": "SEG"}):
            d = Dataset.from_json(ds)
            meta = Dataset.from_json(self._client.retrieve_series_metadata(str(d.StudyInstanceUID),
                                                                           str(d.SeriesInstanceUID))[0])
            for ref in meta.get("ReferencedSeriesSequence", []):
                if str(ref.SeriesInstanceUID) in images:
                    found.add(str(ref.SeriesInstanceUID))
        return sorted(found)

    def get_unlabeled_images(self, label_tag: str | None = None, labels: list[str] | None = None) -> list[str]:
        """Image series no SEG references yet."""
        images = set(self.list_images())
        return sorted(images - set(self.get_labeled_images(images=images)))

    def get_image_uri(self, image_id: str) -> str:
        """The series, fetched once into the cache, as a DICOM folder (registered as a cached image)."""
        uri = DICOMWebDatastore.get_image_uri(self, plain_name("image id", image_id))
        if image_id not in self._datastore.objects:
            self.refresh()
        return uri

    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        """A final label: its SEG fetched from the PACS and written as NIfTI on the image's grid."""
        if label_tag != DefaultLabelTag.FINAL or not image_id:
            return SeriesDatastore.get_label_uri(self, label_id, label_tag)
        folder = self._datastore.label_path(label_tag)
        seg_dir = os.path.realpath(os.path.join(folder, plain_name("label id", label_id)))
        out = os.path.realpath(os.path.join(folder, f"{plain_name('image id', image_id)}.nii.gz"))
        if not os.path.exists(out):
            if not os.path.isdir(seg_dir) or not os.listdir(seg_dir):
                from monailabel.datastore.utils.dicom import dicom_web_download_series

                dicom_web_download_series(None, label_id, seg_dir, self._client, False)
            image_dir = self.get_image_uri(image_id)
            seg_file = next(Path(seg_dir).glob("*.dcm"))
            write_like(seg_to_labels(seg_file, image_dir), read_image(image_dir), out)
            SeriesDatastore.save_label(self, image_id, out, label_tag, self._dicom_info(label_id))
        return out

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any],
                   label_id: str = "") -> str:
        """Keep the label locally; a final one also goes to the PACS as a DICOM SEG referencing the series.

        A refused upload's temporary copy is deleted (:func:`~medimg.label.datastore.upload_removed_if_refused`).
        """
        with upload_removed_if_refused(label_filename):
            return self._save_label(image_id, label_filename, label_tag, label_info)

    def _save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        from medimg.io.dicom import is_dicom_file
        from medimg.io.dicomseg import write_dicom_seg

        image_dir = self.get_image_uri(image_id)
        if label_tag == DefaultLabelTag.FINAL:
            image = read_image(image_dir)
            if is_dicom_file(Path(label_filename)):
                labels = seg_to_labels(label_filename, image_dir)
            elif label_filename.endswith(".bin"):  # OHIF: the label map's raw voxels, column fastest
                labels = raw_labels(label_filename, image.array.shape)
            else:
                upload = read_image(label_filename, spatial_dims=None)
                if upload.array.shape != image.array.shape or not np.allclose(upload.affine, image.affine, atol=1e-3):
                    raise DataError(Path(label_filename).name, f"does not lie on the grid of series {image_id}")
                labels = np.rint(upload.array).astype(np.uint8)
            names = {int(v): f"label {int(v)}" for v in np.unique(labels) if v}
            for item in label_info.get("label_info") or []:
                if isinstance(item, dict) and "idx" in item and "name" in item and int(item["idx"]) in names:
                    names[int(item["idx"])] = str(item["name"])
            with tempfile.TemporaryDirectory() as tmp:
                seg = write_dicom_seg(labels, image_dir, Path(tmp) / "seg.dcm", names, algorithm="medimg annotator")
                series_uid = dicom_web_upload_dcm(str(seg), self._client)
                nifti = write_like(labels, image, Path(tmp) / f"{image_id}.nii.gz")
                return SeriesDatastore.save_label(self, image_id, str(nifti), label_tag,
                                                  {**label_info, "SeriesInstanceUID": series_uid})
        return SeriesDatastore.save_label(self, image_id, label_filename, label_tag, label_info)
