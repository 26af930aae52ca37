"""Intensity refinement under the network's prior: it moves a blurred boundary to the scan's own; when to use it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from scipy import ndimage

from medimg.data.refine import IntensityRefined, choose_refinement, refine_with_intensities
from medimg.errors import ConfigError


def brain_phantom(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(labels, T1-like image): a 'brain' (GM shell 0.5, WM core 0.8) in a head of dark CSF, bright scalp and air."""
    z, y, x = np.mgrid[:40, :40, :40]
    r = np.sqrt((z - 20) ** 2 + (y - 20) ** 2 + (x - 20) ** 2)
    wobble = 2.0 * np.sin(z / 3.0) * np.cos(x / 4.0)  # a folded GM / WM border
    lab = np.zeros(r.shape, np.uint8)
    lab[r < 14] = 1
    lab[r < 9 + wobble] = 2
    image = np.full(r.shape, 0.02, np.float32)  # air
    image[(r >= 16) & (r < 19)] = 0.85  # scalp: as bright as white matter, outside the brain
    image[(r >= 14) & (r < 16)] = 0.15  # CSF
    image[lab == 1], image[lab == 2] = 0.5, 0.8
    image += np.random.default_rng(seed).normal(0, 0.03, image.shape).astype(np.float32)
    return lab, image


def blurred_prior(lab: np.ndarray, shift: int = 2) -> np.ndarray:
    """A network-like softmax that knows the anatomy roughly: shifted, smoothed one-hot labels."""
    onehot = np.stack([(lab == c).astype(np.float32) for c in range(3)])
    onehot = np.roll(onehot, shift, axis=3)
    prob = np.stack([ndimage.gaussian_filter(ch, 2.0) for ch in onehot]) + 1e-3
    return (prob / prob.sum(0)).astype(np.float32)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def test_refinement_draws_the_scans_own_boundary():
    lab, image = brain_phantom()
    prior = blurred_prior(lab)
    before, after = prior.argmax(0), refine_with_intensities(prior, image).argmax(0)
    for c in (1, 2):
        assert dice(before == c, lab == c) < 0.85  # the prior alone is off by its shift and blur
        assert dice(after == c, lab == c) > 0.95
    # the bright scalp stays background: the prior says so, whatever its intensity
    assert not (after[lab == 0] == 2).any()
    # a weaker prior lets intensities decide more; a stronger one stays closer to the network
    strong = refine_with_intensities(prior, image, beta=8.0).argmax(0)
    assert (strong == before).mean() > (after == before).mean()


def test_partial_volume_rim_does_not_widen_grey_matter():
    """A darker rim outside the brain (half cortex, half CSF) under a grey prior: pure-tissue Gaussians drop it."""
    lab, image = brain_phantom(3)
    grid = np.mgrid[:40, :40, :40]
    z, r = grid[0], np.sqrt(sum((g - 20.0) ** 2 for g in grid))
    rim = (r >= 14) & (r < 15.2) & (z >= 24)  # outside the brain: truth is background
    image[rim] = 0.33 + np.random.default_rng(5).normal(0, 0.03, int(rim.sum())).astype(np.float32)
    prior = blurred_prior(lab, 0)
    prior[:, rim] = np.array([0.25, 0.75, 1e-3], np.float32)[:, None]  # the network leans grey there
    pure = refine_with_intensities(prior, image).argmax(0)
    plain = refine_with_intensities(prior, image, fit_power=1.0).argmax(0)
    assert (plain[rim] > 0).mean() > 0.9  # plain EM: the rim drags grey matter's Gaussian down and stays grey
    assert (pure[rim] > 0).mean() < 0.1
    assert dice(pure == 1, lab == 1) > 0.99 > dice(plain == 1, lab == 1)
    with pytest.raises(ValueError, match="fit_power"):
        refine_with_intensities(prior, image, fit_power=0.0)


def test_probabilities_stay_probabilities_and_certain_background_is_left_alone():
    lab, image = brain_phantom(1)
    prior = blurred_prior(lab)
    prior[:, :2] = np.array([0.9995, 0.0003, 0.0002], np.float32)[:, None, None, None]
    out = refine_with_intensities(prior, image)
    assert out.dtype == np.float32 and out.shape == prior.shape
    np.testing.assert_allclose(out.sum(0), 1.0, atol=1e-5)
    np.testing.assert_array_equal(out[:, :2], prior[:, :2])
    # all background: nothing to fit, nothing changes
    flat = np.zeros_like(prior)
    flat[0] = 1.0
    np.testing.assert_array_equal(refine_with_intensities(flat, image), flat)
    with pytest.raises(ValueError, match="do not match"):
        refine_with_intensities(prior, image[:-1])
    with pytest.raises(ValueError, match="beta"):
        refine_with_intensities(prior, image, beta=0.0)


def test_dictionary_transform_keeps_meta_and_can_be_off():
    lab, image = brain_phantom(2)
    affine = torch.diag(torch.tensor([-1.0, -1.0, 1.0, 1.0], dtype=torch.float64))
    pred = MetaTensor(torch.as_tensor(blurred_prior(lab)), affine=affine)
    data = {"pred": pred, "image": MetaTensor(torch.as_tensor(image[None]), affine=affine)}
    out = IntensityRefined("pred")(data)["pred"]
    assert isinstance(out, MetaTensor) and torch.equal(out.affine, affine) and out.shape == pred.shape
    assert dice(out.argmax(0).numpy() == 2, lab == 2) > 0.95
    same = IntensityRefined("pred", enabled=False)(data)["pred"]
    assert torch.equal(same, pred)


def test_validation_decides():
    before = {"val/dice": 0.80}
    assert choose_refinement("auto", {**before, "val/dice_refined": 0.93})
    assert not choose_refinement("auto", {**before, "val/dice_refined": 0.799})  # it must not cost Dice
    assert not choose_refinement("auto", before)  # nothing measured: outputs stay as trained
    assert choose_refinement(True, {}) and not choose_refinement(False, {})
    with pytest.raises(ConfigError, match="intensity_refinement"):
        choose_refinement("maybe", before)
