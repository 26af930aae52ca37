"""InVesalius 3 project files (``.inv3``): the volume and its masks, read without extracting anything.

An ``.inv3`` file is a gzipped tar of Apple property lists and raw arrays (InVesalius 3's own
project format, as in Debian's ``invesalius-examples``):

- ``main.plist``: ``matrix`` (``filename``, ``dtype``, ``shape`` as ``(Z, Y, X)``), ``spacing``
  as ``(x, y, z)`` mm, ``modality`` and the ``masks`` index;
- ``matrix.dat``: the volume, C order ``(Z, Y, X)``;
- ``mask_N.plist`` / ``mask_N.dat``: each mask as uint8 ``(Z+1, Y+1, X+1)``; the first plane of
  each axis holds InVesalius' edit flags, the voxels are ``[1:, 1:, 1:]``, 255 inside.

Members are read straight from the archive into memory (:func:`tarfile.TarFile.extractfile`):
nothing is written to disk, so no member path can escape anywhere. Every member name is still
checked (plain names inside one folder) and the array sizes are checked against their plists.

Geometry: the format stores spacing only, no origin or direction. InVesalius stores axial slices
with rows running anterior (it flips DICOM's posterior-running rows on import) and slices running
superior; columns follow DICOM's patient-left convention. The affine is therefore
``diag(-sx, +sy, +sz)`` in RAS+ mm with the origin at voxel 0. Left and right are not recorded by
the format: a mirror-symmetric reading is the best any reader can do.
"""

from __future__ import annotations

import plistlib
import tarfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from medimg.errors import DataError
from medimg.io.headers import scalar_float32

MAX_MEMBER_BYTES = 2 << 30


@dataclass
class InVesaliusProject:
    """An InVesalius project: the volume as ``(X, Y, Z)`` array, its affine and its named masks.

    Attributes:
        array: the volume, float32, indexed ``(x, y, z)`` like a NIfTI file.
        affine: voxel-to-RAS+ mm (see the module docstring).
        masks: mask name -> bool ``(X, Y, Z)`` array, in the project's order.
        modality: the project's modality (``CT``, ``MRI``...).
        thresholds: mask name -> the ``(low, high)`` threshold InVesalius drew it with.
    """

    array: np.ndarray
    affine: np.ndarray
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    modality: str = ""
    thresholds: dict[str, tuple[float, float]] = field(default_factory=dict)


def _members(path: Path, tar: tarfile.TarFile) -> dict[str, tarfile.TarInfo]:
    """Plain file members by base name; any other kind of member or path is refused."""
    out: dict[str, tarfile.TarInfo] = {}
    for m in tar.getmembers():
        parts = PurePosixPath(m.name).parts
        if m.name.startswith("/") or ".." in parts or len(parts) > 2 or not (m.isfile() or m.isdir()):
            raise DataError(path, f"unsafe archive member {m.name!r}")
        if m.isfile():
            if m.size > MAX_MEMBER_BYTES:
                raise DataError(path, f"archive member {m.name!r} is too large ({m.size} bytes)")
            out[parts[-1]] = m
    return out


def _read(path: Path, tar: tarfile.TarFile, members: dict[str, tarfile.TarInfo], name: str) -> bytes:
    if not isinstance(name, str) or name not in members:
        raise DataError(path, f"archive member {name!r} is missing")
    handle = tar.extractfile(members[name])
    if handle is None:
        raise DataError(path, f"archive member {name!r} cannot be read")
    return handle.read()


def _plist(path: Path, data: bytes, name: str) -> dict:
    try:
        doc = plistlib.loads(data)
    except (plistlib.InvalidFileException, ValueError) as exc:
        raise DataError(path, f"{name} is not a property list ({exc})") from exc
    if not isinstance(doc, dict):
        raise DataError(path, f"{name} is not a dictionary")
    return doc


def _array(path: Path, data: bytes, dtype: str, shape: tuple[int, ...], name: str) -> np.ndarray:
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise DataError(path, f"{name}: unknown dtype {dtype!r}") from exc
    if len(shape) != 3 or any(int(s) <= 0 for s in shape) or len(data) != dt.itemsize * int(np.prod(shape)):
        raise DataError(path, f"{name} holds {len(data)} bytes, not a {dtype} array of shape {tuple(shape)}")
    return np.frombuffer(data, dtype=dt).reshape(shape)


def read_inv3(path: str | Path) -> InVesaliusProject:
    """Read an InVesalius 3 project (volume, affine, masks) from an ``.inv3`` file.

    Raises:
        DataError: naming the file: not a gzipped tar, unsafe member paths, missing members,
            or arrays whose sizes disagree with their property lists.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "no such file")
    try:
        tar = tarfile.open(path, "r:gz")
    except (tarfile.TarError, OSError) as exc:
        raise DataError(path, f"not an InVesalius project (a gzipped tar): {exc}") from exc
    with tar:
        members = _members(path, tar)
        main = _plist(path, _read(path, tar, members, "main.plist"), "main.plist")
        try:
            matrix = main["matrix"]
            zyx = tuple(int(s) for s in matrix["shape"])
            sx, sy, sz = (float(s) for s in main["spacing"])
            volume = _array(path, _read(path, tar, members, matrix["filename"]), matrix["dtype"], zyx, "matrix")
            mask_index = main.get("masks", {})
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(path, f"main.plist lacks the volume's description ({exc})") from exc
        if min(sx, sy, sz) <= 0:
            raise DataError(path, f"spacing {[sx, sy, sz]} must be positive")
        project = InVesaliusProject(np.ascontiguousarray(scalar_float32(path, volume).transpose(2, 1, 0)),
                                    np.diag([-sx, sy, sz, 1.0]), modality=str(main.get("modality", "")))
        for key in sorted(mask_index, key=lambda k: int(k) if str(k).isdigit() else 0):
            info = _plist(path, _read(path, tar, members, mask_index[key]), str(mask_index[key]))
            name = str(info.get("name", f"mask_{key}"))
            shape = tuple(int(s) for s in info.get("mask_shape", ()))
            if shape != tuple(s + 1 for s in zyx):
                raise DataError(path, f"mask {name!r} has shape {shape}, expected {tuple(s + 1 for s in zyx)}")
            raw = _array(path, _read(path, tar, members, info.get("mask_file")), "uint8", shape, name)
            project.masks[name] = np.ascontiguousarray(raw[1:, 1:, 1:].transpose(2, 1, 0) > 127)
            if "threshold_range" in info:
                project.thresholds[name] = tuple(float(t) for t in info["threshold_range"])
    return project
