"""The interactive MONAI Label tasks' ``run`` on 3D Slicer requests, with stand-in networks (no bundle).

The stand-ins segment bright voxels (inside the box, for the 2D one), so what a request asks for
(which slices, which prompts) shows in exact voxel counts.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from medimg.io.image import Image


class BrightNet3D(nn.Module):
    """Voxels brighter than 0.5 in each window."""

    def check_size(self, size):
        pass

    def encode(self, x):
        return x

    def decode(self, x, points=None, boxes=None, masks=None):
        return (x - 0.5) * 20, torch.ones(x.shape[0], 1)


class BrightInBoxNet(nn.Module):
    """A 2D promptable stand-in: bright pixels inside the box (everywhere without one)."""

    img_size = 32

    def preprocess(self, image):
        x = torch.as_tensor(np.asarray(image, dtype=np.float32))
        return x[None, None], tuple(x.shape)

    def scale_coords(self, coords, original_size):
        return coords

    def encode(self, x):
        return x

    def decode(self, emb, points=None, boxes=None, masks=None, multimask_output=False):
        inside = torch.ones_like(emb, dtype=torch.bool)
        if boxes is not None:
            x0, y0, x1, y1 = boxes[0].tolist()
            rows, cols = torch.meshgrid(torch.arange(emb.shape[2]), torch.arange(emb.shape[3]), indexing="ij")
            inside = ((rows >= y0) & (rows <= y1) & (cols >= x0) & (cols <= x1))[None, None]
        logits = torch.where(inside & (emb > 127), 10.0, -10.0)
        n = 3 if multimask_output else 1
        return logits.repeat(1, n, 1, 1), torch.ones(1, n)

    def postprocess(self, low_res, resized, original_size):
        return low_res


def _cube(shape=(32, 32, 24)) -> Image:
    vol = np.zeros(shape, np.float32)
    vol[8:24, 8:24, 4:20] = 1.0
    return Image(vol, np.eye(4), "cube.nii.gz", "memory")


def _task3d():
    from medimg.label.infer import PromptInfer3D
    from medimg.predictors.volumetric import VolumePromptPredictor

    task = PromptInfer3D.__new__(PromptInfer3D)  # run() needs only the predictor
    task.predictor = VolumePromptPredictor(BrightNet3D(), roi_size=(32, 32, 32), pixdim=None, intensity="none")
    return task


def _task2d():
    from medimg.label.infer import PromptInfer2D
    from medimg.predictors.promptable import PromptablePredictor

    task = PromptInfer2D.__new__(PromptInfer2D)
    task.predictor = PromptablePredictor(BrightInBoxNet(), "cpu", plane="axial", intensity="none")
    return task


def _slices(mask: np.ndarray) -> list[int]:
    return np.nonzero(mask.any(axis=(0, 1)))[0].tolist()


@pytest.mark.parametrize("request_, k", [
    ({"foreground": [[16, 16, 12]], "background": [[0, 0, 6]]}, 12),  # the first foreground click's slice
    ({"foreground": [[16, 16, 12]], "slice": 17}, 17),  # the slice the user is on
    ({"roi": [6, 25, 6, 25, 3, 20]}, 11),  # the ROI's middle slice along k
    ({"roi": [6, 25, 6, 25, 3, 20], "slice": 5}, 5),
])
def test_propagate_false_keeps_a_3d_answer_on_the_viewed_slice(request_, k):
    image = _cube()
    task = _task3d()
    everywhere, _ = task.run(image, request_)
    assert _slices(everywhere) == list(range(4, 20)) and everywhere.sum() == 16 ** 3
    mask, _ = task.run(image, {**request_, "propagate": False})
    assert _slices(mask) == [k] and mask.sum() == 16 * 16
    np.testing.assert_array_equal(mask[:, :, k], everywhere[:, :, k])


def test_propagate_false_on_a_slice_outside_the_roi_or_image_is_refused():
    task = _task3d()
    with pytest.raises(ValueError, match="slice 22 lies outside the roi"):
        task.run(_cube(), {"roi": [6, 25, 6, 25, 3, 20], "slice": 22, "propagate": False})
    with pytest.raises(ValueError, match="slice 24 lies outside the image"):
        task.run(_cube(), {"foreground": [[16, 16, 12]], "slice": 24, "propagate": False})


def test_propagate_false_keeps_a_2d_models_roi_on_the_viewed_slice():
    image = _cube()
    task = _task2d()
    request = {"roi": [6, 25, 6, 25, 3, 20], "slice": 7}
    everywhere, _ = task.run(image, request)
    assert _slices(everywhere) == list(range(4, 20)) and everywhere.sum() == 16 ** 3
    mask, fields = task.run(image, {**request, "propagate": False})
    assert _slices(mask) == [7] and mask.sum() == 16 * 16 and fields["plane"] == "axial"


def test_a_one_slice_volume_takes_slicers_6_number_roi_end_to_end():
    image = Image(_cube().array[:, :, 10:11].copy(), np.eye(4), "slice.nii.gz", "memory")
    mask, _ = _task2d().run(image, {"roi": [6, 25, 6, 25, 0, 0], "foreground": [[16, 16, 0]], "slice": 0})
    assert mask.shape == (32, 32, 1) and mask.sum() == 16 * 16 and mask[8:24, 8:24, 0].all()


def test_2d_clicks_made_across_the_files_slices_are_segmented_on_their_own_slice():
    """An axial view of a sagittally stored volume: Slicer's clicks share an i, not a k; none is dropped."""
    image = _cube()
    task = _task2d()
    clicks = {"foreground": [[12, 16, 10], [12, 20, 14]], "background": [[12, 9, 18]]}
    mask, fields = task.run(image, clicks)
    assert np.nonzero(mask.any(axis=(1, 2)))[0].tolist() == [12]  # the slice i = 12, not one k
    assert mask[12].sum() == 16 * 16 and fields["plane"] != task.predictor.for_plane("axial").plane
    with pytest.raises(ValueError, match=r"clicks \[\[9.0, 9.0, 18.0\]\] are not on slice 10"):
        task.run(image, {"foreground": [[12, 16, 10]], "background": [[9, 9, 18]]})
