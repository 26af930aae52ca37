"""The growing-window volume predictor, with a stand-in network that segments bright voxels.

The stand-in keeps the test about the predictor alone: window placement and growth, prompts in
window coordinates, blending, and the way back to the input's geometry.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from medimg.predictors.prompting import segment_file
from medimg.predictors.volumetric import VolumePromptPredictor
from tests.helpers import flip_to_lps, oblique_affine


class BrightNet(nn.Module):
    """Predicts voxels brighter than 0.5 inside each window; records the prompts it was given."""

    spatial_dims = 3
    patch = (16, 16, 16)

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))
        self.calls: list[dict] = []

    def check_size(self, size):
        if any(s % 16 for s in size):
            raise ValueError("multiple of the patch")

    def encode(self, x):
        return x

    def decode(self, x, points=None, boxes=None, masks=None):
        self.calls.append({"points": points, "boxes": boxes})
        return (x - 0.5) * 20 * self.w, torch.ones(x.shape[0], 1)


def _bar_volume():
    vol = np.zeros((96, 48, 48), dtype=np.float32)
    vol[5:91, 8:20, 8:20] = 1.0  # a bar spanning several windows along i
    vol[40:60, 34:46, 34:46] = 1.0  # a separate block the bar's windows never reach
    return vol


def _write(tmp_path, vol, affine, name="vol.nii.gz"):
    path = tmp_path / name
    nib.save(nib.Nifti1Image(vol, affine), str(path))
    return path


def test_windows_follow_the_structure_from_one_click(tmp_path):
    vol = _bar_volume()
    path = _write(tmp_path, vol, np.eye(4))
    net = BrightNet()
    pred = VolumePromptPredictor(net, roi_size=(32, 32, 32), pixdim=None, intensity="none")
    pred.set_volume(str(path))
    prob = pred.predict_probability(points=np.array([[10.0, 14.0, 14.0]]))
    mask = prob > 0.5
    bar = np.zeros_like(mask)
    bar[5:91, 8:20, 8:20] = True
    np.testing.assert_array_equal(mask, bar)  # the whole bar, and not the separate block
    assert 3 <= len(net.calls) <= 12
    first = net.calls[0]["points"]
    assert first[1].tolist() == [[1]]
    grown = [c for c in net.calls[1:] if c["points"] is not None]
    assert len(grown) >= 2 and all(c["points"][1][0, -1] == 1 for c in grown)  # grown windows: a seed click


def test_a_box_keeps_windows_inside_it(tmp_path):
    vol = _bar_volume()
    path = _write(tmp_path, vol, np.eye(4))
    pred = VolumePromptPredictor(BrightNet(), roi_size=(32, 32, 32), pixdim=None, intensity="none")
    pred.set_volume(str(path))
    mask = pred.predict_probability(box=np.array([5.0, 8.0, 8.0, 40.0, 19.0, 19.0])) > 0.5
    assert mask[5:40, 8:20, 8:20].all()
    assert not mask[80:].any()  # windows never left the box's range (0..40 -> windows up to 64)
    # the bar continues beyond the box; the mask stops at the box plus its 10% margin (3.5 voxels)
    assert vol[41:60].any() and not mask[45:].any() and mask[40:43].any()


@pytest.mark.parametrize("frame", ["lps", "oblique"])
def test_world_click_on_non_ras_input_comes_back_in_its_geometry(tmp_path, frame):
    vol = _bar_volume()
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    affine[:3, 3] = [-70, -30, -30]
    click_vox = np.array([30.0, 14.0, 14.0])  # inside the bar
    if frame == "lps":
        vol, affine = flip_to_lps(vol, affine)
        click_vox[:2] = np.array(vol.shape[:2]) - 1 - click_vox[:2]
    else:
        affine = oblique_affine(affine, 20.0)
    assert vol[tuple(click_vox.astype(int))] == 1
    path = _write(tmp_path, vol, affine)
    world = (affine @ np.append(click_vox, 1))[:3]
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps({"space": "world", "points": [world.tolist()], "point_labels": [1]}))
    out = tmp_path / "seg.nii.gz"
    pred = VolumePromptPredictor(BrightNet(), roi_size=(32, 32, 32), pixdim=(1.5, 1.5, 1.5), intensity="none")
    segment_file(pred, str(path), str(prompts), str(out))
    seg = nib.load(str(out))
    assert seg.shape == vol.shape
    np.testing.assert_allclose(seg.affine, affine, atol=1e-5)
    labels = np.asarray(seg.dataobj)
    assert labels[tuple(click_vox.astype(int))] == 1  # the clicked voxel is in the mask
    comp = labels == 1
    bright = vol > 0.5
    assert (comp & bright).sum() / comp.sum() > 0.95  # what it marks is the structure


def test_threshold_sets_the_mask_and_the_growth_and_is_checked():
    """A lower ``threshold`` keeps fainter voxels (the shipped medsam3d records the one its validation chose)."""
    from medimg.errors import ConfigError

    class FaintNet(BrightNet):
        def decode(self, x, points=None, boxes=None, masks=None):  # probability 0.27 on the bar, ~0 elsewhere
            return (9 * x - 10) * self.w, torch.ones(x.shape[0], 1)

    vol = _bar_volume()
    default = VolumePromptPredictor(FaintNet(), roi_size=(32, 32, 32), pixdim=None)
    low = VolumePromptPredictor(FaintNet(), roi_size=(32, 32, 32), pixdim=None, threshold=0.2)
    for p in (default, low):
        p.volume, p.model_affine = vol, np.eye(4)
    click = np.array([[48.0, 14.0, 14.0]])
    assert not (default.predict_probability(points=click) > default.threshold).any()
    mask = low.predict_probability(points=click) > low.threshold
    assert mask[5:91, 8:20, 8:20].all() and not mask[40:60, 34:46, 34:46].any()  # grown along the whole bar
    with pytest.raises(ConfigError, match="threshold"):
        VolumePromptPredictor(FaintNet(), roi_size=(32, 32, 32), pixdim=None, threshold=1.0)


def test_several_prompts_on_one_image_resample_it_once(tmp_path, monkeypatch):
    """``prepare`` keeps the model-frame volume while the same image comes back (a simulated user's prompts)."""
    from medimg.io.image import read_image
    from medimg.io.prompts import parse_prompts

    path = _write(tmp_path, _bar_volume(), np.eye(4))
    image = read_image(str(path))
    pred = VolumePromptPredictor(BrightNet(), roi_size=(32, 32, 32), pixdim=None, intensity="none")
    loads = []
    original = pred.set_volume
    monkeypatch.setattr(pred, "set_volume", lambda key, intensity=None: (loads.append(key), original(key, intensity)))
    prompts = parse_prompts({"points": [[48, 14, 14]]}, image.array.shape, image.affine)
    first = pred.segment_prompts(image, prompts)
    second = pred.segment_prompts(image, prompts)
    assert len(loads) == 1 and np.array_equal(first, second) and first[48, 14, 14] == 1
    pred.segment_prompts(image, prompts, intensity="mr")  # another window: loaded again
    pred.segment_prompts(read_image(str(path)), prompts)  # the bundle's window again: loaded again
    pred.segment_prompts(read_image(str(path)), prompts)  # another array, the same voxels: kept (content key)
    assert len(loads) == 3


class NegativeClickNet(BrightNet):
    """Bright voxels, less a ball of radius 3 around each negative click (window coordinates)."""

    def decode(self, x, points=None, boxes=None, masks=None):
        logits, iou = super().decode(x, points, boxes, masks)
        if points is not None:
            grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in x.shape[2:]],
                                              indexing="ij"), dim=-1)
            for p, label in zip(points[0][0], points[1][0]):
                if int(label) == 0:
                    logits[0, 0][((grid - p) ** 2).sum(-1) <= 9] = -10.0
        return logits, iou


