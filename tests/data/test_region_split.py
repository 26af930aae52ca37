"""Region splits: whole volumes for training and validation, each stage's labels only in its own world range."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.losses import DiceCELoss
from omegaconf import OmegaConf

from medimg.data.augment import GEN_KEY, KEEP, RandLabelSynthd, SynthLabelsd
from medimg.data.embedded import embedded_manifest
from medimg.data.manifest import load_manifest
from medimg.data.transforms import IGNORE_LABEL, RegionLabeld
from medimg.errors import ConfigError
from medimg.runs.segmentation import region_split
from medimg.tasks.segmentation import SegmentationTask


def test_region_follows_world_coordinates_on_a_flipped_grid():
    affine = np.diag([2.0, -2.0, 2.0, 1.0])  # y axis runs posterior: voxel j sits at y = 10 - 2 j
    affine[1, 3] = 10.0
    label = MetaTensor(torch.ones(1, 4, 8, 4), affine=torch.as_tensor(affine))
    out = RegionLabeld("label", axis=1, range_mm=[-1.0, None])({"label": label})["label"]
    y = 10 - 2 * np.arange(8)
    kept = np.asarray(out[0, 0, :, 0])
    np.testing.assert_array_equal(kept == 1, y >= -1)  # j = 0..5 (y 10..0) kept
    assert (kept[y < -1] == IGNORE_LABEL).all()
    assert isinstance(out, MetaTensor) and torch.equal(out.affine.double(), torch.as_tensor(affine))


def test_masked_loss_equals_the_loss_on_the_known_part_alone():
    torch.manual_seed(0)
    task = SegmentationTask(torch.nn.Identity(), num_classes=3)
    logits = torch.randn(1, 3, 8, 8, 8)
    label = torch.randint(0, 3, (1, 1, 8, 8, 8)).float()
    hidden = label.clone()
    hidden[..., 5:] = IGNORE_LABEL
    masked = task._masked_loss(logits, hidden, hidden != IGNORE_LABEL)
    alone = DiceCELoss(to_onehot_y=True, softmax=True)(logits[..., :5], label[..., :5])
    assert torch.allclose(masked, alone, atol=1e-5)
    full = DiceCELoss(to_onehot_y=True, softmax=True)(logits, label)
    assert not torch.allclose(masked, full, atol=1e-3)  # the hidden labels really do not count
    everything_hidden = torch.full_like(label, IGNORE_LABEL)
    assert float(task._masked_loss(logits, everything_hidden, everything_hidden != IGNORE_LABEL)) == 0.0


def test_synth_keeps_the_other_region_as_scanned_and_fills_the_air_with_clutter():
    n = 24
    image = np.zeros((n, n, n), np.float32)
    label = np.zeros((n, n, n), np.int16)
    image[8:16, 8:16, 8:16], label[8:16, 8:16, 8:16] = 0.6, 1
    label[:, 18:, :] = KEEP  # the validation region: its labels must never shape the image
    image[:, 18:, :] = 0.3
    d = {"image": MetaTensor(torch.from_numpy(image)[None]), "label": MetaTensor(torch.from_numpy(label)[None])}
    d = SynthLabelsd("label", num_labels=3, shells=1, shell_width=1.0)(d)
    gen = np.asarray(d[GEN_KEY][0])
    assert (gen[:, 18:, :] == KEEP).all() and (gen[label == 1] == 1).all()
    synth = RandLabelSynthd("image", prob=1.0, clutter_prob=1.0, max_blur=0.0)
    synth.set_random_state(3)
    out = np.asarray(synth(d)["image"][0])
    np.testing.assert_array_equal(out[:, 18:, :], image[:, 18:, :])  # kept as scanned
    air = gen == 0
    assert air.sum() > 1000 and out[air].std() > 0.05  # not one dark value: random blobs


def test_region_split_comes_from_the_manifest_and_is_checked():
    manifest = load_manifest(*embedded_manifest("mni152", None))
    split = region_split("manifest", manifest)
    train_items, val_items, description = split["items"]
    assert train_items == val_items == manifest.splits["test"]  # the whole volume for both stages
    assert split["train"] == {"axis": 1, "range": [-20.0, None]} and split["val"] == {"axis": 1, "range": [None, -28.0]}
    assert "region split" in description
    assert region_split(None, manifest) is None
    with pytest.raises(ConfigError, match="overlap"):
        region_split(OmegaConf.create({"split": "test", "axis": 1, "train": [-30, None], "val": [None, -28]}), manifest)
    with pytest.raises(ConfigError, match="no 'holdout' volumes"):
        region_split(OmegaConf.create({"split": "holdout", "axis": 1, "train": [0, None], "val": [None, -1]}), manifest)
