"""Augmentation presets on a head phantom: intensities change, labels stay aligned, the head stays background."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medimg.data.augment import (
    GEN_KEY,
    GatedRand3DElasticd,
    SynthLabelsd,
    augmentation_spec,
    check_preset,
    deformation_spec,
)
from medimg.data.transforms import CLASS_INDICES_POSTFIX, build_pipeline, segmentation_spec
from medimg.errors import ConfigError

N = 32


def head_phantom() -> tuple[np.ndarray, np.ndarray]:
    """Air, a scalp shell (bright), a brain of grey (label 1) around white (label 2), a dark unlabelled CSF pocket."""
    z, y, x = np.mgrid[:N, :N, :N] - (N - 1) / 2
    r = np.sqrt(x ** 2 + y ** 2 + z ** 2)
    image = np.zeros((N, N, N), np.float32)
    label = np.zeros((N, N, N), np.int16)
    image[(r > 12) & (r <= 14)] = 0.9  # scalp
    image[r <= 11] = 0.5
    label[r <= 11] = 1
    image[r <= 7] = 0.8
    label[r <= 7] = 2
    pocket = np.sqrt((x - 3) ** 2 + y ** 2 + z ** 2) <= 2
    image[pocket], label[pocket] = 0.05, 0
    return image, label


def sample(**extra) -> dict:
    image, label = head_phantom()
    d = {"image": MetaTensor(torch.from_numpy(image)[None]), "label": MetaTensor(torch.from_numpy(label)[None])}
    d.update(extra)
    return d


def with_prob_one(spec: list[dict]) -> list[dict]:
    return [{**t, "prob": 1.0} if "prob" in t else t for t in spec]


def test_presets_are_checked():
    assert check_preset(True) == "light" and check_preset(False) == "none"
    with pytest.raises(ConfigError, match="unknown augmentation 'heavy'"):
        check_preset("heavy")


def test_synth_labels_mark_csf_and_split_the_head_by_intensity():
    out = SynthLabelsd("label", num_labels=3)(sample())
    gen, label = np.asarray(out[GEN_KEY][0]), np.asarray(out["label"][0])
    image = np.asarray(out["image"][0])
    np.testing.assert_array_equal(gen[label > 0], label[label > 0])  # training labels kept as they are
    assert (gen[(label == 0) & (image == 0.05)] == 3).all()  # the dark pocket inside the brain: CSF
    scalp = image == 0.9
    assert (gen[scalp] >= 4).all() and (gen[scalp] <= 6).all()  # head classes
    z, y, x = np.mgrid[:N, :N, :N] - (N - 1) / 2
    outside = np.sqrt(x ** 2 + y ** 2 + z ** 2) > 15
    assert set(np.unique(gen[outside])) <= {0} | set(range(7, 15))  # air or bands of a synthetic head beyond


def test_a_skull_stripped_image_gets_a_synthetic_head_of_bands():
    d = sample()
    d["image"][d["image"] == 0.9] = 0  # strip the scalp
    gen = np.asarray(SynthLabelsd("label", num_labels=3, shells=4, shell_width=2.0)(d)[GEN_KEY][0])
    z, y, x = np.mgrid[:N, :N, :N] - (N - 1) / 2
    r = np.sqrt(x ** 2 + y ** 2 + z ** 2)
    assert (gen[(r > 12.5) & (r < 13.5)] >= 7).all()  # where the scalp was: a band
    assert len(np.unique(gen[(r > 11.5) & (r < 19)])) >= 3  # several bands, each its own random intensity later


@pytest.mark.parametrize("preset", ["light", "strong", "synth"])
def test_each_preset_changes_intensity_statistics_and_keeps_labels(preset):
    spec = augmentation_spec(preset, ["image", "label", GEN_KEY] if preset == "synth" else ["image", "label"])
    pipeline = build_pipeline(with_prob_one(spec))
    pipeline.set_random_state(seed=0)
    original = head_phantom()[0]
    base = sample()
    if preset == "synth":
        base = SynthLabelsd("label", num_labels=3)(base)
    out = pipeline(base)
    image, label = np.asarray(out["image"][0]), np.asarray(out["label"][0])
    assert image.shape == label.shape == (N, N, N)
    assert abs(image.mean() - original.mean()) > 0.01 or abs(image.std() - original.std()) > 0.01
    assert set(np.unique(label)) <= {0, 1, 2}  # nearest-neighbour labels: no new values
    assert GEN_KEY not in out


def test_deformation_moves_image_and_labels_together():
    image, label = head_phantom()
    data = {"image": MetaTensor(torch.from_numpy(label.astype(np.float32) * 0.3)[None]),
            "label": MetaTensor(torch.from_numpy(label)[None])}
    for seed in range(3):
        pipeline = build_pipeline(with_prob_one(deformation_spec(["image", "label"], ["label"], 3)))
        pipeline.set_random_state(seed=seed)
        out = pipeline(dict(data))
        img, lab = np.asarray(out["image"][0]), np.asarray(out["label"][0])
        assert not np.array_equal(lab, label)  # it did move
        interior = lab == np.round(img / 0.3)  # bilinear image vs nearest labels differ only at edges
        assert interior.mean() > 0.97


def test_synth_keeps_the_head_background_in_a_training_pipeline(tmp_path):
    import nibabel as nib

    spec = segmentation_spec("train", pixdim=None, intensity="none", roi_size=(24, 24, 24), num_samples=2,
                             num_classes=3, augment="synth")
    pipeline = build_pipeline(spec)
    pipeline.set_random_state(seed=1)
    image, label = head_phantom()
    nib.save(nib.Nifti1Image(image, np.eye(4)), tmp_path / "image.nii.gz")
    nib.save(nib.Nifti1Image(label, np.eye(4)), tmp_path / "label.nii.gz")
    crops = pipeline({"image": str(tmp_path / "image.nii.gz"), "label": str(tmp_path / "label.nii.gz")})
    assert len(crops) == 2
    for crop in crops:
        assert set(crop) >= {"image", "label"} and GEN_KEY not in crop
        assert "label" + CLASS_INDICES_POSTFIX not in crop  # the cached class indices do not reach the batch
        assert set(np.unique(np.asarray(crop["label"]))) <= {0, 1, 2}
        assert crop["image"].shape == crop["label"].shape == (1, 24, 24, 24)


@pytest.mark.parametrize("preset", ["strong", "synth"])
def test_presets_run_on_2d_slices(preset):
    """2D networks (vit_seg) train on one-slice crops: every transform must take 2D images."""
    keys = ["image", "label", GEN_KEY] if preset == "synth" else ["image", "label"]
    pipeline = build_pipeline(with_prob_one(augmentation_spec(preset, keys, spatial_dims=2)))
    pipeline.set_random_state(seed=0)
    base = sample()
    if preset == "synth":
        base = SynthLabelsd("label", num_labels=3)(base)
    data = {k: v[:, :, :, N // 2] for k, v in base.items()}  # a (1, N, N) slice of each
    out = pipeline(data)
    assert out["image"].shape == out["label"].shape == (1, N, N)
    assert set(np.unique(np.asarray(out["label"]))) <= {0, 1, 2}


def test_gated_elastic_deforms_at_its_rate_and_leaves_the_rest_untouched():
    """Identity draws return the data as given (no resampling); deforming draws match MONAI's own elastic."""
    from monai.transforms import Rand3DElasticd

    image, label = head_phantom()
    data = {"image": torch.as_tensor(image[None]), "label": torch.as_tensor(label[None])}
    kw = dict(keys=["image", "label"], mode=["bilinear", "nearest"], sigma_range=[6.0, 8.0],
              magnitude_range=[40.0, 120.0], padding_mode="zeros")
    gated = GatedRand3DElasticd(prob=0.3, **kw)
    gated.set_random_state(seed=0)
    changed = [not torch.equal(gated(data)["image"], data["image"]) for _ in range(40)]
    assert 4 <= sum(changed) <= 20  # about 30% of the draws
    always = GatedRand3DElasticd(prob=1.0, **kw)
    always.set_random_state(seed=3)
    reference = Rand3DElasticd(prob=1.0, **kw)
    reference.set_random_state(seed=3)
    reference.R.rand()  # the gate's draw, which MONAI's version does not take
    torch.testing.assert_close(always(data)["image"], reference(data)["image"])


