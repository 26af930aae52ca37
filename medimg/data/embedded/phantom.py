"""A synthetic 3D phantom dataset (fast tests and smoke runs): MONAI ``create_test_image_3d`` spheres."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from medimg.data.embedded.locking import prepare_once
from medimg.data.embedded.mni152 import save_nifti
from medimg.errors import atomic_output


def prepare_phantom(root: str | Path, num_images: int = 6, size: int = 32, num_classes: int = 3,
                    seed: int = 0) -> Path:
    """Write a synthetic 3D phantom dataset (MONAI ``create_test_image_3d``) and its manifest.

    Args:
        root: output folder; ``dataset.json`` is written there.
        num_images: number of volumes; the last third is the validation split.
        size: edge length of the cubic volumes.
        num_classes: label classes including background.
        seed: random seed (the same seed gives the same files).

    Returns:
        The manifest path.
    """
    root = Path(root)
    manifest = root / "dataset.json"
    prepare_once(root, manifest, lambda: _write_phantom(root, manifest, num_images, size, num_classes, seed))
    return manifest


def _write_phantom(root: Path, manifest: Path, num_images: int, size: int, num_classes: int, seed: int) -> None:
    """Write the volumes and, last, the manifest."""
    from monai.data import create_test_image_3d

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)
    entries = []
    for i in range(num_images):
        img, lab = create_test_image_3d(size, size, size, num_objs=6, rad_max=max(size // 5, 3),
                                        rad_min=max(size // 12, 2), noise_max=0.3,
                                        num_seg_classes=num_classes - 1, random_state=rng)
        affine = np.diag([1.0, 1.0, 1.0, 1.0])
        save_nifti(img.astype(np.float32), affine, root / f"img{i:02d}.nii.gz")
        save_nifti(lab.astype(np.uint8), affine, root / f"seg{i:02d}.nii.gz")
        entries.append({"image": f"img{i:02d}.nii.gz", "label": f"seg{i:02d}.nii.gz"})
    n_val = max(1, num_images // 3)
    labels = {"0": "background", **{str(c): f"object{c}" for c in range(1, num_classes)}}
    doc = {"name": "phantom", "labels": labels, "lr_swap": [],  # no sided labels: left-right flips are safe
           "training": entries[:-n_val], "validation": entries[-n_val:]}
    with atomic_output(manifest) as tmp:
        tmp.write_text(json.dumps(doc, indent=2))
