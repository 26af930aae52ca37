"""Promptable bundles on a real head (Colin27): what one white-matter click gives, through the predictor.

    apt-get install mricron-data      # ch2.nii.gz (T1 with skull and scalp), ch2bet.nii.gz, aal.nii.gz
    python benchmarks/cross_subject_prompts.py --bundle runs/medsam3d/<run>/bundle --bundle runs/litemedsam/<run>/bundle

Colin27 has no white-matter label, so this measures what can be checked against the references
it has: the brain extraction and the AAL atlas drawn on it (every AAL parcel is grey matter:
cortex, deep nuclei, cerebellar cortex). Clicks are drawn (seeded) among voxels that are surely
white matter: inside the brain mask, at least 4 mm from every AAL parcel and from the mask's edge,
and brighter than the median of such voxels (ventricles excluded). Each click is given in world mm,
as a user's prompts file would, to ``medimg.load_bundle(bundle).predict``; a 2D bundle segments
the click's own slice in its plane (``propagate: false``). Reported per bundle, mean over clicks:

- ``in mask``: the clicked voxel is in the mask;
- ``outside``: share of the mask outside the brain mask (the scalp, skull, neck);
- ``on AAL GM``: share of the mask on AAL grey-matter parcels (white matter should avoid them);
- mask size and seconds per click.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cross_subject import colin_arguments, table  # noqa: E402

from medimg.bundle.loader import load_bundle  # noqa: E402


def wm_clicks(t1: np.ndarray, brain: np.ndarray, aal: np.ndarray, affine: np.ndarray, n: int,
              seed: int = 0) -> np.ndarray:
    """``(n, 3)`` world-mm clicks on sure white matter (see the module docstring)."""
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    away = ndimage.distance_transform_edt(brain & (aal == 0), sampling=spacing) >= 4.0
    cand = away & (t1 > np.median(t1[away]))
    idx = np.argwhere(cand)
    pick = idx[np.random.default_rng(seed).choice(len(idx), n, replace=False)]
    return (affine @ np.c_[pick, np.ones(len(pick))].T).T[:, :3]


def evaluate(bundle: Path, subject: Path, clicks: np.ndarray, brain: np.ndarray, aal: np.ndarray,
             affine: np.ndarray, device: str = "cpu") -> dict[str, float]:
    """Mean figures over the clicks for one bundle."""
    predictor = load_bundle(bundle, device=device)
    flat = hasattr(predictor, "plane")  # a 2D bundle: the click's own slice
    rows = []
    for world in clicks:
        t = time.perf_counter()
        mask = np.asarray(predictor.predict(str(subject), points=[list(map(float, world))], point_labels=[1],
                                            space="world", propagate=not flat).array) > 0
        took = time.perf_counter() - t
        v = tuple(np.round(np.linalg.solve(affine, np.append(world, 1.0))[:3]).astype(int))
        size = max(int(mask.sum()), 1)
        rows.append((float(mask[v]), (mask & ~brain).sum() / size, (mask & (aal > 0)).sum() / size,
                     mask.sum(), took))
    r = np.asarray(rows, dtype=np.float64)
    return {"in_mask": float(r[:, 0].mean()), "outside": float(r[:, 1].mean()), "on_aal_gm": float(r[:, 2].mean()),
            "voxels": float(np.median(r[:, 3])), "seconds": float(r[:, 4].mean()), "clicks": len(r),
            "mode": "2D slice" if flat else "3D"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clicks", type=int, default=12)
    args, subject, brain, aal = colin_arguments(parser)
    img = nib.load(str(subject))
    t1 = np.asarray(img.dataobj, dtype=np.float32)
    clicks = wm_clicks(t1, brain, aal, img.affine, args.clicks)
    print(f"machine: {platform.machine()} {platform.processor()}; subject: Colin27 {t1.shape}; "
          f"{len(clicks)} white-matter clicks")
    columns = [("mode", "mode", 10, ""), ("in_mask", "in mask", 9, ".2f"), ("outside", "outside", 9, ".3f"),
               ("on_aal_gm", "on AAL GM", 11, ".3f"), ("voxels", "voxels", 9, ".0f"), ("seconds", "s/click", 9, ".1f")]
    table(args, lambda b: evaluate(b, subject, clicks, brain, aal, img.affine, args.device), columns)


if __name__ == "__main__":
    main()
