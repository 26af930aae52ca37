from __future__ import annotations

import json

import nibabel as nib
import numpy as np

from medimg.models import build_network
from medimg.predictors.promptable import PromptablePredictor, segment_file


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
