"""Main-component post-processing: what it removes, what it keeps, in millimetres, and when a bundle uses it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medimg.data.postprocess import (
    MAIN_COMPONENT_TOLERANCE,
    KeepMainComponentd,
    choose_main_component,
    ellipsoid,
    keep_main_component,
)
from medimg.errors import ConfigError


def head_phantom(bridge: int = 1) -> np.ndarray:
    """A two-label 'brain' (sphere, WM core), a detached 'eye' and a 'muscle' joined to it by a thin bridge."""
    z, y, x = np.mgrid[:48, :48, :48]
    r = np.sqrt((z - 24) ** 2 + (y - 24) ** 2 + (x - 20) ** 2)
    lab = np.zeros((48, 48, 48), np.uint8)
    lab[r < 14] = 1
    lab[r < 8] = 2
    lab[4:10, 4:10, 40:46] = 2  # detached
    lab[20:28, 20:28, 40:46] = 1  # muscle block, x 40..45
    lab[24:24 + bridge, 24:24 + bridge, 33:40] = 1  # bridge from the sphere's surface (x = 33) to the block
    return lab


def test_plain_largest_component_drops_detached_parts_only():
    lab = head_phantom()
    out = keep_main_component(lab)
    assert out.dtype == lab.dtype and out.shape == lab.shape
    assert not out[4:10, 4:10, 40:46].any()  # the detached blob is gone
    assert out[20:28, 20:28, 40:46].all()  # bridged: still one component without an opening
    np.testing.assert_array_equal(out[:, :, :34], lab[:, :, :34])  # the sphere keeps its labels


def test_opening_cuts_thin_bridges_and_keeps_the_organ():
    lab = head_phantom(bridge=2)
    out = keep_main_component(lab, spacing=(1.0, 1.0, 1.0), opening_mm=2.0)
    assert not out[20:28, 20:28, 40:46].any() and not out[4:10, 4:10, 40:46].any()
    sphere = np.zeros_like(lab)
    sphere[:, :, :34] = lab[:, :, :34]
    np.testing.assert_array_equal(out[:, :, :33], sphere[:, :, :33])
    assert set(np.unique(out)) == {0, 1, 2}


def test_opening_is_in_millimetres():
    lab = head_phantom(bridge=3)
    # 3-voxel bridge: 3 mm thick at 1 mm voxels (survives a 1 mm opening), 1.5 mm at 0.5 mm voxels (cut)
    assert keep_main_component(lab, (1.0, 1.0, 1.0), opening_mm=1.0)[20:28, 20:28, 40:46].all()
    assert not keep_main_component(lab, (0.5, 0.5, 0.5), opening_mm=1.0)[20:28, 20:28, 40:46].any()
    assert ellipsoid(2.0, (1.0, 1.0, 5.0)).shape == (5, 5, 1)  # no opening across 5 mm slices
    assert ellipsoid(0.5, (1.0, 1.0, 1.0)) is None


def test_empty_and_dictionary_transform_keep_meta():
    assert not keep_main_component(np.zeros((8, 8, 8), np.uint8)).any()
    lab = head_phantom(bridge=3)
    affine = torch.diag(torch.tensor([0.5, 0.5, 0.5, 1.0], dtype=torch.float64))
    pred = MetaTensor(torch.as_tensor(lab[None]), affine=affine)
    out = KeepMainComponentd("pred", opening_mm=1.0)({"pred": pred})["pred"]
    assert isinstance(out, MetaTensor) and torch.equal(out.affine, affine) and out.shape == pred.shape
    assert not out[0, 20:28, 20:28, 40:46].any()  # spacing came from the affine: 1.5 mm bridge cut
    same = KeepMainComponentd("pred", enabled=False, opening_mm=1.0)({"pred": pred})["pred"]
    assert torch.equal(same, pred)


def test_validation_decides():
    before = {"val/dice": 0.70}
    assert choose_main_component("auto", {**before, "val/dice_main_component": 0.70 - MAIN_COMPONENT_TOLERANCE / 2})
    # several separate organs: keeping one component costs a lot, so it is never chosen
    assert not choose_main_component("auto", {**before, "val/dice_main_component": 0.45})
    assert not choose_main_component("auto", before)  # nothing measured: outputs stay as trained
    assert choose_main_component(True, before) and not choose_main_component(False, {})
    with pytest.raises(ConfigError, match="keep_main_component"):
        choose_main_component("yes", before)
