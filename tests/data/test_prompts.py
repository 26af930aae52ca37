from __future__ import annotations

import numpy as np
import pytest

from medimg.data.promptable.simulation import box_from_mask, sample_clicks, sample_slices, split_targets


def _blob(shape=(40, 50), seed=0):
    rng = np.random.default_rng(seed)
    mask = np.zeros(shape, bool)
    c = [rng.integers(s // 2 - 3, s // 2 + 4) for s in shape]
    grid = np.indices(shape)
    mask[sum((g - ci) ** 2 for g, ci in zip(grid, c)) < 36] = True
    return mask


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("shape", [(40, 50), (20, 24, 18)])
def test_jittered_box_contains_the_mask(seed, shape):
    mask = _blob(shape, seed)
    box = box_from_mask(mask, jitter_px=3, jitter_frac=0.1, rng=np.random.default_rng(seed))
    nd = mask.ndim
    idx = np.argwhere(mask)
    assert (idx >= box[:nd]).all() and (idx <= box[nd:]).all()
    assert (box[:nd] >= 0).all() and (box[nd:] <= np.asarray(shape) - 1).all()


def test_tight_box_is_exact():
    mask = np.zeros((10, 12), bool)
    mask[2:5, 3:9] = True
    np.testing.assert_array_equal(box_from_mask(mask), [2, 3, 4, 8])


@pytest.mark.parametrize("seed", range(20))
def test_clicks_fall_on_the_right_side(seed):
    rng = np.random.default_rng(seed)
    target = _blob((40, 50), seed)
    pred = np.roll(target, 4, axis=0)  # half right, with a false-negative and a false-positive crescent
    points, labels = sample_clicks(target, pred, num=5, rng=rng)
    for p, lab in zip(points, labels):
        assert bool(target[tuple(p)]) == bool(lab)  # positive clicks inside the target, negative outside
    assert set(labels.tolist()) <= {0, 1}


def test_first_click_is_positive_inside_target():
    target = _blob((30, 30, 30), 1)
    points, labels = sample_clicks(target, None, num=3, rng=np.random.default_rng(0))
    assert labels.tolist() == [1, 1, 1]
    assert all(target[tuple(p)] for p in points)


def test_negative_click_targets_false_positives():
    target = np.zeros((30, 30), bool)
    target[5:10, 5:10] = True
    pred = target.copy()
    pred[18:28, 18:28] = True  # a big false-positive blob
    points, labels = sample_clicks(target, pred, num=1, rng=np.random.default_rng(0))
    assert labels.tolist() == [0] and pred[tuple(points[0])] and not target[tuple(points[0])]


def test_slices_favour_foreground():
    label = np.zeros((8, 8, 100), np.uint8)
    label[2:5, 2:5, 40:45] = 1
    idx = sample_slices(label, 400, foreground_weight=0.9, rng=np.random.default_rng(0))
    share = np.isin(idx, np.arange(40, 45)).mean()
    assert 0.85 <= share <= 0.97


def test_targets_per_label_and_component():
    label = np.zeros((20, 20), np.uint8)
    label[1:4, 1:4] = 1
    label[10:14, 10:14] = 1
    label[16:19, 2:5] = 2
    by_label = split_targets(label, "label")
    assert [v for v, _ in by_label] == [1, 2] and by_label[0][1].sum() == 9 + 16
    by_comp = split_targets(label, "component")
    assert sorted(m.sum() for _, m in by_comp) == [9, 9, 16]