def test_prompt_patches_synthesise_a_head_for_training_only():
    """medsam3d's ``data.synth``: training patches are synthesised (head included), targets and validation are not."""
    from medimg.data.promptable.patches import PromptPatchDataset

    image, label = head_phantom()
    kwargs = dict(roi_size=(16, 16, 16), classes=[2], jitter=0.0, connected_to_click=False)
    plain = PromptPatchDataset([(image, label)], samples=4, seed=0, **kwargs)
    synth = PromptPatchDataset([(image, label)], samples=4, seed=0, synth={"prob": 1.0, "head_only_prob": 0.0},
                               **kwargs)
    for _ in range(4):
        a, b = plain._draw(0, jitter=True), synth._draw(0, jitter=True)
        # same click and target: only the image is regenerated from the label map
        assert torch.equal(a["click"], b["click"]) and torch.equal(a["target"], b["target"])
        assert not torch.allclose(a["image"], b["image"], atol=0.05)
        # synthetic intensities are uniform within a label: white matter's spread stays small
        wm = b["target"][0] > 0
        assert float(b["image"][0][wm].std()) < 0.1
    fixed = PromptPatchDataset([(image, label)], samples=None, seed=1, synth={}, **kwargs)
    assert torch.equal(fixed[0]["image"], torch.from_numpy(
        PromptPatchDataset([(image, label)], samples=None, seed=1, **kwargs)[0]["image"].numpy()))
    with pytest.raises(ConfigError, match="data.synth"):
        PromptPatchDataset([(image, label)], samples=4, synth={"heads": 1}, **kwargs)


