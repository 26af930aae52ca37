"""The simulated 2D user of ``benchmarks/interactive.py``: compact targets reported apart, on a scripted predictor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from skimage.morphology import convex_hull_image

from medimg.data.slicing import SliceFrame
from medimg.io.image import Image
from medimg.predictors.evaluation import COMPACT_SOLIDITY, score_case, solidity


class Scripted:
    """Answers a box with the convex hull of the truth inside it (a model that fills in concavities), and
    clicks with the truth plus one stray pixel row."""

    def __init__(self, truth: np.ndarray) -> None:
        self.truth = truth

    def for_plane(self, plane: str) -> Scripted:
        return self

    def prepare(self, image: Image, intensity: str | None) -> None:
        self.frame = SliceFrame.from_affine(image.affine, image.array.shape, "axial")

    def segment_prompts(self, image: Image, prompts, intensity: str | None = None) -> np.ndarray:
        if len(prompts.boxes):
            lo, hi = prompts.boxes[0][:3].astype(int), prompts.boxes[0][3:].astype(int)
            inside = np.zeros(self.truth.shape, bool)
            inside[lo[0]:hi[0] + 1, lo[1]:hi[1] + 1, lo[2]:hi[2] + 1] = True
            out = self.truth & inside
            for k in range(out.shape[2]):
                if out[:, :, k].any():
                    out[:, :, k] = convex_hull_image(out[:, :, k])
            return out.astype(np.uint8)
        out = self.truth.copy()
        out[0] = True  # a stray row: clicks score below 1
        return out.astype(np.uint8)


def test_solidity_tells_a_disc_from_a_c_and_a_ring():
    y, x = np.mgrid[:60, :60]
    r2 = (y - 30) ** 2 + (x - 30) ** 2
    disc, ring = r2 < 400, (r2 < 400) & (r2 > 150)
    c = disc.copy()
    c[25:35, 30:] = False
    assert solidity(disc) > 0.95 > COMPACT_SOLIDITY
    assert solidity(c) < COMPACT_SOLIDITY and solidity(ring) < 0.7


def test_compact_targets_are_reported_apart_and_weighted_equally():
    y, x = np.mgrid[:64, :64]
    disc = ((y - 16) ** 2 + (x - 16) ** 2 < 100)[..., None].repeat(4, axis=2)
    arc = (((y - 44) ** 2 + (x - 44) ** 2 < 225) & ((y - 44) ** 2 + (x - 44) ** 2 > 100) & (x < 50))
    label = disc.astype(np.int64) + 2 * arc[..., None].repeat(4, axis=2)
    image = Image(np.zeros(label.shape, np.float32), np.eye(4), Path("phantom.nii.gz"), "nifti")
    res = score_case(Scripted(label > 0), image, label, "mr", ["axial"], {"disc": (1,), "arc": (2,)}, 2, 20,
                     ("box", "click1"))
    assert res["targets"] == 4 and res["compact"]["targets"] == 2  # the disc's two slices only
    assert res["compact"]["box"] > 0.98  # the disc fills its hull
    arc_box = res["structures"]["arc"]["box"]
    assert arc_box < 0.8 and res["mean"]["box"] == pytest.approx((res["structures"]["disc"]["box"] + arc_box) / 2)
    assert res["compact"]["click1"] == pytest.approx(res["structures"]["disc"]["click1"])
    assert res["compact"]["click1"] < 1.0


def test_a_case_without_compact_targets_reports_none_and_stays_strict_json():
    """Only the arc: the compact mean is of nothing, and a card written from it must parse in a browser."""
    import json

    y, x = np.mgrid[:64, :64]
    arc = (((y - 44) ** 2 + (x - 44) ** 2 < 225) & ((y - 44) ** 2 + (x - 44) ** 2 > 100) & (x < 50))
    label = 2 * arc[..., None].repeat(4, axis=2).astype(np.int64)
    image = Image(np.zeros(label.shape, np.float32), np.eye(4), Path("phantom.nii.gz"), "nifti")
    res = score_case(Scripted(label > 0), image, label, "mr", ["axial"], {"arc": (2,)}, 2, 20, ("box", "click1"))
    assert res["targets"] == 2 and res["compact"]["targets"] == 0
    assert "box" not in res["compact"] and "solidity" in res["compact"]["note"]
    json.dumps(res, allow_nan=False)
