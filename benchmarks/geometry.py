"""Run a trained bundle on the MNI152 T1 and on LPS / oblique / permuted copies; report geometry and agreement.

    python benchmarks/geometry.py --bundle runs/swin_unetr/<run>/bundle

The oblique copy keeps the voxels and rotates the affine (25 deg about z, 10 deg about x). Prints
the max affine difference between each output and its input, and the voxel agreement / foreground
Dice of each copy's prediction (mapped back to the original array order) with the original's.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from medimg.bundle.loader import load_bundle  # noqa: E402
from medimg.data.embedded.mni152 import MNI_FILES, mni152_source_dir  # noqa: E402
from tests.helpers import flip_to_lps, oblique_affine  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bundle", required=True)
    args = parser.parse_args()
    src = nib.load(str(mni152_source_dir() / MNI_FILES["t1"]))
    vol, aff = np.asarray(src.dataobj, dtype=np.float32), src.affine
    variants = {
        "original": (vol, aff, lambda p: p),
        "lps": (*flip_to_lps(vol, aff), lambda p: p[::-1, ::-1]),
        "oblique": (vol, oblique_affine(oblique_affine(aff, 25.0, axis=2), 10.0, axis=0), lambda p: p),
        "permuted": (vol.transpose(2, 0, 1).copy(), aff[:, [2, 0, 1, 3]], lambda p: p.transpose(1, 2, 0)),
    }
    predictor = load_bundle(args.bundle)
    preds = {}
    print(f"{'input':<10}{'shape ok':>9}{'max |affine diff| mm':>22}{'agreement':>11}{'fg Dice':>9}{'time s':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (v, a, back) in variants.items():
            path = Path(tmp) / f"{name}.nii.gz"
            nib.save(nib.Nifti1Image(v, a), str(path))
            t = time.perf_counter()
            out = predictor.predict(path).save(Path(tmp) / f"{name}_seg.nii.gz")
            elapsed = time.perf_counter() - t
            written = nib.load(str(out))
            preds[name] = back(np.asarray(written.dataobj))
            o = preds["original"]
            p = preds[name]
            dice = 2 * np.logical_and(o > 0, p > 0).sum() / max((o > 0).sum() + (p > 0).sum(), 1)
            print(f"{name:<10}{str(written.shape == v.shape):>9}{np.abs(written.affine - a).max():>22.2e}"
                  f"{(p == o).mean():>11.4f}{dice:>9.4f}{elapsed:>8.1f}")


if __name__ == "__main__":
    main()
