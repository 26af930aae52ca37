"""Studies in a DICOMweb PACS (Orthanc and the like): what OHIF's MONAI Label mode and 3D Slicer use.

``python -m medimg.label serve --studies http://HOST:PORT/dicom-web`` serves a PACS.
:class:`PacsDatastore` is MONAI Label's ``DICOMWebDatastore`` (QIDO-RS to list, WADO-RS to fetch,
STOW-RS to store; its local cache) with medimg's DICOM handling in the places where MONAI Label
0.8.5 would download tools from the internet (dcmqi), convert through other readers, or lose data:

- **Listing** asks QIDO-RS page by page (:func:`medimg.label.pacs.search_series`): a PACS answers
  at most its own limit per query. The image list is every series but segmentations and other
  non-image objects; ids are SeriesInstanceUIDs, whole (:mod:`medimg.label.datastore`).
- **Images** stay DICOM series folders in the cache, read by :func:`medimg.io.image.read_image` in
  their exact geometry. A series is fetched whole into a hidden folder and renamed into place, and
  fetched again when its folder holds another number of instances than the PACS reports
  (:func:`medimg.label.pacs.fetch_series`): an interrupted download is never read as the series.
  The hidden folders a killed process left are removed when the datastore starts.
- **Saving a final label** checks everything first: the series is in the cache's index, the upload
  reads (a NIfTI / NRRD with the series' shape and affine, a SEG, or OHIF's ``label.bin``: the raw
  voxels, column fastest) and lies on the series' grid, and the DICOM SEG is written
  (:func:`medimg.io.dicomseg.write_dicom_seg`, one frame per labelled source slice, each segment
  keeping its label value). Only then is it stored in the PACS (STOW-RS), so a refused save stores
  nothing. Its ``Manufacturer`` is ``medimg`` and its ``ContentLabel`` ``MEDIMG_FINAL``
  (:data:`medimg.label.pacs.FINAL_MARK`): this server's final labels. The final labels stored
  before for that series alone are then deleted (:func:`medimg.label.pacs.delete_series`): the
  PACS keeps one final label per series, and a retried save does not pile up SEGs (a PACS that
  cannot delete keeps them; the newest is read). **SEGs other tools or people stored** (3D Slicer,
  a radiotherapy contour, a model's ``AUTOMATIC`` answer) are never deleted or replaced; nor are
  the SEGs a medimg server stored before it marked its final labels (``ContentLabel`` ``MEDIMG``).
- **Provenance**: a label drawn by an annotator is ``MANUAL`` (no algorithm). A client that saves
  an edit of a model's answer says so with ``"model": "<model name>"`` in the PUT ``params``
  (optionally ``"model_version"``): the SEG is then ``SEMIAUTOMATIC``, naming that model (its
  bundle name and version when this server serves it). A model's own answer (``/infer`` with
  ``result_extension`` ``.dcm``) is ``AUTOMATIC`` (:mod:`medimg.label.results`).
- **An empty label clears**: saving a final label with no voxel set deletes this server's final
  labels of that series from the PACS, and the cached label; nothing is stored. Other SEGs of the
  series stay (training then reads them). A PACS that cannot delete answers 400 with the SEG to
  remove there, and nothing changes.
- **Reading labels back** for training (``datalist()``, as MONAI Label's train task calls it) takes,
  for each image series, its newest final label from this server (any medimg server on the PACS),
  else the newest SEG referencing it from anywhere else, reads it with highdicom (or by frame
  position, :func:`~medimg.io.dicomseg.seg_to_labels`) onto the series' grid, and caches it as
  ``labels/final/<series>.nii.gz``; a cached label whose SEG is gone from the PACS is dropped.
  Label values: a medimg SEG holds each segment's value. Another tool's segments are mapped by
  name: to the labels of the segmentation bundles this server serves (:func:`~medimg.label.
  uploads.served_labels`), refusing a segment none of them names; with no bundle served, to the
  names medimg's SEGs in the PACS give their values, when every segment is among them; else by
  segment number, with a warning. A labelled series that cannot be read (a Siemens mosaic, a SEG of unknown segments, a
  fetch that fails) is skipped with a warning naming it, and the number skipped is logged: one
  series never stops every training.

The request sequence follows OHIF's MONAI Label extension (``MonaiLabelClient.js``): ``GET /info/``,
``POST /infer/{model}?image=<SeriesInstanceUID>&output=all`` (form ``params``: ``foreground`` /
``background``, ``result_extension``), ``POST /activelearning/{strategy}``, ``PUT
/datastore/label?image=<SeriesInstanceUID>`` (form ``params`` + ``label`` = ``label.bin``) and
``POST /train/``.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from monailabel.datastore.dicom import DICOMwebClientX, DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.datastore import DefaultLabelTag
from pydicom.dataset import Dataset

from medimg.errors import DataError
from medimg.io.dicomseg import MANUFACTURER, label_key, label_map, raw_labels, seg_to_labels
from medimg.io.image import read_image, write_like
from medimg.label.datastore import SeriesDatastore, plain_name
from medimg.label.pacs import (
    FINAL_MARK,
    SegSeries,
    delete_series,
    fetch_series,
    remove_stale,
    search_series,
    seg_series,
)
from medimg.label.uploads import read_upload, served_labels, unambiguous, upload_removed_if_refused

log = logging.getLogger(__name__)
NOT_IMAGES = {"SEG", "RTSTRUCT", "SR", "PR", "KO", "RTPLAN", "RTDOSE"}
LISTING_TTL_S = float(os.environ.get("MEDIMG_PACS_LISTING_TTL_S", "30"))  # the PACS listing is reused this long
FINAL = DefaultLabelTag.FINAL


def served_model(model: str) -> tuple[str, str] | None:
    """``(algorithm name, version)`` of a model this process's MONAI Label app serves, if any."""
    from monailabel.interfaces.utils import app as app_module

    from medimg.bundle.loader import segment_names

    for app in list(getattr(app_module, "apps", {}).values()):
        bundle = getattr(getattr(app, "_infers", {}).get(model), "bundle", None)
        if bundle is not None:
            return segment_names(bundle, False)[1:]
    return None


