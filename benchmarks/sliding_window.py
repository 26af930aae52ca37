"""Swin-UNETR whole-volume inference: the bundle's predictor against plain MONAI, same settings.

    python benchmarks/sliding_window.py --bundle <swin_unetr bundle> [--repeats 3]

On the real MNI152 T1. Two measures:

- the network part: the predictor's inferer (the bundle's ``SlidingWindowInferer``) against
  ``monai.inferers.sliding_window_inference`` called directly with the bundle's roi size,
  sw batch size, overlap and Gaussian blending, on the same preprocessed tensor; the logits must
  be identical;
- the whole volume as users get it (``predictor.predict(path)``: read, resample, sliding window,
  invert to the input grid), against the same plain MONAI call plus medimg's pre- and
  postprocessing timed apart (for reference).
"""

from __future__ import annotations

import torch
from monai.inferers import sliding_window_inference
from timing import Result, cli, times

import medimg
from medimg.data.embedded.mni152 import MNI_FILES, mni152_source_dir


def _tensor(t: torch.Tensor) -> torch.Tensor:
    return t.as_tensor() if hasattr(t, "as_tensor") else t


def run(bundle: str, repeats: int = 3) -> list[Result]:
    """Time the predictor's sliding window and whole-volume prediction against plain MONAI."""
    pred = medimg.load_bundle(bundle, "cpu")
    path = str(mni152_source_dir() / MNI_FILES["t1"])
    x = pred.preprocessing({"image": path})["image"][None]
    inf = pred.inferer

    def plain() -> torch.Tensor:  # what a MONAI user writes
        with torch.no_grad():
            return sliding_window_inference(x, inf.roi_size, inf.sw_batch_size, pred.network, overlap=inf.overlap,
                                            mode="gaussian")

    same = torch.equal(_tensor(pred.logits(x)), _tensor(plain()))
    ours = times(lambda: pred.logits(x), repeats)
    ref = times(plain, repeats)
    whole = times(lambda: pred.predict(path), repeats)
    shape = "x".join(str(s) for s in x.shape[2:])
    settings = f"roi {list(inf.roi_size)}, sw batch {inf.sw_batch_size}, overlap {inf.overlap}, gaussian"
    return [Result("Swin-UNETR (CPU)", f"sliding window over the {shape} model-space volume", ours, ref,
                   "MONAI sliding_window_inference", "<= 1.0x", [f"{settings}; identical logits: {same}"]),
            Result("Swin-UNETR (CPU)", "whole MNI152 T1 through predictor.predict (read to labels)", whole, ref,
                   "MONAI sliding window alone", "reported")]


def main() -> None:
    cli(run, lambda p: (p.add_argument("--bundle", required=True), p.add_argument("--repeats", type=int, default=3)))


if __name__ == "__main__":
    main()
