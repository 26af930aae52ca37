"""The ``.nii.gz`` fast path: the whole file inflated in memory at once, the voxels viewed in place.

Python's streaming gzip reader (what nibabel uses) is 3-4x slower than one libdeflate call; files of
several gzip members (bgzip, pigz ``-i``, concatenations) are inflated member by member with zlib.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from medimg.io.headers import check_scalar_voxels, scalar_float32


def gunzip(data: bytes, whole: bool = False) -> bytes:
    """Inflate gzip data: every member, as gzip and nibabel read it, in one libdeflate call where that is proven.

    libdeflate inflates only the first member (sized by the last four bytes of the data). Its answer
    stands only when the data's last eight bytes are exactly that output's CRC-32 and size, so the
    first member is the whole file. Anything else (bgzip's blocks and its empty end member, ``cat
    a.gz b.gz``, zero padding after the last member), or ``whole``, goes member by member
    (:func:`inflate_members`).
    """
    if not whole:
        import deflate

        try:
            raw = deflate.gzip_decompress(data)
        except deflate.DeflateError:
            raw = b""
        if raw and data[-8:] == struct.pack("<II", deflate.crc32(raw), len(raw) % (1 << 32)):
            return raw
    return inflate_members(data)


def inflate_members(data: bytes, chunk: int = 1 << 20) -> bytes:
    """Inflate every gzip member in turn (zlib), skipping zero padding between and after them.

    Raises:
        EOFError: the data ends inside a member (a truncated file).
        zlib.error: a corrupt member, or bytes after a member that are neither padding nor another member.
    """
    view, out, pos = memoryview(data), [], 0
    while True:
        while pos < len(view) and view[pos] == 0:  # padding (tape blocks, some writers)
            pos += 1
        if pos == len(view):
            if not out:
                raise EOFError("no gzip member")
            return b"".join(out)
        member = zlib.decompressobj(31)
        while not member.eof:
            if pos >= len(view):
                raise EOFError("compressed data ended before the end of a gzip member")
            piece = view[pos:pos + chunk]
            out.append(member.decompress(piece))
            pos += len(piece) - len(member.unused_data)


def inflate_nifti(path: Path) -> tuple[np.ndarray, Any]:
    """Read a ``.nii.gz`` inflated in memory at once (:func:`gunzip`).

    The voxels are viewed straight from the inflated buffer (no copy) and scaled like nibabel.
    """
    import io

    packed = path.read_bytes()
    raw = gunzip(packed)
    order = "<"
    sizeof_hdr = int.from_bytes(raw[:4], "little") if len(raw) >= 4 else 0
    if sizeof_hdr not in (348, 540):
        order, sizeof_hdr = ">", int.from_bytes(raw[:4], "big")
    if sizeof_hdr not in (348, 540) or len(raw) < sizeof_hdr:
        raise nib.filebasedimages.ImageFileError("no NIfTI header")
    # parse only header + extensions (up to vox_offset): handing nibabel the whole buffer costs ms
    vox_offset = (struct.unpack_from(f"{order}f", raw, 108)[0] if sizeof_hdr == 348
                  else struct.unpack_from(f"{order}q", raw, 168)[0])
    header_cls = nib.Nifti1Header if sizeof_hdr == 348 else nib.Nifti2Header
    header = header_cls.from_fileobj(io.BytesIO(raw[: max(int(vox_offset), sizeof_hdr + 4)]))
    shape = header.get_data_shape()
    dtype = header.get_data_dtype()
    check_scalar_voxels(path, dtype)
    offset = int(header.get_data_offset())
    count = int(np.prod(shape))
    if offset + count * dtype.itemsize > len(raw):  # two identical members: libdeflate gave the first
        raw = gunzip(packed, whole=True)
    if offset + count * dtype.itemsize > len(raw):
        raise EOFError("voxel data shorter than the header declares")
    data = np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(shape, order="F")
    slope, inter = header.get_slope_inter()
    if slope is not None and (slope != 1.0 or (inter or 0.0) != 0.0):
        return scalar_float32(path, data * np.float32(slope) + np.float32(inter or 0.0)), header
    return scalar_float32(path, data), header
