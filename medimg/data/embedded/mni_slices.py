"""Embedded 2D datasets cut from the real MNI152 T1 (no download): a level task and unlabelled slices.

``mni152_levels`` -- *which axial level does this half-slice come from?* Four ordinal classes by
MNI z: ``skull_base`` [-45, -15) mm, ``basal_ganglia`` [-15, 15), ``ventricle_roof`` [15, 45) and
``vertex`` [45, 75). Each image is a 3-slice axial slab (z - 2, z, z + 2 mm; 2.5D) of one half of
the brain:

- training: the anterior half (y > -20 mm), one image per mm of z (120 images);
- validation: the posterior half (y < -28 mm), a different part of the brain (120 images).

Nothing of a validation image is seen in training, and the classes must be told apart from
anatomy that differs between front and back (frontal lobes vs occipital lobes and cerebellum),
so this is not a trivial task: within a band, neighbouring levels look alike, and the band edges
are arbitrary lines through continuous anatomy (quadratic kappa rewards near misses).

``mni152_slices`` -- unlabelled anterior half-slabs over the whole brain (z -70..80 mm) for MAE
pre-training. They overlap the level task's *training* images only.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator
from pathlib import Path

import nibabel as nib
import numpy as np

from medimg.data.embedded.mni152 import MNI_FILES, TRAIN_Y_MIN_MM, VAL_Y_MAX_MM, default_data_root, mni152_source_dir
from medimg.errors import DataError, atomic_output

LEVELS = (("skull_base", -45.0), ("basal_ganglia", -15.0), ("ventricle_roof", 15.0), ("vertex", 45.0))
LEVEL_TOP_MM = 75.0
SLAB_STEP_MM = 2.0


def _t1() -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(mni152_source_dir() / MNI_FILES["t1"]))
    return np.asarray(img.dataobj, dtype=np.float32), np.asarray(img.affine)


def _slab(t1: np.ndarray, affine: np.ndarray, z_mm: float, y_lo: int, y_hi: int) -> nib.Nifti1Image:
    """The 3-slice axial slab centred at ``z_mm`` over array rows ``y_lo:y_hi``, with its own affine."""
    step = int(round(SLAB_STEP_MM / affine[2, 2]))
    k = int(round((z_mm - affine[2, 3]) / affine[2, 2]))
    ks = [k - step, k, k + step]
    data = np.ascontiguousarray(t1[:, y_lo:y_hi, ks])
    aff = affine.copy()
    aff[:3, 3] = affine[:3, :3] @ np.array([0, y_lo, ks[0]]) + affine[:3, 3]
    aff[:3, 2] *= step
    out = nib.Nifti1Image(data, aff)
    out.set_qform(aff, code=4)
    out.set_sform(aff, code=4)
    return out


def _rows(affine: np.ndarray, shape: tuple[int, ...]) -> tuple[tuple[int, int], tuple[int, int]]:
    y_mm = affine[1, 1] * np.arange(shape[1]) + affine[1, 3]
    return (int(np.searchsorted(y_mm, TRAIN_Y_MIN_MM)), shape[1]), (0, int(np.searchsorted(y_mm, VAL_Y_MAX_MM,
                                                                                           side="right")))


def level_of(z_mm: float) -> int:
    """The level class of an axial position (mm), -1 outside the four bands."""
    for i in range(len(LEVELS) - 1, -1, -1):
        if z_mm >= LEVELS[i][1]:
            return i if z_mm < LEVEL_TOP_MM else -1
    return -1


def _materialise(root: str | Path | None, default_name: str, csv_name: str, header: list[str],
                 slabs: Callable[[tuple[int, int], tuple[int, int]], Iterator[tuple[str, float, tuple[int, int], dict]]]
                 ) -> Path:
    """Write the slab images and their CSV manifest once; return the manifest.

    ``slabs(front_rows, back_rows)`` yields ``(file stem, z mm, (y_lo, y_hi), extra CSV columns)``.
    """
    root = Path(root) if root is not None else default_data_root() / default_name
    manifest = root / csv_name
    if manifest.is_file():
        return manifest
    t1, affine = _t1()
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for stem, z, (lo, hi), extra in slabs(*_rows(affine, t1.shape)):
        name = f"images/{stem}_z{int(z):+04d}.nii.gz"
        nib.save(_slab(t1, affine, z, lo, hi), str(root / name))
        rows.append({"image": name, **extra})
    with atomic_output(manifest) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def prepare_mni152_levels(root: str | Path | None = None) -> Path:
    """Materialise the level task once; returns its CSV manifest (``image,split,label``)."""

    def slabs(front: tuple[int, int], back: tuple[int, int]) -> Iterator:
        for z in np.arange(LEVELS[0][1], LEVEL_TOP_MM, 1.0):
            label = LEVELS[level_of(float(z))][0]
            for split, rows in (("training", front), ("validation", back)):
                yield split, float(z), rows, {"split": split, "label": label}

    return _materialise(root, "mni152_levels", "levels.csv", ["image", "split", "label"], slabs)


def prepare_mni152_slices(root: str | Path | None = None) -> Path:
    """Materialise the unlabelled anterior slabs (z -70..80 mm) once; returns the CSV (``image,split``).

    Every 10th slab validates the reconstruction loss.
    """

    def slabs(front: tuple[int, int], back: tuple[int, int]) -> Iterator:
        for i, z in enumerate(np.arange(-70.0, 80.0 + 1e-6, 1.0)):
            yield "anterior", float(z), front, {"split": "validation" if i % 10 == 9 else "training"}

    return _materialise(root, "mni152_slices", "slices.csv", ["image", "split"], slabs)


EMBEDDED = {"mni152_levels": prepare_mni152_levels, "mni152_slices": prepare_mni152_slices}
CLASS_ORDER = {"mni152_levels": [name for name, _ in LEVELS]}


def embedded_csv(name: str, dataset_dir: str | Path | None = None) -> Path:
    """The CSV manifest of an embedded 2D dataset (materialised on first use)."""
    if name not in EMBEDDED:
        raise DataError(name, f"unknown embedded 2D dataset; choose {', '.join(EMBEDDED)}")
    return EMBEDDED[name](dataset_dir)
