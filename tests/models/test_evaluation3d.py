"""The simulated 3D user of ``benchmarks/ship_promptable3d.py`` and the 3D card check, on a scripted predictor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medimg.io.image import Image
from medimg.predictors.evaluation3d import VolumeScorer, dice, score_volume, volume_targets


class Scripted:
    """Answers like a model that knows the target: a box gives the target inside the box; clicks give the
    target plus a spurious blob, which a negative click inside the blob removes."""

    def __init__(self, truth: np.ndarray, blob: np.ndarray) -> None:
        self.truth, self.blob, self.docs = truth, blob, []

    def segment_prompts(self, image, prompts, intensity=None):
        self.docs.append(prompts)
        if len(prompts.boxes):
            lo, hi = prompts.boxes[0][:3].astype(int), prompts.boxes[0][3:].astype(int)
            inside = np.zeros(self.truth.shape, bool)
            inside[lo[0]:hi[0] + 1, lo[1]:hi[1] + 1, lo[2]:hi[2] + 1] = True
            return (self.truth & inside).astype(np.uint8)
        negatives = [tuple(p.round().astype(int)) for p, lab in zip(prompts.points, prompts.point_labels) if not lab]
        pred = self.truth | (self.blob if not any(self.blob[n] for n in negatives) else False)
        return pred.astype(np.uint8)


@pytest.fixture
def case():
    z, y, x = np.mgrid[:24, :24, :24]
    truth = (x - 8) ** 2 + (y - 12) ** 2 + (z - 12) ** 2 <= 16
    blob = (x - 19) ** 2 + (y - 12) ** 2 + (z - 12) ** 2 <= 4
    brain = x < 17  # the blob lies outside the brain
    image = Image(np.zeros(truth.shape, np.float32), np.diag([2.0, 1.0, 1.0, 1.0]), Path("phantom.nii.gz"), "nifti")
    return truth, blob, brain, image


def test_box_then_clicks_with_a_negative_correction(case):
    truth, blob, brain, image = case
    scripted = Scripted(truth, blob)
    out = VolumeScorer(scripted, image, "mr", ("box", "click1", "click3"), brain).score(truth)
    assert out["box"] == 1.0
    assert out["click1"] == pytest.approx(dice(truth | blob, truth))
    assert out["outside_click1"] == pytest.approx(blob.sum() / (truth | blob).sum())
    assert out["click3"] == 1.0 and out["outside_click3"] == 0.0  # the negative click removed the blob
    first = scripted.docs[1]
    assert first.points.shape == (1, 3) and truth[tuple(first.points[0].round().astype(int))]
    second = scripted.docs[2]
    assert list(second.point_labels) == [1, 0] and blob[tuple(second.points[1].round().astype(int))]
    assert len(scripted.docs) == 3  # no error left after the correction: click3 reuses that answer


def test_score_volume_weights_structures_equally_and_skips_small_ones(case):
    truth, blob, brain, image = case
    label = truth.astype(np.int64) * 7
    label[blob] = 9
    targets = dict(volume_targets(label, {"ball": (7,), "bead": (9,)}, min_voxels=40))
    assert list(targets) == ["ball"]  # the 33-voxel bead is under min_voxels
    res = score_volume(Scripted(truth, blob), image, label, "mr", {"ball": (7,), "bead": (9,)}, 40,
                       ("box", "click1"))
    assert res["targets"] == 1 and res["mean"]["box"] == 1.0 and set(res["mean"]) == {"box", "click1"}
