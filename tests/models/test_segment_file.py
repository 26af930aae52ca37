from __future__ import annotations

import json

import nibabel as nib
import numpy as np

from medimg.models import build_network
from medimg.predictors.promptable import PromptablePredictor
from medimg.predictors.prompting import segment_file


def test_box_on_one_slice_propagates_through_the_object(tmp_path):
    """prompts {"boxes": [[i0, j0, k, i1, j1, k]]} on a volume: propagate until the object ends."""
    grid = np.indices((64, 64, 24)).astype(np.float32)
    inside = ((grid[0] - 32) / 20) ** 2 + ((grid[1] - 30) / 16) ** 2 + ((grid[2] - 11.5) / 6.2) ** 2 <= 1
    vol = (np.where(inside, 180.0, 20.0) + np.random.default_rng(0).normal(0, 5, inside.shape)).astype(np.float32)
    affine = np.diag([0.8, 0.8, 2.0, 1.0])
    nib.save(nib.Nifti1Image(vol, affine), str(tmp_path / "v.nii.gz"))
    idx = np.argwhere(inside[:, :, 12])
    box = [*idx.min(0).tolist(), 12, *idx.max(0).tolist(), 12]
    (tmp_path / "p.json").write_text(json.dumps({"space": "voxel", "boxes": [box]}))
    predictor = PromptablePredictor(build_network("litemedsam", pretrained=True))
    segment_file(predictor, str(tmp_path / "v.nii.gz"), str(tmp_path / "p.json"), str(tmp_path / "o.nii.gz"))
    out = nib.load(str(tmp_path / "o.nii.gz"))
    assert out.shape == vol.shape and np.array_equal(out.affine, nib.load(str(tmp_path / "v.nii.gz")).affine)
    mask = np.asarray(out.dataobj) == 1
    ks = np.nonzero(mask.any(axis=(0, 1)))[0]
    assert ks.min() <= 7 and ks.max() >= 16  # grew well beyond the prompted slice
    assert 2 * (mask & inside).sum() / (mask.sum() + inside.sum()) > 0.85


def _phantom():
    grid = np.indices((48, 40, 20)).astype(np.float32)
    inside = ((grid[0] - 24) / 14) ** 2 + ((grid[1] - 20) / 10) ** 2 + ((grid[2] - 10) / 6) ** 2 <= 1
    return (np.where(inside, 180.0, 20.0) + np.random.default_rng(1).normal(0, 5, inside.shape)).astype(np.float32)


def _oblique(affine, degrees):
    t = np.deg2rad(degrees)
    rot = np.eye(4)
    rot[:2, :2] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    return rot @ affine


def test_voxel_and_world_prompts_on_ras_lps_and_oblique_give_the_same_mask(tmp_path):
    """One volume stored RAS, LPS (flipped) and under a 20-degree oblique affine (same voxels):
    the same prompt, in voxel or world coordinates, gives the same mask in each input's own geometry."""
    from tests.helpers import flip_to_lps

    vol = _phantom()
    ras = np.diag([1.0, 1.2, 2.0, 1.0])
    box = [12, 12, 9, 36, 28, 9]  # one axial slice (the predictor's default plane here is axial)
    predictor = PromptablePredictor(build_network("litemedsam", pretrained=True), device="cpu")
    masks = {}
    for name, (v, a) in {"ras": (vol, ras), "lps": flip_to_lps(vol, ras), "oblique": (vol, _oblique(ras, 20))}.items():
        nib.save(nib.Nifti1Image(v, a), str(tmp_path / f"{name}.nii.gz"))
        b = np.array(box, dtype=float)
        if name == "lps":  # the same voxels, indexed from the other corner
            b[[0, 3]] = v.shape[0] - 1 - b[[3, 0]]
            b[[1, 4]] = v.shape[1] - 1 - b[[4, 1]]
        for space in ("voxel", "world"):
            doc = {"space": "voxel", "boxes": [b.tolist()], "propagate": False}
            if space == "world" and name != "oblique":  # an axis-aligned world box is the same box
                corners = nib.affines.apply_affine(a, np.array([b[:3], b[3:]]))
                doc = {"space": "world", "boxes": [[*corners.min(0), *corners.max(0)]], "propagate": False}
            (tmp_path / "p.json").write_text(json.dumps(doc))
            out = tmp_path / f"{name}_{space}.nii.gz"
            segment_file(predictor, str(tmp_path / f"{name}.nii.gz"), str(tmp_path / "p.json"), str(out))
            img = nib.load(str(out))
            np.testing.assert_array_equal(img.affine, nib.load(str(tmp_path / f"{name}.nii.gz")).affine)
            masks[name, space] = np.asarray(img.dataobj)
    ref = masks["ras", "voxel"]
    assert ref[:, :, 9].sum() > 200 and not ref[:, :, :9].any()
    np.testing.assert_array_equal(masks["ras", "world"], ref)
    np.testing.assert_array_equal(masks["lps", "voxel"][::-1, ::-1], ref)
    np.testing.assert_array_equal(masks["lps", "world"][::-1, ::-1], ref)
    np.testing.assert_array_equal(masks["oblique", "voxel"], ref)


