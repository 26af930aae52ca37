"""Time medimg's image loading against raw SimpleITK and nibabel in the same run.

    python benchmarks/load.py [--repeats 15]

Reads the real MNI152 T1 (197x233x189, .nii.gz as shipped in nilearn, and an uncompressed .nii
copy) into a float32 array with its affine, and prints the median times and medimg's ratio to each
reference. Target: medimg <= 1.2x SimpleITK.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

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


def _time(fn, path: Path, repeats: int) -> float:
    fn(path)  # warm the page cache and imports
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(path)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    src = mni152_source_dir() / MNI_FILES["t1"]
    with tempfile.TemporaryDirectory() as tmp:
        gz = Path(tmp) / "t1.nii.gz"
        shutil.copy(src, gz)
        raw = Path(tmp) / "t1.nii"
        nib.save(nib.load(str(gz)), str(raw))
        print(f"machine: {platform.machine()} {platform.processor() or ''} python {platform.python_version()}; "
              f"SimpleITK {sitk.Version_VersionString()}, nibabel {nib.__version__}")
        print(f"{'file':<12}{'medimg ms':>11}{'SimpleITK ms':>14}{'nibabel ms':>12}{'vs SITK':>9}{'vs nib':>8}")
        for path in (gz, raw):
            m = _time(_medimg, path, args.repeats)
            s = _time(_sitk, path, args.repeats)
            n = _time(_nibabel, path, args.repeats)
            print(f"{path.name:<12}{m * 1e3:>11.1f}{s * 1e3:>14.1f}{n * 1e3:>12.1f}{m / s:>8.2f}x{m / n:>7.2f}x")


if __name__ == "__main__":
    main()
