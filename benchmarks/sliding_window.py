"""Whole-volume inference of a segmentation bundle: the bundle's predictor against plain MONAI, same settings.

    python benchmarks/sliding_window.py --bundle <swin_unetr bundle, or tissue_t1> [--repeats 3]

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
    from medimg.predictors.segmentation import SegmentationPredictor

    pred = medimg.load_bundle(bundle, "cpu")  # the default: OpenVINO on a CPU
    eager = SegmentationPredictor(pred.network, pred.preprocessing, pred.inferer, pred.postprocessing, "cpu")
    path = str(mni152_source_dir() / MNI_FILES["t1"])
    x = pred.preprocessing({"image": path})["image"][None]
    inf = pred.inferer

    def plain() -> torch.Tensor:  # what a MONAI user writes
        with torch.no_grad():
            return sliding_window_inference(x, inf.roi_size, inf.sw_batch_size, pred.network, overlap=inf.overlap,
                                            mode="gaussian")

    ref_logits, fast_logits = _tensor(plain()), _tensor(pred.logits(x))
    same_eager = torch.equal(_tensor(eager.logits(x)), ref_logits)
    diff = float((fast_logits - ref_logits).abs().max()) / float(ref_logits.abs().max())
    agree = float((fast_logits.argmax(1) == ref_logits.argmax(1)).float().mean())
    ours = times(lambda: pred.logits(x), repeats)
    ref = times(plain, repeats)
    ours_eager = times(lambda: eager.logits(x), repeats)
    whole = times(lambda: pred.predict(path), repeats)
    shape = "x".join(str(s) for s in x.shape[2:])
    name = f"{type(pred.network).__name__} (CPU)"
    settings = f"roi {list(inf.roi_size)}, sw batch {inf.sw_batch_size}, overlap {inf.overlap}, gaussian"
    return [Result(name, f"sliding window over the {shape} model-space volume", ours, ref,
                   "MONAI sliding_window_inference", ">= 1.0x faster (ratio <= 1)",
                   [f"{settings}; the default (OpenVINO f32): logits within {diff:.1e} of MONAI's (relative), "
                    f"{agree:.4%} of voxel labels equal",
                    f"backend=torch (MONAI's inferer on the network, inference_mode): p50 "
                    f"{Result.pct(ours_eager, 50):.2f} s, logits identical to MONAI's: {same_eager}"]),
            Result(name, "whole MNI152 T1 through predictor.predict (read to labels)", whole, ref,
                   "MONAI sliding window alone", "reported")]


def main() -> None:
    cli(run, lambda p: (p.add_argument("--bundle", required=True), p.add_argument("--repeats", type=int, default=3)))


if __name__ == "__main__":
    main()