def test_world_point_on_a_coronal_2d_slice_matches_the_voxel_point(tmp_path):
    """A coronal slice saved as a 2D image with its 3D affine: a world [x, y, z] box equals the voxel box."""
    vol = _phantom()
    affine = np.array([[1.0, 0, 0, -24], [0, 0, 1.0, 5.0], [0, 2.0, 0, -20], [0, 0, 0, 1]])  # j -> z (2 mm), y fixed
    nib.save(nib.Nifti1Image(vol[:, 20, :].copy(), affine), str(tmp_path / "cor.nii.gz"))
    predictor = PromptablePredictor(build_network("litemedsam", pretrained=True), device="cpu")
    (tmp_path / "v.json").write_text(json.dumps({"space": "voxel", "boxes": [[10, 4, 38, 16]]}))
    world = nib.affines.apply_affine(affine, np.array([[10, 4, 0], [38, 16, 0]]))
    (tmp_path / "w.json").write_text(json.dumps({"space": "world", "boxes": [[*world[0], *world[1]]]}))
    for name in ("v", "w"):
        segment_file(predictor, str(tmp_path / "cor.nii.gz"), str(tmp_path / f"{name}.json"),
                     str(tmp_path / f"{name}.nii.gz"))
    a = np.asarray(nib.load(str(tmp_path / "v.nii.gz")).dataobj)
    assert a.sum() > 100
    np.testing.assert_array_equal(np.asarray(nib.load(str(tmp_path / "w.nii.gz")).dataobj), a)


def test_intensity_preset_from_the_prompts_file_or_the_caller(tmp_path):
    """A CT window chosen per image replaces the bundle's; the caller's choice wins over the prompts file's."""
    from medimg.data.slicing import prepare_volume

    ct = (np.random.default_rng(0).normal(40, 300, (32, 32, 8))).astype(np.float32)
    nib.save(nib.Nifti1Image(ct, np.eye(4)), str(tmp_path / "ct.nii.gz"))
    predictor = PromptablePredictor(build_network("litemedsam", pretrained=True), device="cpu", intensity="mr")
    (tmp_path / "p.json").write_text(json.dumps({"boxes": [[4, 4, 3, 20, 20, 3]], "intensity": "ct_lung",
                                                 "propagate": False}))
    segment_file(predictor, str(tmp_path / "ct.nii.gz"), str(tmp_path / "p.json"), str(tmp_path / "o.nii.gz"))
    np.testing.assert_array_equal(predictor._volume, prepare_volume(ct, np.eye(4), "axial", "ct_lung")[0])
    segment_file(predictor, str(tmp_path / "ct.nii.gz"), str(tmp_path / "p.json"), str(tmp_path / "o.nii.gz"),
                 intensity="ct_abdomen")
    np.testing.assert_array_equal(predictor._volume, prepare_volume(ct, np.eye(4), "axial", "ct_abdomen")[0])
