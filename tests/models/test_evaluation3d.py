"""The simulated 3D user of ``benchmarks/ship_promptable3d.py`` and ``benchmarks/propagation_vs_3d.py`` and the 3D
card check, on scripted predictors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medimg.io.image import Image
from medimg.predictors.evaluation3d import VolumeScorer, dice, same_prompts, score_models, score_volume, volume_targets


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


class Whole:
    """Answers every prompt with its box, or with the whole volume: another model, other corrections."""

    def segment_prompts(self, image, prompts, intensity=None):
        out = np.zeros(image.array.shape, np.uint8)
        if len(prompts.boxes):
            lo, hi = prompts.boxes[0][:3].astype(int), prompts.boxes[0][3:].astype(int)
            out[lo[0]:hi[0] + 1, lo[1]:hi[1] + 1, lo[2]:hi[2] + 1] = 1
        else:
            out[:] = 1
        return out


def test_two_models_get_the_same_targets_box_and_first_click(case):
    """The fairness rule of ``benchmarks/propagation_vs_3d.py``: same targets, same box, same first click;
    the corrections are each model's own."""
    truth, blob, brain, image = case
    label = truth.astype(np.int64) * 7
    label[blob] = 9
    values = {"ball": (7,), "bead": (9,)}
    res = score_models({"scripted": Scripted(truth, blob), "whole": Whole()}, image, label, "mr", values, 20,
                       brain=brain)
    a, b = res["scripted"], res["whole"]
    assert list(a["structures"]) == list(b["structures"]) == ["ball", "bead"]
    assert a["structures"]["ball"]["box"] == 1.0 and b["structures"]["ball"]["box"] < 1.0  # the answers differ ...
    for name in ("ball", "bead"):
        assert a["prompts"][name][:2] == b["prompts"][name][:2]  # ... the box and first click do not
        assert [d["prompt"] for d in b["prompts"][name]] == ["box", "click1", "click2", "click3"]
    assert a["prompts"]["ball"][2] != b["prompts"]["ball"][2]  # a correction follows the model's own error
    assert all(r["cold_click_s"] > 0 and set(r["seconds"]) >= {"box", "click1"} for r in res.values())
    b["prompts"]["bead"][0] = {**b["prompts"]["bead"][0], "boxes": [[0, 0, 0, 23, 23, 23]]}
    with pytest.raises(AssertionError, match="bead"):
        same_prompts(res)
    del b["structures"]["bead"]
    with pytest.raises(AssertionError, match="other targets"):
        same_prompts(res)
