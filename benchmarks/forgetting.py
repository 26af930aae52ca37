"""What fine-tuning costs elsewhere: box Dice of promptable 2D bundles on structures they were not tuned on.

    apt-get install mricron-data      # Colin27 (ch2.nii.gz) and the AAL atlas drawn on it (aal.nii.gz)
    python benchmarks/forgetting.py --bundle ZERO_SHOT_BUNDLE --bundle FINE_TUNED_BUNDLE [--json out.json]

The default ``litemedsam`` run tunes on MNI152 white matter. Here each bundle's own predictor
(``medimg.load_bundle(b)``: its plane, its window) is given a tight box around each deep grey-matter
structure of the AAL atlas on Colin27, a real single-subject T1: caudate, putamen, pallidum,
thalamus, hippocampus and amygdala, left and right, on every ``--step``-th slice where the structure
covers at least ``--min-area`` pixels. The figure is the mean box Dice per structure, and overall
(each structure weighted equally). A zero-shot bundle (``bundle.max_epochs=0``: the released
weights, exported as they are) gives the "before".
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from medimg.bundle.loader import load_bundle  # noqa: E402
from medimg.data.promptable.simulation import box_from_mask  # noqa: E402

TEMPLATES = Path("/usr/share/mricron/templates")
STRUCTURES = {"caudate": (71, 72), "putamen": (73, 74), "pallidum": (75, 76), "thalamus": (77, 78),
              "hippocampus": (37, 38), "amygdala": (41, 42)}


def structure_dice(bundle: Path, image: nib.Nifti1Image, atlas: np.ndarray, step: int,
                   min_area: int) -> tuple[dict[str, float], int, float]:
    """Mean box Dice per structure, the number of prompts and the seconds they took."""
    predictor = load_bundle(bundle, device="cpu")
    predictor.set_volume(np.asarray(image.dataobj, dtype=np.float32), image.affine)
    frame = predictor.frame
    scores: dict[str, list[float]] = {}
    start = time.perf_counter()
    for name, values in STRUCTURES.items():
        for value in values:  # left, right
            mask = frame.to_working(atlas == value)
            slices = [k for k in range(mask.shape[2]) if mask[:, :, k].sum() >= min_area][::step]
            for k in slices:
                truth = mask[:, :, k]
                pred = predictor.predict_slice(k, box=box_from_mask(truth).tolist())[0]
                scores.setdefault(name, []).append(float(2 * (pred & truth).sum() / (pred.sum() + truth.sum())))
    seconds = time.perf_counter() - start
    return {n: float(np.mean(v)) for n, v in scores.items()}, sum(len(v) for v in scores.values()), seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bundle", action="append", required=True)
    parser.add_argument("--templates", default=str(TEMPLATES), help="folder with ch2.nii.gz and aal.nii.gz")
    parser.add_argument("--step", type=int, default=3, help="every n-th slice of each structure")
    parser.add_argument("--min-area", type=int, default=30)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    folder = Path(args.templates)
    if not (folder / "ch2.nii.gz").is_file():
        sys.exit(f"error: {folder / 'ch2.nii.gz'}: missing; apt-get install mricron-data")
    image = nib.load(folder / "ch2.nii.gz")
    atlas = np.asarray(nib.load(folder / "aal.nii.gz").dataobj).astype(np.int32)
    print(f"machine: {platform.machine()} {platform.processor() or ''}; Colin27 {image.shape}, AAL structures")
    results = {}
    for b in args.bundle:
        per, n, seconds = structure_dice(Path(b), image, atlas, args.step, args.min_area)
        per["mean"] = float(np.mean(list(per.values())))
        results[b] = {**per, "prompts": n, "seconds": seconds}
        print(b, " ".join(f"{k} {v:.3f}" for k, v in per.items()), f"({n} boxes, {seconds:.0f} s)", flush=True)
    if len(args.bundle) >= 2:
        first, last = results[args.bundle[0]]["mean"], results[args.bundle[-1]]["mean"]
        print(f"change of the mean, last bundle against the first: {last - first:+.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
