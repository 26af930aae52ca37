"""Fail fast on headers that promise more voxels than their file holds, before anything is allocated.

A truncated download or a hand-edited header would otherwise make a reader allocate the declared
volume (possibly many GB) and then fail, or hang. For uncompressed NIfTI, MetaImage (``.mha`` /
``.mhd``) and NRRD (``.nrrd`` / ``.nhdr``) the voxel bytes the header declares are compared with the
bytes the file (or its detached data file) holds. Compressed data cannot be sized without
inflating it; its readers fail cleanly on a short stream.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medimg.errors import DataError

MET_TYPES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
             "MET_LONG": 8, "MET_ULONG": 8, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4,
             "MET_DOUBLE": 8}
NRRD_TYPES = {1: ("signed char", "int8", "char", "uchar", "unsigned char", "uint8", "int8_t", "uint8_t"),
              2: ("short", "short int", "signed short", "signed short int", "int16", "int16_t", "ushort",
                  "unsigned short", "unsigned short int", "uint16", "uint16_t"),
              4: ("int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32", "uint32_t", "float"),
              8: ("longlong", "long long", "long long int", "signed long long", "signed long long int", "int64",
                  "int64_t", "ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t",
                  "double")}
HEADER_LIMIT = 1 << 20  # text headers are small; never read more than this looking for one


def _declared(path: Path, needed: int, available: int) -> None:
    if needed > available:
        raise DataError(path, f"header declares {needed:,} bytes of voxel data but the file holds {available:,}: "
                              "truncated or corrupt")


def _nifti(path: Path) -> None:
    import nibabel as nib

    try:
        img = nib.load(str(path))
        header = img.header
        offset = int(getattr(img.dataobj, "offset", header.get_data_offset()))
    except Exception as exc:  # noqa: BLE001 - any header failure is a data error
        raise DataError(path, f"not a readable NIfTI image ({exc})") from exc
    check_scalar_voxels(path, header.get_data_dtype())
    needed = int(np.prod(header.get_data_shape(), dtype=np.int64)) * header.get_data_dtype().itemsize
    _declared(path, needed, path.stat().st_size - offset)


def _text_header(path: Path, end_of_header) -> tuple[list[str], int]:
    """Header lines and the byte offset where the data starts (for a header + data file)."""
    with open(path, "rb") as fh:
        raw = fh.read(HEADER_LIMIT)
    lines, offset = [], 0
    for line in raw.splitlines(keepends=True):
        offset += len(line)
        text = line.decode("latin-1").strip()
        lines.append(text)
        if end_of_header(text):
            break
    return lines, offset


def _meta_image(path: Path) -> None:
    lines, offset = _text_header(path, lambda t: t.lower().startswith("elementdatafile"))
    fields = {}
    for line in lines:
        if "=" in line:
            key, value = line.split("=", 1)
            fields[key.strip().lower()] = value.strip()
    if "elementdatafile" not in fields:
        return
    if fields["elementdatafile"].upper() != "LOCAL":
        _beside(path, fields["elementdatafile"])
    if fields.get("compresseddata", "false").lower() == "true":
        return
    dims = [int(v) for v in fields.get("dimsize", "0").split()]
    size = MET_TYPES.get(fields.get("elementtype", "").upper())
    if size is None:
        return
    channels = int(fields.get("elementnumberofchannels", "1"))
    needed = int(np.prod(dims, dtype=np.int64)) * size * channels
    data_file = fields["elementdatafile"]
    if data_file.upper() == "LOCAL":
        _declared(path, needed, path.stat().st_size - offset)
    elif data_file.upper() != "LIST" and "%" not in data_file:
        target = path.parent / data_file
        if not target.is_file():
            raise DataError(path, f"its data file {data_file} is missing")
        _declared(target, needed, target.stat().st_size)


def _beside(path: Path, spec: str) -> None:
    """Refuse a detached header whose data file is not a plain file name in the header's own folder.

    A header names its voxels' file (NRRD ``data file``, MetaImage ``ElementDataFile``), and readers
    follow it anywhere: an uploaded header-only file would make a server read any file it can
    (``/etc/...``, ``../..``) as voxels, or block on a FIFO. ``LIST`` and ``%``-pattern file sets
    are refused too (their names are not checked here).
    """
    if spec.upper().startswith("LIST") or "%" in spec:
        raise DataError(path, f"its data file {spec!r} is a set of files; give one data file beside the header")
    if "/" in spec or "\\" in spec or spec in (".", "..") or Path(spec).is_absolute() or Path(spec).drive:
        raise DataError(path, f"its data file {spec!r} must be a plain file name beside the header")
    target = path.parent / spec
    if target.exists() and not target.is_file():
        raise DataError(path, f"its data file {spec!r} is not a regular file")


def _nrrd(path: Path) -> None:
    lines, offset = _text_header(path, lambda t: t == "")
    fields = {}
    for line in lines[1:]:
        if ":" in line and not line.startswith("#"):
            key, value = line.split(":", 1)
            fields[key.strip().lower()] = value.lstrip("=").strip()
    if fields.get("data file") or fields.get("datafile"):
        _beside(path, fields.get("data file") or fields.get("datafile"))
    if fields.get("encoding", "raw").lower() != "raw":
        return
    sizes = [int(v) for v in fields.get("sizes", "0").split()]
    kind = fields.get("type", "").lower()
    item = next((n for n, names in NRRD_TYPES.items() if kind in names), None)
    if item is None:
        return
    needed = int(np.prod(sizes, dtype=np.int64)) * item + int(fields.get("byte skip", "0") or 0)
    data_file = fields.get("data file") or fields.get("datafile")
    if data_file is None:
        _declared(path, needed, path.stat().st_size - offset)
    elif "%" not in data_file and not data_file.upper().startswith("LIST"):
        target = path.parent / data_file
        if not target.is_file():
            raise DataError(path, f"its data file {data_file} is missing")
        _declared(target, needed, target.stat().st_size)


def detached_data_file(path: str | Path) -> str | None:
    """The data file a NRRD / MetaImage header names (``None``: the voxels follow the header, or another format).

    A single uploaded file can never carry its data file: a server refuses an upload that names one
    (whatever it names would be some other file beside the upload, in the temporary folder).
    """
    path = Path(path)
    name = path.name.lower()
    if name.endswith((".mha", ".mhd")):
        lines, _ = _text_header(path, lambda t: t.lower().startswith("elementdatafile"))
        for line in lines:
            key, _, value = line.partition("=")
            if key.strip().lower() == "elementdatafile" and value.strip().upper() != "LOCAL":
                return value.strip()
    elif name.endswith((".nrrd", ".nhdr")):
        lines, _ = _text_header(path, lambda t: t == "")
        for line in lines[1:]:
            key, _, value = line.partition(":")
            if key.strip().lower() in ("data file", "datafile") and not line.startswith("#"):
                return value.lstrip("=").strip()
    return None


def check_scalar_voxels(path: str | Path, dtype: np.dtype) -> None:
    """Refuse voxel types that are not one number per voxel (RGB24 / RGBA32 records, complex values).

    Raises:
        DataError: naming ``path``: medimg reads scalar volumes; a complex image would lose its imaginary part.
    """
    dtype = np.dtype(dtype)
    if dtype.fields is not None:
        kind = "".join(dtype.names) if set(dtype.names or ()) <= set("RGBA") else "structured"
    elif dtype.kind == "c":
        kind = "complex"
    elif dtype.kind not in "biuf":
        raise DataError(path, f"has non-numeric voxels ({dtype})")
    else:
        return
    raise DataError(path, f"stores {kind} voxels; a scalar volume is expected (one number per voxel)")


def scalar_float32(path: str | Path, voxels: Any) -> np.ndarray:
    """The voxels as float32: the one conversion every reader and every in-memory input goes through.

    Args:
        path: the file (or in-memory input) named in an error.
        voxels: an array, or an array-like with a ``dtype`` (a nibabel ``ArrayProxy``: its scaling applies).

    Raises:
        DataError: naming ``path``, for voxels that are not one real number each (:func:`check_scalar_voxels`):
            a cast would keep only the real part of complex values.
    """
    check_scalar_voxels(path, voxels.dtype)
    return np.asarray(voxels, dtype=np.float32)


def check_declared_size(path: str | Path) -> None:
    """Raise :class:`DataError` when an uncompressed image file is shorter than its header declares."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith(".nii"):
        _nifti(path)
    elif name.endswith((".mha", ".mhd")):
        _meta_image(path)
    elif name.endswith((".nrrd", ".nhdr")):
        _nrrd(path)