def test_an_roi_and_its_clicks_reach_the_network_together(tmp_path):
    """Slicer's ROI plus a background click: both reach each window, the click in the model frame."""
    from medimg.io.image import read_image

    vol = np.zeros((32, 32, 32), np.float32)
    vol[6:26, 6:26, 6:26] = 1.0
    affine = np.diag([-1.5, -1.5, 1.5, 1.0])  # LPS: the model frame (RAS) reverses i and j
    affine[:3, 3] = [20.0, 30.0, -10.0]
    image = read_image(str(_write(tmp_path, vol, affine)))
    net = NegativeClickNet()
    pred = VolumePromptPredictor(net, roi_size=(32, 32, 32), pixdim=None, intensity="none")
    pred.prepare(image, None)
    box = np.array([4.0, 4.0, 4.0, 27.0, 27.0, 27.0])
    alone = pred.segment_object(image, box=box)
    assert alone.sum() == 20 ** 3 and net.calls[0]["points"] is None
    net.calls.clear()
    click = np.array([[10.0, 12.0, 16.0]])
    with_click = pred.segment_object(image, box=box, points=click, point_labels=np.array([0]))
    points, labels = net.calls[0]["points"]  # one window covers the volume: window = model frame
    np.testing.assert_allclose(points[0].numpy(), [[31 - 10.0, 31 - 12.0, 16.0]])
    assert labels.tolist() == [[0]]
    np.testing.assert_allclose(net.calls[0]["boxes"][0].numpy(), [4.0, 4.0, 4.0, 27.0, 27.0, 27.0])
    ball = ((np.indices(vol.shape) - click[0][:, None, None, None]) ** 2).sum(0) <= 9
    assert ball.sum() == 123 and not with_click[10, 12, 16]
    np.testing.assert_array_equal(with_click, alone & ~ball)  # the click removed its ball, nothing else


def test_a_refilled_buffer_and_a_new_affine_are_new_volumes(mni_dir):
    """A pipeline reuses one float32 buffer for scan after scan: each answer is a fresh copy's, exactly.

    The real MNI152 T1 (4 mm, stored LPS as from DICOM, so the model frame is a copy) goes into a
    buffer; the buffer is then refilled with the head moved 40 mm, and handed again with one axis
    flipped in its affine (the same voxels in another frame).
    """
    t1 = np.asarray(nib.load(str(mni_dir / "t1.nii.gz")).dataobj, dtype=np.float32)[::4, ::4, ::4]
    t1 /= t1.max()
    affine = np.diag([-4.0, -4.0, 4.0, 1.0])
    flipped = affine @ np.array([[1, 0, 0, 0], [0, -1, 0, t1.shape[1] - 1], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    click = {"points": [[24, 30, 24]]}

    def predictor() -> VolumePromptPredictor:
        return VolumePromptPredictor(BrightNet(), roi_size=(32, 32, 32), pixdim=None, intensity="none")

    pred, buffer = predictor(), np.empty(t1.shape, np.float32)  # the pipeline's buffer, allocated once
    answers = []
    for refill, frame in ((t1, affine), (np.roll(t1, 10, axis=1), affine), (None, flipped)):
        if refill is not None:
            buffer[...] = refill  # the same array object, new voxels
        got = pred.predict(buffer, frame, **click)
        want = predictor().predict(buffer.copy(), frame, **click)
        np.testing.assert_array_equal(got, want)
        answers.append(want)
    assert not np.array_equal(answers[0], answers[1])
