from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from medimg.data.promptable.patches import PromptPatchDataset, crop_centred, largest_component
from medimg.models import build_network
from medimg.models.peft import apply_freeze_policy
from medimg.tasks.promptable import PromptableTask
from tests.helpers import sphere_phantom


def test_crop_centred_pads_outside_the_volume():
    a = np.arange(27).reshape(3, 3, 3)
    patch, origin = crop_centred(a, (0, 0, 0), (4, 4, 4))
    assert origin.tolist() == [-2, -2, -2] and patch.shape == (4, 4, 4)
    assert patch[2, 2, 2] == a[0, 0, 0] and patch[0, 0, 0] == 0 and patch[3, 3, 3] == a[1, 1, 1]


def test_clicks_fall_in_the_largest_component_and_patches_centre_on_them():
    label = np.zeros((40, 40, 40), dtype=np.int64)
    label[5:8, 5:8, 5:8] = 1  # small piece
    label[20:34, 18:30, 10:30] = 1  # large piece
    image = (label > 0).astype(np.float32)
    ds = PromptPatchDataset([(image, label)], (16, 16, 16), target_mode="label", samples=None, clicks_per_target=5)
    assert largest_component(label == 1).sum() == 14 * 12 * 20
    for item in ds.fixed:
        assert item["image"].shape == (1, 16, 16, 16)
        c = item["click"].long()
        assert c.tolist() == [8, 8, 8]  # validation patches are centred on the click
        assert item["target"][0, c[0], c[1], c[2]] == 1 and item["image"][0, c[0], c[1], c[2]] == 1


@pytest.fixture(scope="module")
def trained_on_phantoms():
    """Tiny medsam3d trained briefly on sphere phantoms (128 steps on the CPU)."""
    rng = np.random.default_rng(0)
    train = [sphere_phantom(rng) for _ in range(8)]
    val = [sphere_phantom(rng) for _ in range(3)]
    torch.manual_seed(0)
    net = build_network("medsam3d", size="tiny")
    apply_freeze_policy(net, "spatial_adapters")
    task = PromptableTask(net, click_rounds=2, box_prob=0.2, lr=2e-3, seed=0)
    trainer = L.Trainer(max_epochs=8, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        check_val_every_n_epoch=1000)
    trainer.fit(task, DataLoader(PromptPatchDataset(train, (32, 32, 32), samples=64, seed=0), batch_size=4))
    val_set = PromptPatchDataset(val, (32, 32, 32), samples=None, clicks_per_target=1, seed=1)
    metrics = trainer.validate(task, DataLoader(val_set, batch_size=4), verbose=False)[0]
    return task, {k: float(v) for k, v in metrics.items()}


def test_one_click_reaches_dice_0_8_on_held_out_phantoms(trained_on_phantoms):
    _, m = trained_on_phantoms
    print({k: round(v, 3) for k, v in m.items()})
    assert m["val/dice_point1"] >= 0.8
    assert m["val/dice_point3"] >= m["val/dice_point1"] - 0.01  # more clicks do not hurt
    assert m["val/dice_box"] >= 0.8


def test_a_click_selects_its_own_sphere(trained_on_phantoms):
    """Clicking each sphere of an unseen phantom segments that sphere, not the others."""
    task, _ = trained_on_phantoms
    image, label = sphere_phantom(np.random.default_rng(42))
    net = task.network.eval()
    x = torch.from_numpy(image)[None, None]
    with torch.no_grad():
        feats = net.encode(x)
        for value in (1, 2, 3):
            centre = np.argwhere(label == value).mean(0)
            logits, _ = net.decode(feats, points=(torch.tensor(centre, dtype=torch.float32)[None, None],
                                                  torch.tensor([[1]])))
            pred = (logits[0, 0] > 0).numpy()
            target = label == value
            dice = 2 * (pred & target).sum() / (pred.sum() + target.sum())
            assert dice > 0.7, (value, dice)
            assert (pred & (label > 0) & ~target).sum() < 0.1 * target.sum()  # other spheres stay out
