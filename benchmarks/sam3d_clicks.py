"""medsam3d on the real MNI152 T1: does one click land inside its own mask?

    python benchmarks/sam3d_clicks.py --bundle runs/medsam3d/<run>/bundle [--clicks 40]

Clicks are drawn (seeded) among white-matter voxels of the held-out posterior slab (y <= -28 mm)
in the model frame. For each click, the window centred on it is segmented from that one click;
the script prints how often the clicked voxel is in the mask (by depth of the click inside the
white matter) and the window Dice against the white matter connected to the click. Then it runs
the full growing-window inference (``medimg.infer``'s path) for a world-mm click, on the T1 and
on an LPS-stored copy, and reports whether the clicked voxel is in the output.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from medimg.bundle.loader import load_bundle
from medimg.data.embedded.mni152 import prepare_mni152
from medimg.data.promptable.patches import load_volumes
from medimg.predictors.prompting import segment_file


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--clicks", type=int, default=40)
    parser.add_argument("--device", default=None)
    parser.add_argument("--world", type=float, nargs=3, default=[-26.0, -10.0, 26.0])
    args = parser.parse_args()
    pred = load_bundle(args.bundle, args.device)
    root = prepare_mni152()
    image, label = load_volumes([{"image": str(root / "t1.nii.gz"), "label": str(root / "labels.nii.gz")}],
                                pred.pixdim, pred.intensity)[0]
    pred.set_volume(str(root / "t1.nii.gz"))
    wm = label == 2
    depth = ndimage.distance_transform_edt(wm)
    y_mm = pred.model_affine[1, 1] * np.arange(wm.shape[1]) + pred.model_affine[1, 3]
    held_out = wm & (y_mm <= -28)[None, :, None]
    rng = np.random.default_rng(0)
    cands = np.argwhere(held_out)
    rows = []
    for c in cands[rng.choice(len(cands), args.clicks, replace=False)]:
        origin = pred._window_origin(c.astype(float))
        prob = pred._run(pred._crop(pred.volume, origin), (c - origin)[None].astype(float), np.array([1]), None)
        target = pred._crop(wm.astype(np.uint8), origin) > 0
        comp, _ = ndimage.label(target)
        target = comp == comp[tuple(c - origin)]
        mask = prob > 0.5
        dice = 2 * (mask & target).sum() / max(mask.sum() + target.sum(), 1)
        rows.append((depth[tuple(c)], bool(mask[tuple(c - origin)]), dice))
    rows = np.array(rows, dtype=np.float64)
    print(f"{len(rows)} held-out white-matter clicks: clicked voxel in mask {rows[:, 1].mean():.2f}, "
          f"window Dice {rows[:, 2].mean():.3f}")
    for lo, hi in ((0, 1.5), (1.5, 2.5), (2.5, 99)):
        sel = rows[(rows[:, 0] >= lo) & (rows[:, 0] < hi)]
        if len(sel):
            print(f"  depth {lo}-{hi} voxels: n={len(sel)}, in mask {sel[:, 1].mean():.2f}, "
                  f"Dice {sel[:, 2].mean():.3f}")
    t1 = nib.load(str(root / "t1.nii.gz"))
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("ras", "lps"):
            vol, aff = np.asarray(t1.dataobj, dtype=np.float32), t1.affine
            if name == "lps":
                vol, aff = vol[::-1, ::-1].copy(), aff @ np.array(
                    [[-1, 0, 0, vol.shape[0] - 1], [0, -1, 0, vol.shape[1] - 1], [0, 0, 1, 0], [0, 0, 0, 1]])
            src = Path(tmp) / f"{name}.nii.gz"
            nib.save(nib.Nifti1Image(vol, aff), str(src))
            prompts = Path(tmp) / "p.json"
            prompts.write_text(f'{{"space": "world", "points": [{list(args.world)}], "point_labels": [1]}}')
            t = time.perf_counter()
            segment_file(pred, str(src), str(prompts), str(Path(tmp) / "seg.nii.gz"))
            took = time.perf_counter() - t
            seg = np.asarray(nib.load(str(Path(tmp) / "seg.nii.gz")).dataobj) > 0
            v = np.round(np.linalg.solve(aff, np.append(args.world, 1))[:3]).astype(int)
            wm_in = np.asarray(nib.load(str(root / "labels.nii.gz")).dataobj) == 2
            if name == "lps":
                wm_in = wm_in[::-1, ::-1]
            dice = 2 * (seg & wm_in).sum() / (seg.sum() + wm_in.sum())
            print(f"world click {args.world} on {name} copy: clicked voxel in mask {bool(seg[tuple(v)])}, "
                  f"mask {int(seg.sum())} voxels, whole-brain white-matter Dice {dice:.3f} "
                  f"(precision {(seg & wm_in).sum() / max(seg.sum(), 1):.3f}), {took:.1f} s")


if __name__ == "__main__":
    main()
