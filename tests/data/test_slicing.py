from __future__ import annotations

import numpy as np
import pytest

from medimg.data.slicing import SliceFrame, intensity_window, prepare_volume, window_to_uint8
from tests.helpers import flip_to_lps


def _volume(shape=(7, 9, 11), seed=0):
    return np.random.default_rng(seed).random(shape).astype(np.float32) * 1000


AFFINE = np.diag([2.0, 1.5, 3.0, 1.0])


def _permuted(vol, affine, order=(2, 0, 1)):
    return np.transpose(vol, order), affine[:, [*order, 3]]


@pytest.mark.parametrize("plane,axis", [("sagittal", 0), ("coronal", 1), ("axial", 2)])
def test_lps_and_permuted_copies_give_the_same_working_volume(plane, axis):
    vol = _volume()
    ref, frame = prepare_volume(vol, AFFINE, plane, "mr")
    assert frame.slice_axis == axis and ref.shape[2] == vol.shape[axis]
    lps, lps_aff = flip_to_lps(vol, AFFINE)
    perm, perm_aff = _permuted(vol, AFFINE)
    for v, a in ((lps, lps_aff), (perm, perm_aff)):
        work, f = prepare_volume(v, a, plane, "mr")
        np.testing.assert_array_equal(work, ref)
        np.testing.assert_array_equal(f.from_working(work), window_to_uint8(v, "mr"))  # exact inverse


@pytest.mark.parametrize("plane", ["sagittal", "coronal", "axial"])
def test_points_and_boxes_follow_the_voxels(plane):
    vol = _volume()
    lps, lps_aff = flip_to_lps(vol, AFFINE)
    perm, perm_aff = _permuted(lps, lps_aff)
    frame = SliceFrame.from_affine(perm_aff, perm.shape, plane)
    work = frame.to_working(perm)
    pts = np.argwhere(np.ones(perm.shape, bool))[::37]
    wpts = frame.points_to_working(pts).astype(int)
    np.testing.assert_array_equal(work[tuple(wpts.T)], perm[tuple(pts.T)])
    np.testing.assert_allclose(frame.points_from_working(wpts), pts)
    box = frame.boxes_to_working(np.array([[1, 2, 3, 4, 5, 6]]))[0]
    assert (box[:3] <= box[3:]).all()


def test_intensity_presets():
    vol = np.linspace(-1000, 1000, 1000, dtype=np.float32).reshape(10, 10, 10)
    assert intensity_window(vol, "ct_abdomen") == (-160.0, 240.0)
    u8 = window_to_uint8(vol, "ct_lung")
    assert u8.dtype == np.uint8 and u8.min() == 60 and u8.max() == 255  # -1000 HU: (350 / 1500) * 255
    assert window_to_uint8(np.array([-160.0, 40.0, 240.0]), "ct_abdomen").tolist() == [0, 128, 255]
    lo, hi = intensity_window(vol, "mr")
    assert lo == pytest.approx(np.percentile(vol, 0.5)) and hi == pytest.approx(np.percentile(vol, 99.5))
