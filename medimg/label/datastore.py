"""A local MONAI Label datastore that serves DICOM series folders as images and keeps every path inside.

MONAI Label's ``LocalDatastore`` lists image *files* by extension; DICOM series reach it only
through a DICOMweb server. Here a sub-folder of the studies folder that directly holds DICOM files
is one image (a series): its id is the folder name and ``request["image"]`` is the folder, which
MONAI Label itself treats as DICOM and medimg reads with its own series reader.

MONAI Label joins image ids and label tags from the request onto the studies folder as they come,
so ``image=../../x`` or ``tag=../..`` would read, write or delete outside it, and a symlink in the
studies folder would serve whatever it points at. Here an id or tag must be a plain name (no
separator, not ``.`` or ``..``, not absolute), every path handed out must resolve inside the
studies folder, and links that lead outside are never listed. A violation is a
:class:`StudiesPathError`, which the server answers with 400.

Ids: MONAI Label takes every short dotted tail of a name for an extension (``file_ext``), so
series named by their SeriesInstanceUID lose their last components: GE's ``….299`` and ``….303``
become one id, Siemens' ``….0.0.0`` another series' id, a Toshiba/Canon ``1.2.392.….89.7007`` the
id ``1``. Here an extension is only one of the datastore's configured patterns (``*.nii.gz``,
``*.nrrd``...) or a real image/label suffix (:data:`FILE_SUFFIXES`), never a numeric UID
component, and only at the end of the name; a series folder has none (its id is its name).
Entries an older datastore file recorded under a collapsed id are dropped and listed afresh.

A series folder is served to clients as ``<id>.nrrd`` (:mod:`medimg.label.routes`): its image
info names it so (3D Slicer's "Next sample" picks its reader by that name) and gives no ``path``
(Slicer would try to load the folder itself when it sees one).

A label upload is read whole before anything is stored: a corrupt, truncated or non-image file,
or one whose grid (shape, and affine to 1e-3 mm) differs from its image's, is refused (400) and the
label already stored for that image stays as it was. A ``.dcm`` label must parse as a DICOM SEG of
the image's own series: it is read onto the series' grid (:func:`~medimg.io.dicomseg.seg_to_labels`,
each segment as its label value: medimg's SEGs hold it, another tool's segments are mapped by name
to the labels of the segmentation bundles served, :func:`~medimg.label.uploads.served_labels`, else by segment number)
and stored as ``<id>.nii.gz``; a SEG for an image file, or one referencing another series, is
refused. An upload with no label voxel (all zeros) clears: the label stored under that tag is
removed and nothing is stored, so a wrong label can be undone and the image counts as unlabelled
again. MONAI Label stores a label as ``<id><upload's extension>``: a label saved as ``.nii.gz`` and
then as ``.nrrd`` would leave both, and clearing one would bring the other back. Saving or
clearing removes the tag's other ``<id>.<known extension>`` files (the exact id: never those of an
id it is a prefix of). MONAI Label copies every upload to a temporary file and deletes it after a
successful answer only; a refused upload's copy is deleted here, so refusals cannot fill the disk.

An image upload (``PUT /datastore/image``) is read whole first: a file that does not read as an
image is refused (400). Under the id of a stored image, the same image (same voxels on the same
grid: 3D Slicer uploads the volume it shows again) stores nothing, and another image is refused
with 409: replacing a study would leave its labels on a scan they were not drawn on.

A label is written to a hidden temporary file beside the stored one, flushed to disk and renamed
over it: a full disk or a kill midway leaves the previous label whole (MONAI Label copies over it
in place). Hidden files (``.name``) are never listed as images or labels.

``datastore_v2.json`` is written to a temporary file and renamed over the old one, so a kill
midway leaves the old file whole (MONAI Label writes it in place: a kill left it truncated and the
server never started again). A file that does not load at start (an older server's truncated
one) is rebuilt from the folder, with a warning: images and labels are found again, their extra
info (timestamps, label names) is lost.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

from monailabel.datastore.local import LocalDatastore

from medimg.errors import DataError, atomic_output
from medimg.io.dicom import folder_has_dicom
from medimg.label.uploads import (
    ImageExists,
    check_label_upload,
    read_seg_upload,
    read_upload,
    same_image,
    upload_removed_if_refused,
)

log = logging.getLogger(__name__)
# the datastore's state (its objects, its file, the folder) changed or read by one thread at a time: the
# server's worker threads (saves, uploads, listings) and the file watcher's refresh
_SAVING = threading.RLock()
# real file suffixes an image or label may carry besides the configured patterns
FILE_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm", ".bin", ".zip")


class StudiesPathError(DataError):
    """An image id, label tag or studies entry that would reach outside the studies folder."""


def plain_name(kind: str, value: str | None) -> str | None:
    """``value`` when it is a plain file name (or empty); otherwise :class:`StudiesPathError`."""
    if not value:
        return value
    if (value in (".", "..") or "/" in value or "\\" in value or "\x00" in value or os.path.isabs(value)
            or Path(value).drive):
        raise StudiesPathError(repr(value), f"{kind} must be a plain name inside the studies folder")
    return value


class SeriesDatastore(LocalDatastore):
    """``LocalDatastore`` plus DICOM series folders, with every id, tag and path kept inside (module docstring)."""

    def _root(self) -> str:
        return os.path.realpath(self._datastore.image_path())

    def _inside(self, path: str) -> str:
        """``path`` when it resolves inside the studies folder (symlinks followed)."""
        if not path:
            return path
        real, root = os.path.realpath(path), self._root()
        if real != root and not real.startswith(root + os.sep):
            raise StudiesPathError(Path(path).name, "resolves outside the studies folder")
        return path

    def _to_id(self, file: str) -> tuple[str, str]:
        """``(id, extension)`` of a file or folder name in the studies folder (module docstring)."""
        if os.path.isdir(os.path.join(self._datastore.image_path(), file)):
            return file, ""  # a series folder
        configured = [p[1:] for p in self._extensions if p.startswith("*.") and not any(c in p[1:] for c in "*?[")]
        lower = file.lower()
        for ext in sorted({e.lower() for e in (*configured, *FILE_SUFFIXES)}, key=len, reverse=True):
            if any(c.isalpha() for c in ext) and lower.endswith(ext) and len(file) > len(ext):
                return file[:-len(ext)], file[-len(ext):]
        return file, ""

    def _remove_non_existing(self) -> int:
        """MONAI Label's clean-up, plus entries recorded under an id this datastore would not give their file."""
        invalidate = super()._remove_non_existing()
        stale = [k for k, v in self._datastore.objects.items()
                 if self._to_id(self._filename(k, v.image.ext)) != (k, v.image.ext)]
        for image_id in stale:  # e.g. GE's ….299 once recorded as ….1601318184 + ".299"
            del self._datastore.objects[image_id]
        return invalidate + len(stale)

    def _list_files(self, path, patterns):  # noqa: ANN001, ANN202 - MONAI Label's signature
        root = os.path.realpath(path)
        files = {k: v for k, v in super()._list_files(path, patterns).items()  # hidden: a file being written
                 if not v.startswith(".") and os.path.realpath(os.path.join(path, v)).startswith(root + os.sep)}
        if root != self._root():
            return files
        labels = Path(self._datastore.label_path(None)).resolve()
        for entry in sorted(Path(path).iterdir()):
            if (entry.is_dir() and not entry.name.startswith(".") and entry.resolve() != labels
                    and entry.resolve().is_relative_to(root) and folder_has_dicom(entry)):
                files[entry.name] = entry.name
        return files

    def get_image_uri(self, image_id: str) -> str:
        """MONAI Label's image path, checked inside the studies folder."""
        return self._inside(super().get_image_uri(plain_name("image id", image_id)))

    def get_label_uri(self, label_id: str, label_tag: str) -> str:
        """MONAI Label's label path, checked inside the studies folder."""
        plain_name("label id", label_id)
        return self._inside(super().get_label_uri(label_id, plain_name("label tag", label_tag)))

    def get_image_info(self, image_id: str) -> dict[str, Any]:
        """MONAI Label's image info, for a plain id; a series folder is named ``<id>.nrrd`` and has no path."""
        info = super().get_image_info(plain_name("image id", image_id))
        obj = self._datastore.objects.get(image_id)
        if obj is not None and not obj.image.ext and os.path.isdir(info.get("path", "")):
            info.pop("path")
            info["name"] = f"{image_id}.nrrd"
        return info

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        """Store an uploaded image under a plain id, once it reads as an image; never over another image.

        The same image again (3D Slicer uploads the volume it shows before each request) is a no-op.
        Another image under a stored id is :class:`ImageExists` (HTTP 409): replacing it would leave
        that study's labels on a scan they were not drawn on.
        """
        with upload_removed_if_refused(image_filename):
            image_id = image_id or self._to_id(os.path.basename(image_filename))[0]
            plain_name("image id", image_id)
            upload = read_upload(image_filename, f"image upload {image_id!r}")
            with _SAVING:  # checked and stored as one step: two uploads under one new id cannot both pass
                self.refresh()  # a file the watcher has not reported yet is an image too
                stored = self.get_image_uri(image_id) if image_id in self._datastore.objects else ""
                if stored:
                    if same_image(upload, stored):
                        return image_id  # MONAI Label deletes its copy of the upload after the answer
                    raise ImageExists(f"image upload {image_id!r}", "the datastore already holds another image "
                                                                    "under this id; upload it under a new name")
                return super().add_image(image_id, image_filename, image_info)

    def remove_image(self, image_id: str) -> None:
        """Remove an image (and its labels) by a plain id."""
        self.get_image_uri(image_id)
        super().remove_image(image_id)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        """Store a label under a plain image id and tag, inside the studies folder, once it reads as one.

        A DICOM SEG is stored as NIfTI on its series' grid. An all-zero label clears: the label
        stored under that tag is removed, nothing is stored. The tag's files of this id in other
        formats are removed either way (module docstring).
        """
        with upload_removed_if_refused(label_filename), tempfile.TemporaryDirectory() as tmp:
            plain_name("image id", image_id)
            self._inside(self._datastore.label_path(plain_name("label tag", label_tag)))
            image_file = self.get_image_uri(image_id)
            if not image_file:
                raise DataError(repr(image_id), "no such image in the datastore")
            if label_filename.lower().endswith(".dcm"):  # a DICOM SEG (3D Slicer, OHIF)
                upload = read_seg_upload(label_filename, image_file, image_id, Path(tmp) / f"{image_id}.nii.gz")
            else:
                upload = check_label_upload(label_filename, image_file, image_id, Path(tmp) / f"{image_id}.nii.gz")
            with _SAVING:
                if upload is None:
                    if self._remove_label_files(image_id, label_tag) or self._datastore.label(image_id, label_tag):
                        self.refresh()  # at once, not when the file watcher notices
                    return image_id
                stored = self._store_label(image_id, str(upload), label_tag, label_info)
                self._remove_label_files(image_id, label_tag, keep=self._datastore.label(image_id, label_tag).ext)
                return stored

    def _store_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        """MONAI Label's ``save_label``, but the file replaced atomically (module docstring).

        MONAI Label copies the upload over the stored label in place: a full disk or a kill midway
        left the previous label truncated, still listed, and every later training failed on it.
        """
        import shutil
        import time

        from filelock import FileLock
        from monailabel.datastore.local import DataModel

        obj = self._datastore.objects.get(image_id)
        if obj is None:
            raise DataError(repr(image_id), "no such image in the datastore")
        ext = self._to_id(os.path.basename(label_filename))[1]
        name = self._filename(image_id, ext)
        dest = Path(self._inside(os.path.join(self._datastore.label_path(label_tag), name)))
        with FileLock(self._lock_file):
            with atomic_output(dest) as tmp:
                shutil.copyfile(label_filename, tmp)
                with open(tmp, "rb+") as fh:
                    os.fsync(fh.fileno())
            obj.labels[label_tag] = DataModel(info={**(label_info or {}), "ts": int(time.time()), "name": name},
                                              ext=ext)
            self._update_datastore_file(lock=False)
        return image_id

    def _remove_label_files(self, image_id: str, label_tag: str, keep: str | None = None) -> int:
        """Delete the tag's label files of exactly ``image_id`` with a known extension, but ``keep``; how many."""
        folder = Path(self._datastore.label_path(label_tag))
        removed = 0
        for entry in sorted(folder.iterdir()) if folder.is_dir() else ():
            file_id, ext = self._to_id(entry.name)
            if file_id == image_id and ext and ext != keep and entry.is_file():
                entry.unlink(missing_ok=True)
                removed += 1
        return removed

    def _update_datastore_file(self, lock: bool = True) -> None:
        """Write ``datastore_v2.json`` to a temporary file and rename it over the old one (module docstring)."""
        from filelock import FileLock

        def write() -> None:
            text = json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str)
            path = self._datastore_config_path
            fd, tmp = tempfile.mkstemp(prefix=".datastore", suffix=".tmp", dir=os.path.dirname(path) or ".")
            try:
                with os.fdopen(fd, "w") as fh:
                    fh.write(text)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            self._config_ts = os.stat(path).st_mtime

        if lock:
            with FileLock(self._lock_file):
                write()
        else:
            write()

    def _reconcile_datastore(self) -> None:
        """MONAI Label's reconciliation with the folder, one thread at a time (it clears and refills the objects)."""
        with _SAVING:
            super()._reconcile_datastore()

    def json(self) -> dict[str, Any]:
        """MONAI Label's listing, read while no other thread changes it."""
        with _SAVING:
            return super().json()

    def datalist(self, full_path: bool = True) -> list[dict[str, Any]]:
        """MONAI Label's labelled images, read while no other thread changes them."""
        with _SAVING:
            return super().datalist(full_path)

    def _init_from_datastore_file(self, throw_exception: bool = False) -> None:
        """MONAI Label's loading; a file that does not load at start is rebuilt from the folder (module docstring)."""
        with _SAVING:
            self._init_locked(throw_exception)

    def _init_locked(self, throw_exception: bool) -> None:
        try:
            super()._init_from_datastore_file(throw_exception=True)
        except ValueError as exc:
            if not throw_exception:
                return  # later reloads: MONAI Label keeps what it has (and logged the error)
            log.warning("%s does not load (%s); rebuilt from the folder", self._datastore_config_path,
                        str(exc).splitlines()[0])
            self._update_datastore_file()

    def remove_label(self, label_id: str, label_tag: str) -> None:
        """Remove a label by a plain id and tag, in every format (module docstring)."""
        stored = self.get_label_uri(label_id, label_tag)
        with _SAVING:
            self._remove_label_files(label_id, label_tag, keep=self._datastore.label(label_id, label_tag).ext
                                     if stored else None)
            super().remove_label(label_id, label_tag)

    def update_image_info(self, image_id: str, info: dict[str, Any]) -> None:
        """Update image info by a plain id."""
        super().update_image_info(plain_name("image id", image_id), info)

    def update_label_info(self, label_id: str, label_tag: str, info: dict[str, Any]) -> None:
        """Update label info by a plain id and tag."""
        plain_name("label id", label_id)
        super().update_label_info(label_id, plain_name("label tag", label_tag), info)
