"""Embedded datasets that need no download: the real MNI152 template and synthetic phantoms.

``mni152``: the MNI ICBM152 2009a (symmetric) T1 template that ships inside the ``nilearn``
package, with tissue labels from its grey/white-matter probability maps (0 background, 1 grey
matter, 2 white matter: the larger of the two probabilities where it reaches 0.5).

Split: the template is *symmetric*, so a left/right split would validate on the mirror image of
the training data. Instead the brain is cut along the anterior-posterior axis: training on the
slab anterior of y = -20 mm (frontal, temporal poles, basal ganglia), validation on the slab
posterior of y = -28 mm (parietal, occipital, cerebellum). The 8 mm gap keeps neighbouring slices
out of both; the validation slab holds anatomy (cerebellar folia, occipital cortex) that training
never saw.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import nibabel as nib
import numpy as np

from medimg.errors import DataError, atomic_output

MNI_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
TRAIN_Y_MIN_MM = -20.0
VAL_Y_MAX_MM = -28.0


def default_data_root() -> Path:
    """Folder where embedded datasets are materialised (``$MEDIMG_DATA_DIR`` or ``~/.cache/medimg``)."""
    return Path(os.environ.get("MEDIMG_DATA_DIR", Path.home() / ".cache" / "medimg" / "datasets"))


def mni152_source_dir() -> Path:
    """The folder inside the installed ``nilearn`` package holding the MNI152 files (no import)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("nilearn", "package not installed; it carries the MNI152 template (pip install nilearn)")
    folder = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    for name in MNI_FILES.values():
        if not (folder / name).is_file():
            raise DataError(folder / name, "MNI152 file missing from the nilearn installation")
    return folder


def mni152_tissue_labels(gm: np.ndarray, wm: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Tissue labels from probability maps: argmax of (GM, WM) where it reaches ``threshold``.

    Args:
        gm: grey-matter probability in [0, 1].
        wm: white-matter probability in [0, 1].
        threshold: minimum probability for a tissue label.

    Returns:
        uint8 labels: 0 background, 1 grey matter, 2 white matter.
    """
    tissue = np.where(wm > gm, 2, 1).astype(np.uint8)
    return np.where(np.maximum(gm, wm) >= threshold, tissue, 0).astype(np.uint8)


def save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write an embedded-dataset volume (qform and sform set, atomically)."""
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=4)  # MNI152 space
    img.set_sform(affine, code=4)
    with atomic_output(path) as tmp:
        nib.save(img, str(tmp))


def _crop_y(array: np.ndarray, affine: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    out_aff = affine.copy()
    out_aff[:3, 3] = affine[:3, :3] @ np.array([0, lo, 0]) + affine[:3, 3]
    return np.ascontiguousarray(array[:, lo:hi]), out_aff


def prepare_mni152(root: str | Path | None = None) -> Path:
    """Materialise the MNI152 dataset (images, labels, split) once; return its folder.

    Files: ``t1.nii.gz``/``labels.nii.gz`` (whole brain), ``t1_anterior``/``labels_anterior``
    (training slab) and ``t1_posterior``/``labels_posterior`` (validation slab). The manifest is
    ``data_manifests/mni152.json``.
    """
    root = Path(root) if root is not None else default_data_root() / "mni152"
    if (root / "labels_posterior.nii.gz").is_file():
        return root
    src = mni152_source_dir()
    t1_img = nib.load(str(src / MNI_FILES["t1"]))
    t1 = np.asarray(t1_img.dataobj, dtype=np.float32)
    affine = np.asarray(t1_img.affine)
    # the probability maps are stored as uint8 0..255
    gm = np.asarray(nib.load(str(src / MNI_FILES["gm"])).dataobj, dtype=np.float32) / 255.0
    wm = np.asarray(nib.load(str(src / MNI_FILES["wm"])).dataobj, dtype=np.float32) / 255.0
    labels = mni152_tissue_labels(gm, wm)
    y_mm = affine[1, 1] * np.arange(t1.shape[1]) + affine[1, 3]
    train_lo = int(np.searchsorted(y_mm, TRAIN_Y_MIN_MM))
    val_hi = int(np.searchsorted(y_mm, VAL_Y_MAX_MM, side="right"))
    root.mkdir(parents=True, exist_ok=True)
    pieces = {"": (0, t1.shape[1]), "_anterior": (train_lo, t1.shape[1]), "_posterior": (0, val_hi)}
    for suffix, (lo, hi) in pieces.items():
        img, aff = _crop_y(t1, affine, lo, hi)
        lab, _ = _crop_y(labels, affine, lo, hi)
        save_nifti(img, aff, root / f"t1{suffix}.nii.gz")
        save_nifti(lab, aff, root / f"labels{suffix}.nii.gz")
    return root
