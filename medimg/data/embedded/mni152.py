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

``mni152_head``: the same brain and labels inside a real head. The 2009a template is skull-stripped,
so a network trained on it alone has never seen scalp, skull, fat, eyes or neck, and calls them
tissue on a real scan. :func:`compose_head` places the 2009a brain (every voxel of its non-zero
region, as the template has it) inside the head of FSL's MNI152 NLin6 asymmetric template (a
different average of 152 heads, shipped in the ``nimare`` wheel's resources), resampled onto the
2009a grid through both affines and scaled to the 2009a's white-matter intensity. NLin6's own
brain where it reaches past the 2009a brain becomes CSF, so no unlabelled brain is taught as
background. The labels are the 2009a's, unchanged: the head is background.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from medimg.data.embedded.locking import prepare_once
from medimg.errors import DataError, atomic_output

MNI_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
NLIN6_FILES = {
    "t1": "tpl-MNI152NLin6Asym_res-01_T1w.nii.gz",
    "brain": "tpl-MNI152NLin6Asym_res-01_desc-brain_mask.nii.gz",
}
TRAIN_Y_MIN_MM = -20.0
VAL_Y_MAX_MM = -28.0


def default_data_root() -> Path:
    """Folder where embedded datasets are materialised (``$MEDIMG_DATA_DIR`` or ``~/.cache/medimg``)."""
    return Path(os.environ.get("MEDIMG_DATA_DIR", Path.home() / ".cache" / "medimg" / "datasets"))


def package_data_dir(package: str, subdir: str, files: dict[str, str], install: str) -> Path:
    """A data folder inside an installed package, found without importing it; every file checked.

    Args:
        package: the distribution's import name.
        subdir: the folder under the package.
        files: the files that must be there.
        install: the install command the error message gives.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(package, f"package not installed; it carries the template files ({install})")
    folder = Path(next(iter(spec.submodule_search_locations))) / subdir
    for name in files.values():
        if not (folder / name).is_file():
            raise DataError(folder / name, f"template file missing from the {package} installation")
    return folder


def mni152_source_dir() -> Path:
    """The folder inside the installed ``nilearn`` package holding the MNI152 2009a files (no import)."""
    return package_data_dir("nilearn", "datasets/data", MNI_FILES, "pip install nilearn")


def nlin6_source_dir() -> Path:
    """The folder inside the installed ``nimare`` package holding FSL's MNI152 NLin6 head (no import)."""
    return package_data_dir("nimare", "resources/templates", NLIN6_FILES, "pip install --no-deps nimare==0.22.1")


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


def save_nifti(array: np.ndarray, affine: np.ndarray, path: Path, code: int = 4) -> None:
    """Write an embedded-dataset volume (qform and sform set, atomically; ``code`` 4: MNI152, 1: scanner)."""
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=code)
    img.set_sform(affine, code=code)
    with atomic_output(path) as tmp:
        nib.save(img, str(tmp))


