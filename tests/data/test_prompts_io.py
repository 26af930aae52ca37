from __future__ import annotations

import json

import numpy as np
import pytest
from nibabel.affines import apply_affine

from medimg.errors import DataError
from medimg.io.prompts import load_prompts
from tests.helpers import flip_to_lps


def _rot_z(deg: float) -> np.ndarray:
    t = np.deg2rad(deg)
    r = np.eye(4)
    r[:2, :2] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    return r


def _write(tmp_path, doc):
    p = tmp_path / "p.json"
    p.write_text(json.dumps(doc))
    return p


def test_world_box_on_oblique_image_transforms_every_corner(tmp_path):
    """A world box on a 30-degree oblique grid: the voxel box bounds all 8 transformed corners.

    Transforming only the two stored corners (the old code) gives a box that misses most of it.
    """
    affine = _rot_z(30) @ np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = [-10, -40, -5]
    shape = (80, 80, 20)
    world = [-5.0, 0.0, 0.0, 15.0, 20.0, 8.0]
    prompts = load_prompts(_write(tmp_path, {"space": "world", "boxes": [world]}), shape, affine)
    corners = np.array([[x, y, z] for x in (world[0], world[3]) for y in (world[1], world[4])
                        for z in (world[2], world[5])])
    vox = apply_affine(np.linalg.inv(affine), corners)
    np.testing.assert_allclose(prompts.boxes[0], np.concatenate([vox.min(0), vox.max(0)]), atol=1e-9)
    two = apply_affine(np.linalg.inv(affine), corners[[0, -1]])  # what the two-corner transform gave
    assert (np.abs(np.concatenate([two.min(0), two.max(0)]) - prompts.boxes[0]) > 3).any()


def test_world_and_voxel_prompts_agree_on_ras_and_lps(tmp_path):
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    affine[:3, 3] = [-50, -60, -20]
    shape = (50, 60, 20)
    _, lps_aff = flip_to_lps(np.zeros(shape), affine)
    doc = {"space": "world", "boxes": [[-20.0, -30.0, -5.0, 10.0, 0.0, 10.0]], "points": [[0.0, -10.0, 4.0]]}
    ras = load_prompts(_write(tmp_path, doc), shape, affine)
    lps = load_prompts(_write(tmp_path, doc), shape, lps_aff)
    flip = np.array([shape[0] - 1, shape[1] - 1, 0])
    np.testing.assert_allclose(lps.points[0], [flip[0] - ras.points[0][0], flip[1] - ras.points[0][1],
                                               ras.points[0][2]])
    np.testing.assert_allclose(lps.boxes[0][[0, 1]], flip[:2] - ras.boxes[0][[3, 4]])


def test_world_prompts_on_a_coronal_2d_slice_use_the_full_affine(tmp_path):
    """A coronal slice stored as 2D (i = x, j = z) with its 3D affine: world [x, y, z] lands on (i, j)."""
    affine = np.array([[1.0, 0, 0, -90], [0, 0, 1.0, -20], [0, 1.0, 0, -70], [0, 0, 0, 1]])  # j -> z, k -> y
    shape = (180, 150)
    doc = {"space": "world", "points": [[10.0, -20.0, 5.0]], "boxes": [[-40.0, -20.0, -30.0, 20.0, -20.0, 40.0]]}
    prompts = load_prompts(_write(tmp_path, doc), shape, affine)
    np.testing.assert_allclose(prompts.points[0], [100.0, 75.0])
    np.testing.assert_allclose(prompts.boxes[0], [50.0, 40.0, 110.0, 110.0])
    with pytest.raises(DataError, match="off the plane"):
        load_prompts(_write(tmp_path, {"space": "world", "points": [[10.0, -10.0, 5.0]]}), shape, affine)
    with pytest.raises(DataError, match="axial plane"):
        load_prompts(_write(tmp_path, {"space": "world", "points": [[10.0, 5.0]]}), shape, affine)


def test_intensity_and_propagate_and_unknown_keys(tmp_path):
    p = load_prompts(_write(tmp_path, {"boxes": [[1, 1, 5, 5]], "intensity": "ct_lung", "propagate": False}),
                     (10, 10), np.eye(4))
    assert p.intensity == "ct_lung" and p.propagate is False
    with pytest.raises(DataError, match="unknown intensity"):
        load_prompts(_write(tmp_path, {"boxes": [[1, 1, 5, 5]], "intensity": "lung"}), (10, 10), np.eye(4))
    with pytest.raises(DataError, match="unknown key"):
        load_prompts(_write(tmp_path, {"boxes": [[1, 1, 5, 5]], "point_label": [1]}), (10, 10), np.eye(4))