def label_provenance(params: dict[str, Any]) -> tuple[str, str, str]:
    """``(SegmentAlgorithmType, algorithm name, version)`` of a saved label (module docstring)."""
    from importlib import metadata

    model = params.get("model")
    if not model:
        try:
            version = metadata.version("medimg")
        except metadata.PackageNotFoundError:  # a checkout that is not installed
            version = "unknown"
        return "MANUAL", "medimg label", version
    name, version = served_model(str(model)) or (str(model), "unknown")
    return "SEMIAUTOMATIC", name, str(params.get("model_version") or version)


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
        self._segs_seen: dict[str, SegSeries] = {}
        self._listing: tuple[float, list[str], list[SegSeries]] | None = None
        self._listing_lock = threading.Lock()
        super().__init__(client=client, search_filter={}, cache_path=cache_path, fetch_by_frame=False,
                         convert_to_nifti=False)
        removed = [name for folder in (self._datastore.image_path(), self._datastore.label_path(FINAL))
                   for name in remove_stale(Path(folder))]  # series and SEGs a killed process was fetching
        if removed:
            log.warning("removed %d interrupted download(s) from the cache: %s", len(removed), ", ".join(removed))

    def _to_id(self, file: str) -> tuple[str, str]:
        return SeriesDatastore._to_id(self, file)  # not MONAI Label's DICOMweb rule (str.replace anywhere)

    def _snapshot(self, fresh: bool = False) -> tuple[list[str], list[SegSeries]]:
        """The PACS's image series and SEG series, listed at most once per :data:`LISTING_TTL_S`.

        MONAI Label asks for the datastore's status on every ``/info/`` and every inference, and
        each status lists the PACS twice; on a hospital PACS that is thousands of QIDO pages per
        click. One listing serves every caller until it expires or this server stores or clears
        a SEG (:meth:`invalidate_listing`); concurrent callers wait for the one being made.
        ``fresh``: list again now (training reads what is labelled at its start).
        """
        with self._listing_lock:
            if fresh or self._listing is None or time.monotonic() - self._listing[0] > LISTING_TTL_S:
                images = []
                for ds in search_series(self._client):
                    d = Dataset.from_json(ds)
                    if str(d.get("Modality", "")).upper() not in NOT_IMAGES:
                        images.append(str(d.SeriesInstanceUID))
                self._listing = (time.monotonic(), images, seg_series(self._client, self._segs_seen))
            return list(self._listing[1]), list(self._listing[2])

    def invalidate_listing(self) -> None:
        """Forget the PACS listing: the next question lists the PACS again."""
        with self._listing_lock:
            self._listing = None

    def list_images(self) -> list[str]:
        """Every series in the PACS that is an image (not a SEG, structure set, report...), as last listed."""
        return self._snapshot()[0]

    def _latest_segs(self, images: set[str], fresh: bool = False) -> dict[str, SegSeries]:
        """For each of ``images`` that a SEG references: its newest final label from medimg, else its newest SEG."""
        latest: dict[str, SegSeries] = {}
        for seg in self._snapshot(fresh)[1]:
            for ref in seg.references & images:
                if ref not in latest or (seg.final, seg.made, seg.uid) > (latest[ref].final, latest[ref].made,
                                                                           latest[ref].uid):
                    latest[ref] = seg
        return latest

    def _segment_values(self, seg: SegSeries, segs: list[SegSeries]) -> dict[str, int] | None:
        """How to map another tool's segments to label values (module docstring); ``None``: by number."""
        if seg.maker == MANUFACTURER or not seg.segments:
            return None  # medimg's SEGs hold their values
        served = served_labels()
        if served:
            return served
        named = unambiguous([(name, value) for s in segs for name, value in s.segments if value is not None])
        known = {label_key(k) for k in named}
        unknown = [name for name, _ in seg.segments if label_key(name) not in known]
        if not unknown:
            return named
        log.warning("SEG %s (%s) read by segment number: no label value is known for its segment(s) %s",
                    seg.uid, seg.maker or "unknown maker", ", ".join(map(repr, unknown)))
        return None

    def get_labeled_images(self, label_tag: str | None = None, labels: list[str] | None = None,
                           images: set[str] | None = None) -> list[str]:
        """Image series (of ``images``, default all) that a SEG in the PACS references, each once, asked afresh."""
        return sorted(self._latest_segs(set(self.list_images()) if images is None else images))

    def get_unlabeled_images(self, label_tag: str | None = None, labels: list[str] | None = None) -> list[str]:
        """Image series no SEG references yet."""
        images = set(self.list_images())
        return sorted(images - set(self.get_labeled_images(images=images)))

    def get_image_info(self, image_id: str) -> dict[str, Any]:
        """The cached series' info; a series not fetched yet is still named ``<id>.nrrd`` (3D Slicer's download)."""
        return SeriesDatastore.get_image_info(self, image_id) or {"name": f"{image_id}.nrrd"}

    def get_image_uri(self, image_id: str) -> str:
        """The series as a complete DICOM folder in the cache (fetched when missing or partial), registered."""
        folder = Path(self._datastore.image_path()) / plain_name("image id", image_id)
        fetch_series(self._client, image_id, folder)
        if image_id not in self._datastore.objects:
            self.refresh()
        if image_id not in self._datastore.objects:
            raise DataError(image_id, "the fetched series is not in the cache's index")
        return self._inside(os.path.realpath(folder))

    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        """A final label: the SEG ``label_id`` from the PACS as NIfTI on ``image_id``'s grid (cached)."""
        if label_tag != FINAL or not image_id:
            return SeriesDatastore.get_label_uri(self, label_id, label_tag)
        plain_name("label id", label_id)
        cached = self._datastore.label(plain_name("image id", image_id), FINAL)
        out = SeriesDatastore.get_label_uri(self, image_id, FINAL)
        if cached and out and os.path.isfile(out) and cached.info.get("SeriesInstanceUID") == label_id:
            return out
        seg_dir = fetch_series(self._client, label_id, Path(self._datastore.label_path(FINAL)) / label_id)
        image_dir = self.get_image_uri(image_id)
        with tempfile.TemporaryDirectory() as tmp:  # written apart, then copied in (MONAI Label copies)
            seg = self._segs_seen.get(label_id)
            values = self._segment_values(seg, list(self._segs_seen.values())) if seg else None
            labels = seg_to_labels(next(seg_dir.glob("*.dcm")), image_dir, values)
            nifti = write_like(labels, read_image(image_dir), Path(tmp) / f"{image_id}.nii.gz")
            self._store_label(image_id, str(nifti), FINAL, {"SeriesInstanceUID": label_id})
        return SeriesDatastore.get_label_uri(self, image_id, FINAL)

    def _download_labeled_data(self) -> None:
        """Cache the SEG training reads of each labelled series; drop cached labels with none; skip what fails."""
        images, _ = self._snapshot(fresh=True)  # what is labelled now, not half a minute ago
        latest = self._latest_segs(set(images))
        gone = [i for i in LocalDatastore.get_labeled_images(self) if i not in latest]
        skipped = []
        for image_id, seg in sorted(latest.items()):
            try:
                self.get_label_uri(seg.uid, FINAL, image_id)
            except Exception as exc:  # noqa: BLE001 - one series never stops every training
                log.warning("training skips series %s: its SEG %s does not read (%s)", image_id, seg.uid, exc)
                skipped.append(image_id)
                cached = self._datastore.label(image_id, FINAL)
                if cached and cached.info.get("SeriesInstanceUID") != seg.uid:
                    gone.append(image_id)  # an older SEG's label: not what the PACS holds now
        for image_id in gone:
            LocalDatastore.remove_label(self, image_id, FINAL)
        if gone:
            self.refresh()
        if skipped:
            log.warning("skipped %d of %d labelled series for training", len(skipped), len(latest))

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any],
                   label_id: str = "") -> str:
        """Keep the label locally; a final one also goes to the PACS as a DICOM SEG referencing the series.

        A refused upload's temporary copy is deleted (:func:`~medimg.label.uploads.upload_removed_if_refused`).
        """
        with upload_removed_if_refused(label_filename):
            if label_tag != FINAL:
                return SeriesDatastore.save_label(self, image_id, label_filename, label_tag, label_info)
            return self._save_final(image_id, label_filename, label_info)

    def _read_upload(self, image_id: str, label_filename: str, image_dir: str) -> tuple[np.ndarray, Any]:
        """The upload as a label map on the series' grid, and the series as read."""
        from medimg.io.dicom import is_dicom_file

        image = read_image(image_dir)
        if is_dicom_file(Path(label_filename)):
            return seg_to_labels(label_filename, image_dir, served_labels() or None), image
        if label_filename.endswith(".bin"):  # OHIF: the label map's raw voxels, column fastest
            return raw_labels(label_filename, image.array.shape), image
        upload = read_upload(label_filename, f"label upload for {image_id!r}")
        if upload.array.shape != image.array.shape or not np.allclose(upload.affine, image.affine, atol=1e-3):
            raise DataError(Path(label_filename).name, f"does not lie on the grid of series {image_id}")
        return label_map(upload.array, f"label upload for {image_id!r}"), image

    def _save_final(self, image_id: str, label_filename: str, label_info: dict[str, Any]) -> str:
        from medimg.io.dicomseg import write_dicom_seg

        self._inside(self._datastore.label_path(FINAL))
        image_dir = self.get_image_uri(image_id)  # fetched and registered, or DataError
        labels, image = self._read_upload(image_id, label_filename, image_dir)
        if not labels.any():
            return self._clear_final(image_id)
        names = {int(v): f"label {int(v)}" for v in np.unique(labels) if v}
        for item in label_info.get("label_info") or []:
            if isinstance(item, dict) and "idx" in item and "name" in item and int(item["idx"]) in names:
                names[int(item["idx"])] = str(item["name"])
        kind, algorithm, version = label_provenance(label_info)
        older = self._own_finals(image_id)
        with tempfile.TemporaryDirectory() as tmp:
            seg = write_dicom_seg(labels, image_dir, Path(tmp) / "seg.dcm", names, algorithm, version, kind,
                                  content_label=FINAL_MARK)
            nifti = write_like(labels, image, Path(tmp) / f"{image_id}.nii.gz")
            series_uid = self._store(seg)  # everything checked: now the PACS
            self.invalidate_listing()
            for old in older:
                try:
                    delete_series(self._client, old.study, old.uid)
                    self._segs_seen.pop(old.uid, None)
                except Exception as exc:  # noqa: BLE001 - the new SEG is stored; the old one is superseded
                    log.warning("kept the superseded SEG %s of %s: %s", old.uid, image_id, exc)
            info = {**label_info, "SeriesInstanceUID": series_uid, "SegmentAlgorithmType": kind}
            return self._store_label(image_id, str(nifti), FINAL, info)

    def _store(self, seg_file: Path) -> str:
        """STOW-RS one SEG; its SeriesInstanceUID. :class:`DataError` when the PACS refuses it."""
        import pydicom

        ds = pydicom.dcmread(seg_file)
        answer = self._client.store_instances([ds])
        if answer is not None and answer.get("FailedSOPSequence"):
            raise DataError(str(ds.SeriesInstanceUID), f"the PACS refused the SEG ({answer.FailedSOPSequence[0]})")
        return str(ds.SeriesInstanceUID)

    def _own_finals(self, image_id: str) -> list[SegSeries]:
        """The final labels medimg stored in the PACS for this series alone: what a save replaces."""
        return [s for s in seg_series(self._client, self._segs_seen) if s.final and s.references == {image_id}]

    def _clear_final(self, image_id: str) -> str:
        """An empty final label: delete this server's final labels of the series, and the cached label."""
        for seg in self._own_finals(image_id):
            delete_series(self._client, seg.study, seg.uid)
            self._segs_seen.pop(seg.uid, None)
            self.invalidate_listing()
        if self._datastore.label(image_id, FINAL):
            LocalDatastore.remove_label(self, image_id, FINAL)
            self.refresh()
        return image_id