def _crop_y(array: np.ndarray, affine: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    out_aff = affine.copy()
    out_aff[:3, 3] = affine[:3, :3] @ np.array([0, lo, 0]) + affine[:3, 3]
    return np.ascontiguousarray(array[:, lo:hi]), out_aff


def resample_to(image: nib.Nifti1Image, shape: tuple[int, ...], affine: np.ndarray, order: int) -> np.ndarray:
    """``image`` on another grid of the same world space (through both affines), 0 outside its field of view."""
    to_src = np.linalg.inv(np.asarray(image.affine)) @ np.asarray(affine)
    data = np.asarray(image.dataobj, dtype=np.float32)
    return ndimage.affine_transform(data, to_src[:3, :3], to_src[:3, 3], output_shape=shape, order=order, cval=0.0)


def compose_head(t1: np.ndarray, labels: np.ndarray, head: np.ndarray, head_brain: np.ndarray,
                 gap_voxels: int = 2) -> np.ndarray:
    """A skull-stripped T1 placed inside another template's head, all on one grid.

    Args:
        t1: the skull-stripped T1 (0 outside its brain region).
        labels: its tissue labels (the largest value is white matter, used to match intensities).
        head: the whole-head T1 on the same grid.
        head_brain: that head's brain mask on the same grid.
        gap_voxels: the head's brain, grown by this many voxels, becomes CSF where ``t1`` has nothing.

    Returns:
        float32 image: ``t1`` inside its region, ``head`` (scaled to ``t1``'s white-matter median)
        outside, and CSF (the lower quartile of ``t1``'s unlabelled brain region) where the head's
        own brain reaches past ``t1``'s.
    """
    inside = t1 > 0
    wm = labels == labels.max()
    if not inside.any() or not wm.any() or not (head[wm] > 0).any():
        raise DataError("mni152_head", "the brain and the head templates do not overlap")
    scale = float(np.median(t1[wm]) / np.median(head[wm]))
    out = np.where(inside, t1, head * scale).astype(np.float32)
    unlabelled = inside & (labels == 0)
    csf = float(np.percentile(t1[unlabelled], 25)) if unlabelled.any() else 0.0
    reach = ndimage.binary_dilation(head_brain > 0, iterations=max(int(gap_voxels), 1)) & ~inside
    out[reach] = csf
    return out


def _write_slabs(root: Path, t1: np.ndarray, labels: np.ndarray, affine: np.ndarray) -> None:
    """The whole volume, the training slab and the validation slab (images and labels)."""
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


def _mni152_2009a() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The 2009a T1, its tissue labels and its affine, from nilearn's files."""
    src = mni152_source_dir()
    t1_img = nib.load(str(src / MNI_FILES["t1"]))
    t1 = np.asarray(t1_img.dataobj, dtype=np.float32)
    # the probability maps are stored as uint8 0..255
    gm = np.asarray(nib.load(str(src / MNI_FILES["gm"])).dataobj, dtype=np.float32) / 255.0
    wm = np.asarray(nib.load(str(src / MNI_FILES["wm"])).dataobj, dtype=np.float32) / 255.0
    return t1, mni152_tissue_labels(gm, wm), np.asarray(t1_img.affine)


def prepare_mni152(root: str | Path | None = None) -> Path:
    """Materialise the MNI152 dataset (images, labels, split) once; return its folder.

    Files: ``t1.nii.gz``/``labels.nii.gz`` (whole brain), ``t1_anterior``/``labels_anterior``
    (training slab) and ``t1_posterior``/``labels_posterior`` (validation slab). The manifest is
    ``data_manifests/mni152.json``.
    """
    root = Path(root) if root is not None else default_data_root() / "mni152"
    prepare_once(root, root / "labels_posterior.nii.gz", lambda: _write_slabs(root, *_mni152_2009a()))
    return root


def prepare_mni152_head(root: str | Path | None = None) -> Path:
    """Materialise ``mni152_head`` (the 2009a brain inside the NLin6 head, :func:`compose_head`) once.

    Same files and split as :func:`prepare_mni152`; the manifest is ``data_manifests/mni152_head.json``.
    """
    root = Path(root) if root is not None else default_data_root() / "mni152_head"
    prepare_once(root, root / "labels_posterior.nii.gz", lambda: _write_head(root))
    return root


def _write_head(root: Path) -> None:
    """Write ``mni152_head``'s slabs: the 2009a brain inside the NLin6 head."""
    src = nlin6_source_dir()
    t1, labels, affine = _mni152_2009a()
    head = resample_to(nib.load(str(src / NLIN6_FILES["t1"])), t1.shape, affine, order=1)
    brain = resample_to(nib.load(str(src / NLIN6_FILES["brain"])), t1.shape, affine, order=0)
    _write_slabs(root, compose_head(t1, labels, head, brain), labels, affine)
