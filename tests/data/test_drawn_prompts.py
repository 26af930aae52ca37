"""Scribbles and lassos: rasterising, parsing (voxel and world), and what a predictor does with a lasso."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from medimg.errors import DataError
from medimg.io.drawn import make_lasso, rasterize_polyline, scribble_clicks
from medimg.io.prompts import parse_prompts
from medimg.predictors.prompting import PromptPredictorBase, lasso_box


def test_polyline_is_rasterised_voxel_by_voxel_in_order():
    vox = rasterize_polyline(np.array([[0, 0, 0], [10, 4, 0], [10, 4, 6]]))
    assert vox[0].tolist() == [0, 0, 0] and vox[-1].tolist() == [10, 4, 6]
    steps = np.abs(np.diff(vox, axis=0))
    assert steps.max() == 1 and (steps.sum(1) > 0).all()  # connected, no repeats
    assert len(vox) == 11 + 6


def test_scribble_becomes_evenly_spaced_clicks_on_the_stroke():
    stroke = np.array([[5.0, 5.0], [5.0, 45.0]])
    clicks = scribble_clicks(stroke, step=8.0)
    assert len(clicks) == 6 and (clicks[:, 0] == 5).all()
    assert np.all(np.diff(clicks[:, 1]) > 5) and 5 <= clicks[:, 1].min() and clicks[:, 1].max() <= 45
    assert len(scribble_clicks(np.array([[3.0, 3.0]]))) == 1  # a dot is one click
    assert len(scribble_clicks(np.array([[0.0, 0.0], [0.0, 500.0]]))) == 12  # capped


def test_lasso_fills_its_contour_on_its_slice_only():
    square = [[4, 10, 7], [4, 20, 7], [14, 20, 7], [14, 10, 7]]
    lasso = make_lasso(np.array(square, dtype=float), (30, 30, 12))
    assert lasso.axis == 2 and lasso.index == 7
    inside = lasso.inside((30, 30, 12))
    assert inside[:, :, 7].sum() == 11 * 11 and inside.sum() == 121  # outline included
    keep = lasso.keep((30, 30, 12))
    assert keep[:, :, 6].all() and not keep[0, 0, 7] and keep[9, 15, 7]
    assert lasso.box().tolist() == [4, 10, 7, 14, 20, 7]
    thick = lasso_box(lasso, (30, 30, 12), flat=False)
    assert thick.tolist() == [4, 10, 2, 14, 20, 11]  # grown by half the in-plane extent (5), clipped
    with pytest.raises(ValueError, match="one slice"):
        make_lasso(np.array([[0, 0, 0], [5, 5, 3], [9, 0, 1]], dtype=float), (30, 30, 12))


def test_prompts_json_reads_scribbles_and_lassos_in_voxel_and_world_space():
    shape = (40, 40, 20)
    lps = np.diag([-1.0, -1.0, 2.0, 1.0])
    lps[:3, 3] = [39.0, 39.0, 0.0]
    doc = {"space": "voxel", "points": [[10, 10, 5]],
           "scribbles": [{"points": [[12, 12, 5], [12, 28, 5]], "label": 1}, {"points": [[30, 30, 5]], "label": 0}],
           "lassos": [[[5, 5, 9], [5, 15, 9], [15, 15, 9]]]}
    p = parse_prompts(doc, shape, lps)
    assert len(p.points) == 1 + 3 + 1 and p.point_labels.tolist() == [1, 1, 1, 1, 0]  # 17 voxels: 3 clicks
    assert len(p.lassos) == 1 and p.lassos[0].axis == 2 and p.lassos[0].index == 9
    # the same prompts in world mm give the same voxels
    to_world = lambda v: (lps @ np.append(np.asarray(v, float), 1.0))[:3].tolist()  # noqa: E731
    world = {"space": "world", "points": [to_world([10, 10, 5])],
             "scribbles": [{"points": [to_world(v) for v in s["points"]], "label": s["label"]}
                           for s in doc["scribbles"]],
             "lassos": [[to_world(v) for v in doc["lassos"][0]]]}
    pw = parse_prompts(world, shape, lps)
    np.testing.assert_allclose(pw.points, p.points, atol=1e-6)
    np.testing.assert_allclose(pw.lassos[0].vertices, p.lassos[0].vertices, atol=1e-6)
    assert parse_prompts({"lassos": doc["lassos"]}, shape, np.eye(4)).lassos  # a lasso alone is a prompt


@pytest.mark.parametrize("doc, match", [
    ({"scribbles": [{"points": [[1, 2, 3]], "label": 2}]}, "scribbles\\[0\\]"),
    ({"scribbles": [[[1, 2, 3]]]}, "scribbles\\[0\\]"),
    ({"lassos": [[[1, 2, 3], [4, 5, 3]]]}, "at least 3 vertices"),
    ({"lassos": [[[1, 2, 3], [4, 5, 6], [7, 1, 9]]]}, "one slice"),
    ({"lassos": [[[1, 2, 3], [4, 5, 3], [70, 1, 3]]]}, "outside the image"),
    ({"scribbles": [{"points": [[1, 2]]}]}, "3 numbers"),
])
def test_bad_drawn_prompts_name_the_file_and_the_problem(doc, match):
    with pytest.raises(DataError, match=match):
        parse_prompts(doc, (40, 40, 20), np.eye(4), "p.json")


class _Everything(PromptPredictorBase):
    """A predictor that answers every prompt with the whole image (to see what the lasso does)."""

    def __init__(self) -> None:
        self.boxes = []

    def prepare(self, image, intensity):
        pass

    def segment_object(self, image, box=None, points=None, point_labels=None, propagate=True, ordered=False):
        self.boxes.append(box)
        return np.ones(image.array.shape, dtype=bool)


def test_a_lasso_is_one_object_cut_to_its_contour_on_its_slice():
    from medimg.io.image import Image

    image = Image(np.zeros((30, 30, 12), np.float32), np.eye(4), path="x", kind="nifti")
    prompts = parse_prompts({"boxes": [[0, 0, 0, 29, 29, 11]], "lassos": [[[4, 10, 7], [4, 20, 7], [14, 20, 7]]],
                             "points": [[1, 1, 1]]}, (30, 30, 12), np.eye(4))
    predictor = _Everything()
    labels = predictor.segment_prompts(image, prompts)
    assert predictor.boxes[1].tolist() == [4, 10, 7, 14, 20, 7] and predictor.boxes[2] is None
    assert (labels == 1).all()  # the box object came first and took every voxel
    predictor = _Everything()
    labels = predictor.segment_prompts(image, parse_prompts({"lassos": [[[4, 10, 7], [4, 20, 7], [14, 20, 7]]]},
                                                            (30, 30, 12), np.eye(4)))
    assert (labels[:, :, 6] == 1).all() and labels[:, :, 7].sum() == 66  # the triangle, outline included


def test_lasso_drawn_on_another_view_segments_the_object_through_the_volume(tmp_path):
    """A sagittal lasso on an axial-plane LiteMedSAM: sliced sagittally, propagated, cut to the contour."""
    from medimg.models import build_network
    from medimg.predictors.promptable import PromptablePredictor
    from medimg.predictors.prompting import segment_file

    grid = np.indices((40, 64, 64)).astype(np.float32)
    inside = ((grid[0] - 20) / 7) ** 2 + ((grid[1] - 32) / 20) ** 2 + ((grid[2] - 30) / 16) ** 2 <= 1
    vol = (np.where(inside, 180.0, 20.0) + np.random.default_rng(0).normal(0, 5, inside.shape)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.diag([2.0, 0.8, 0.8, 1.0])), str(tmp_path / "v.nii.gz"))
    idx = np.argwhere(inside[20])  # the sagittal slice i = 20: (j, k)
    (j0, k0), (j1, k1) = idx.min(0) - 2, idx.max(0) + 2
    lasso = [[20, j0, k0], [20, j0, k1], [20, j1, k1], [20, j1, k0]]
    (tmp_path / "p.json").write_text(json.dumps({"lassos": [np.asarray(lasso).tolist()]}))
    predictor = PromptablePredictor(build_network("litemedsam", pretrained=True), plane="axial")
    segment_file(predictor, str(tmp_path / "v.nii.gz"), str(tmp_path / "p.json"), str(tmp_path / "o.nii.gz"))
    mask = np.asarray(nib.load(str(tmp_path / "o.nii.gz")).dataobj) == 1
    assert set(predictor._planes) == {"sagittal"}  # sliced along the view the lasso was drawn on
    here = mask[20]
    assert 2 * (here & inside[20]).sum() / (here.sum() + inside[20].sum()) > 0.85
    assert not mask[20, :, : k0].any() and not mask[20, :, k1 + 1:].any()  # nothing outside the contour there
    assert mask[[14, 26]].any()  # and it went on through the volume
    assert 2 * (mask & inside).sum() / (mask.sum() + inside.sum()) > 0.7
