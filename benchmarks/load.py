"""Time medimg's image loading against raw SimpleITK and nibabel in the same run.

    python benchmarks/load.py [--repeats 15]

Reads the real MNI152 T1 (197x233x189, .nii.gz as shipped in nilearn, and an uncompressed .nii
copy) into a float32 array with its affine, and prints the median times and medimg's ratio to each
reference. Target: medimg <= 1.2x SimpleITK.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from timing import Result, cli, times

from medimg.data.embedded.mni152 import MNI_FILES, mni152_source_dir
from medimg.io.image import read_image


def _sitk(path: Path) -> np.ndarray:
    img = sitk.ReadImage(str(path))
    arr = sitk.GetArrayFromImage(img).astype(np.float32)
    img.GetDirection(), img.GetOrigin(), img.GetSpacing()
    return arr


def _nibabel(path: Path) -> np.ndarray:
    img = nib.load(str(path))
    arr = img.get_fdata(dtype=np.float32)
    _ = img.affine
    return arr


def _medimg(path: Path) -> np.ndarray:
    return read_image(path).array


def run(repeats: int = 15) -> list[Result]:
    """medimg's read of the MNI152 T1 (.nii.gz as shipped, and .nii) against SimpleITK; nibabel in the notes."""
    src = mni152_source_dir() / MNI_FILES["t1"]
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        gz = Path(tmp) / "t1.nii.gz"
        shutil.copy(src, gz)
        raw = Path(tmp) / "t1.nii"
        nib.save(nib.load(str(gz)), str(raw))
        for path in (gz, raw):
            ours = times(lambda p=path: _medimg(p), repeats)
            ref = times(lambda p=path: _sitk(p), repeats)
            nibabel = times(lambda p=path: _nibabel(p), repeats)
            out.append(Result("image loading", f"MNI152 T1 {path.name} to float32 + affine", ours, ref,
                              f"SimpleITK {sitk.Version_VersionString()}", "<= 1.2x",
                              [f"nibabel {nib.__version__}: p50 {Result.pct(nibabel, 50) * 1e3:.1f} ms"]))
    return out


def main() -> None:
    cli(run, lambda p: p.add_argument("--repeats", type=int, default=15))


if __name__ == "__main__":
    main()