def test_prompt_patches_corrupt_real_training_patches_only():
    """``data.corrupt``: scanner-like corruptions of the real training patches; targets and validation untouched."""
    from medimg.data.promptable.patches import PromptPatchDataset

    image, label = head_phantom()
    kwargs = dict(roi_size=(16, 16, 16), classes=[2], jitter=0.0, connected_to_click=False)
    plain = PromptPatchDataset([(image, label)], samples=8, seed=0, **kwargs)
    noisy = PromptPatchDataset([(image, label)], samples=8, seed=0, corrupt=True, **kwargs)
    changed = 0
    for _ in range(8):
        a, b = plain._draw(0, jitter=True), noisy._draw(0, jitter=True)
        assert torch.equal(a["click"], b["click"]) and torch.equal(a["target"], b["target"])
        assert torch.isfinite(b["image"]).all()
        changed += int(not torch.allclose(a["image"], b["image"], atol=1e-3))
    assert changed >= 6  # gain alone is drawn 80% of the time
    fixed = PromptPatchDataset([(image, label)], samples=None, seed=1, corrupt=True, **kwargs)
    real = PromptPatchDataset([(image, label)], samples=None, seed=1, **kwargs)
    assert torch.equal(fixed[0]["image"], real[0]["image"])


def test_prompt_patches_choose_subjects_of_one_intensity_window(tmp_path):
    """A 3D bundle has one intensity contract: ``data.subjects`` picks entries; a mixed window is refused by name."""
    from pathlib import Path

    from medimg.data.manifest import Manifest
    from medimg.data.promptable.patches import select_subjects

    entry = lambda s, w: {"image": f"{s}.nii.gz", "label": f"{s}_l.nii.gz", "subject": s, "intensity": w}  # noqa: E731
    manifest = Manifest(Path(tmp_path / "m.json"), tmp_path, {
        "training": [entry("head", "mr"), entry("chest", "ct_lung")], "validation": [entry("head", "mr")]})
    picked = select_subjects(manifest, ["head"], "mr")
    assert [e["subject"] for e in picked.splits["training"]] == ["head"] and len(picked.splits["validation"]) == 1
    with pytest.raises(ConfigError, match="chest use another intensity window"):
        select_subjects(manifest, None, "mr")
    with pytest.raises(ConfigError, match="no manifest entry for knee"):
        select_subjects(manifest, ["head", "knee"], "mr")
