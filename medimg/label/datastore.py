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

A label upload is read whole before anything is stored: a corrupt, truncated or non-image file,
or one whose grid differs from its image's, is refused (400) and the label already stored for
that image stays as it was. A ``.dcm`` label must parse as a DICOM SEG. MONAI Label copies every
upload to a temporary file and deletes it after a successful answer only; a refused upload's copy
is deleted here, so refusals cannot fill the disk.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from monailabel.datastore.local import LocalDatastore

from medimg.errors import DataError
from medimg.io.dicom import folder_has_dicom


@contextlib.contextmanager
def upload_removed_if_refused(path: str) -> Iterator[None]:
    """On an error, delete ``path`` when it is MONAI Label's temporary copy of an upload.

    MONAI Label's upload endpoints write the body to a new file in the temporary folder and
    schedule its removal as a background task, which FastAPI runs only after a successful
    response. Only a top-level file of the temporary folder is removed: never a studies file.
    """
    try:
        yield
    except BaseException:
        upload = Path(path)
        if upload.parent.resolve() == Path(tempfile.gettempdir()).resolve() and upload.is_file():
            upload.unlink(missing_ok=True)
        raise


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


def grid_shape(path: str) -> tuple[int, ...]:
    """The spatial shape of an image: from the header for NIfTI, else by reading it."""
    from medimg.io.image import NIFTI_SUFFIXES, has_suffix, read_image

    if has_suffix(Path(path), NIFTI_SUFFIXES):
        import nibabel as nib

        return tuple(int(n) for n in nib.load(path).shape[:3])
    return tuple(read_image(path, spatial_dims=None).array.shape[:3])


def check_label_upload(label_file: str, image_file: str, image_id: str) -> None:
    """Read an uploaded label whole; :class:`~medimg.errors.DataError` unless it is an image on its image's grid."""
    from medimg.io.image import read_image

    if label_file.lower().endswith(".dcm"):  # a DICOM SEG (3D Slicer, OHIF): it must parse as one
        import pydicom

        try:
            modality = pydicom.dcmread(label_file, stop_before_pixels=True).get("Modality")
        except Exception as exc:  # noqa: BLE001 - any parse failure is a bad upload
            raise DataError(f"label upload for {image_id!r}", f"not a readable DICOM file ({exc})") from exc
        if modality != "SEG":
            raise DataError(f"label upload for {image_id!r}", f"a DICOM label must be a SEG, not {modality!r}")
        return
    try:
        label = read_image(label_file, spatial_dims=None)
    except DataError as exc:
        raise DataError(f"label upload for {image_id!r}", exc.problem) from exc
    shape = tuple(label.array.shape[:3])
    expected = grid_shape(image_file) if image_file else shape  # the image read once
    if shape != expected:
        raise DataError(f"label upload for {image_id!r}", f"shape {shape} differs from the image's {expected}")


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

    def _list_files(self, path, patterns):  # noqa: ANN001, ANN202 - MONAI Label's signature
        root = os.path.realpath(path)
        files = {k: v for k, v in super()._list_files(path, patterns).items()
                 if os.path.realpath(os.path.join(path, v)).startswith(root + os.sep)}  # no links leading out
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
        """MONAI Label's image info, for a plain id."""
        return super().get_image_info(plain_name("image id", image_id))

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        """Store an uploaded image under a plain id."""
        with upload_removed_if_refused(image_filename):
            plain_name("image id", image_id or self._to_id(os.path.basename(image_filename))[0])
            return super().add_image(image_id, image_filename, image_info)

    def remove_image(self, image_id: str) -> None:
        """Remove an image (and its labels) by a plain id."""
        self.get_image_uri(image_id)
        super().remove_image(image_id)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        """Store a label under a plain image id and tag, inside the studies folder, once it reads as one."""
        with upload_removed_if_refused(label_filename):
            plain_name("image id", image_id)
            self._inside(self._datastore.label_path(plain_name("label tag", label_tag)))
            check_label_upload(label_filename, self.get_image_uri(image_id), image_id)
            return super().save_label(image_id, label_filename, label_tag, label_info)

    def remove_label(self, label_id: str, label_tag: str) -> None:
        """Remove a label by a plain id and tag."""
        self.get_label_uri(label_id, label_tag)
        super().remove_label(label_id, label_tag)

    def update_image_info(self, image_id: str, info: dict[str, Any]) -> None:
        """Update image info by a plain id."""
        super().update_image_info(plain_name("image id", image_id), info)

    def update_label_info(self, label_id: str, label_tag: str, info: dict[str, Any]) -> None:
        """Update label info by a plain id and tag."""
        plain_name("label id", label_id)
        super().update_label_info(label_id, plain_name("label tag", label_tag), info)
