from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import Invertd

from medimg.data.embedded.mni152 import (
    TRAIN_Y_MIN_MM,
    VAL_Y_MAX_MM,
    compose_head,
    mni152_tissue_labels,
    prepare_mni152_head,
    resample_to,
)
from medimg.data.manifest import load_manifest, validate_manifest
from medimg.data.segmentation import ManifestDataModule
from medimg.data.transforms import CT_WINDOWS, build_pipeline, intensity_spec, segmentation_spec
from medimg.errors import ConfigError, DataError
from medimg.resources import resource_dir
from tests.helpers import flip_to_lps, oblique_affine


def test_tissue_labels_argmax_with_threshold():
    gm = np.array([0.6, 0.3, 0.45, 0.5, 0.2])
    wm = np.array([0.3, 0.6, 0.45, 0.2, 0.2])
    np.testing.assert_array_equal(mni152_tissue_labels(gm, wm), [1, 2, 0, 1, 0])


def test_mni152_is_real_and_split_without_overlap(mni_dir):
    manifest = load_manifest(resource_dir("data_manifests") / "mni152.json", mni_dir)
    assert manifest.class_names == ["background", "grey_matter", "white_matter"]
    full = nib.load(str(mni_dir / "t1.nii.gz"))
    assert full.shape == (197, 233, 189)
    train = nib.load(manifest.splits["training"][0]["image"])
    val = nib.load(manifest.splits["validation"][0]["image"])
    y_train_min = train.affine[1, 3]
    y_val_max = val.affine[1, 3] + val.shape[1] - 1
    assert y_train_min >= TRAIN_Y_MIN_MM and y_val_max <= VAL_Y_MAX_MM and y_train_min - y_val_max >= 8
    labels = np.asarray(nib.load(str(mni_dir / "labels.nii.gz")).dataobj)
    counts = np.bincount(labels.ravel(), minlength=3)
    assert counts[2] > 500_000 and counts[1] > 1_000_000  # real white and grey matter volumes (mm^3)
    # crops keep world coordinates: the training slab's voxels are the full volume's voxels
    t1 = np.asarray(full.dataobj)
    offset = int(round(y_train_min - full.affine[1, 3]))
    np.testing.assert_array_equal(np.asarray(train.dataobj), t1[:, offset:])
    validate_manifest(manifest)


def test_compose_head_puts_the_brain_inside_the_head_and_the_head_brain_to_csf():
    t1 = np.zeros((12, 12, 12), np.float32)
    labels = np.zeros_like(t1, dtype=np.uint8)
    t1[3:9, 3:9, 3:9], labels[4:8, 4:8, 4:8] = 40.0, 2  # brain region: unlabelled rim (CSF 40) around WM
    t1[labels == 2] = 200.0
    head = np.full_like(t1, 10.0)  # a head of intensity 10, whose WM reads 1000: the scale is 0.2
    head[labels == 2] = 1000.0
    head_brain = np.zeros_like(t1)
    head_brain[3:10, 3:9, 3:9] = 1  # the head's brain reaches one slab past the template's
    out = compose_head(t1, labels, head, head_brain, gap_voxels=1)
    np.testing.assert_array_equal(out[labels == 2], 200.0)  # the brain as it was
    assert out[0, 0, 0] == pytest.approx(2.0)  # the head, scaled to the brain's white matter
    assert out[9, 5, 5] == pytest.approx(40.0) and out[10, 5, 5] == pytest.approx(40.0)  # head brain (+1) is CSF
    assert out[11, 5, 5] == pytest.approx(2.0)
    with pytest.raises(DataError, match="do not overlap"):
        compose_head(t1, labels, np.zeros_like(t1), head_brain)


def test_resample_to_follows_both_affines():
    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    src = nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]))
    target = np.diag([1.0, 1.0, 1.0, 1.0])
    target[:3, 3] = [2.0, 4.0, 6.0]  # the target's voxel (0, 0, 0) is the source's (1, 2, 3)
    out = resample_to(src, (3, 3, 3), target, order=0)
    assert out[0, 0, 0] == data[1, 2, 3] and out[2, 2, 2] == data[2, 3, 4]


def test_mni152_head_is_the_template_brain_inside_a_real_head(mni_dir, _data_root):
    head_dir = prepare_mni152_head(_data_root / "mni152_head")  # nimare's files are installed by README command 1
    manifest = load_manifest(resource_dir("data_manifests") / "mni152_head.json", head_dir)
    validate_manifest(manifest)
    brain = np.asarray(nib.load(str(mni_dir / "t1.nii.gz")).dataobj)
    head = np.asarray(nib.load(str(head_dir / "t1.nii.gz")).dataobj)
    labels = np.asarray(nib.load(str(head_dir / "labels.nii.gz")).dataobj)
    assert head.shape == brain.shape
    np.testing.assert_array_equal(labels, np.asarray(nib.load(str(mni_dir / "labels.nii.gz")).dataobj))
    np.testing.assert_allclose(head[brain > 0], brain[brain > 0])  # the template's brain region untouched
    scalp = (brain == 0) & (head > 0.3 * np.median(brain[labels == 2]))
    assert scalp.sum() > 500_000  # a real head around it: scalp, skull, face, neck (mm^3)
    # the head is background, and it lies outside the brain
    assert not (labels[scalp] > 0).any()


def _write_pair(tmp_path, image_shape=(8, 8, 8), label_shape=(8, 8, 8), label_affine=None, label_value=1):
    aff = np.eye(4)
    nib.save(nib.Nifti1Image(np.ones(image_shape, np.float32), aff), str(tmp_path / "img.nii.gz"))
    lab = np.zeros(label_shape, np.uint8)
    lab[2:4, 2:4, 2:4] = label_value
    nib.save(nib.Nifti1Image(lab, aff if label_affine is None else label_affine), str(tmp_path / "lab.nii.gz"))
    doc = {"labels": {"0": "bg", "1": "fg"}, "training": [{"image": "img.nii.gz", "label": "lab.nii.gz"}]}
    (tmp_path / "m.json").write_text(json.dumps(doc))
    return tmp_path / "m.json"


def test_manifest_validation_catches_mismatches(tmp_path):
    with pytest.raises(DataError, match="label shape"):
        validate_manifest(load_manifest(_write_pair(tmp_path, label_shape=(8, 8, 7))))
    shifted = np.eye(4)
    shifted[0, 3] = 5.0
    with pytest.raises(DataError, match="label affine"):
        validate_manifest(load_manifest(_write_pair(tmp_path, label_affine=shifted)))
    with pytest.raises(DataError, match="not among the 2 labels"):
        validate_manifest(load_manifest(_write_pair(tmp_path, label_value=3)))
    with pytest.warns(UserWarning, match="label is empty"):
        validate_manifest(load_manifest(_write_pair(tmp_path, label_value=0)))


def test_manifest_missing_file_and_bad_json(tmp_path):
    (tmp_path / "m.json").write_text(json.dumps({"training": [{"image": "nope.nii.gz"}]}))
    with pytest.raises(DataError, match="nope.nii.gz.*missing"):
        load_manifest(tmp_path / "m.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_manifest(tmp_path / "bad.json")


def test_ct_window_presets_scale_the_window_to_unit_range():
    pipe = build_pipeline(intensity_spec("ct_abdomen"))
    level, width = CT_WINDOWS["ct_abdomen"]
    out = pipe({"image": torch.tensor([[level - width, level - width / 2, level, level + width / 2, 3000.0]])})
    torch.testing.assert_close(out["image"], torch.tensor([[0.0, 0.0, 0.5, 1.0, 1.0]]))
    with pytest.raises(ConfigError, match="unknown preset"):
        intensity_spec("ct_liver")


@pytest.mark.parametrize("geometry", ["lps", "oblique", "anisotropic"])
def test_infer_pipeline_inverts_to_the_input_grid(tmp_path, geometry):
    rng = np.random.default_rng(0)
    from scipy import ndimage

    # smooth, so that values survive resampling
    vol = ndimage.gaussian_filter(rng.random((20, 18, 14)), 2.0).astype(np.float32) * 10 + 1
    aff = np.diag([1.0, 1.0, 1.0, 1.0])
    if geometry == "lps":
        vol, aff = flip_to_lps(vol, aff)
    elif geometry == "oblique":
        aff = oblique_affine(aff, 28.0, axis=2)
    else:
        aff = np.diag([0.7, 0.9, 3.0, 1.0])
    nib.save(nib.Nifti1Image(vol, aff), str(tmp_path / "x.nii.gz"))
    spec = segmentation_spec("infer", pixdim=(1.5, 1.5, 1.5), intensity="mr", crop_foreground=True)
    pre = build_pipeline(spec)
    data = pre({"image": str(tmp_path / "x.nii.gz")})
    data["pred"] = data["image"].clone()
    inv = Invertd("pred", transform=pre, orig_keys="image", nearest_interp=False)(data)
    assert tuple(inv["pred"].shape[1:]) == vol.shape
    np.testing.assert_allclose(inv["pred"].affine.numpy(), aff, atol=1e-4)
    # values, not only geometry: the inverted (scaled) image is the input's own scaled voxels again
    lo, hi = np.percentile(vol, [0.5, 99.5])
    expected = np.clip((vol - lo) / (hi - lo), 0, 1)
    got = np.asarray(inv["pred"][0])
    inner = (slice(3, -3),) * 3  # away from the borders, where resampling pads
    err = np.abs(got - expected)[inner]
    if geometry == "lps":  # flips and an exact 1.5 mm grid: interpolation only
        assert err.mean() < 0.02 and err.max() < 0.2, (err.mean(), err.max())
    else:
        assert err.mean() < 0.03, err.mean()


def test_datamodule_cache_modes(tmp_path, phantom_manifest):
    spec_kwargs = dict(pixdim=None, intensity="none", crop_foreground=False)
    train = build_pipeline(segmentation_spec("train", roi_size=(16, 16, 16), num_samples=2, **spec_kwargs))
    val = build_pipeline(segmentation_spec("val", **spec_kwargs))
    shapes = {}
    for cache in ("none", "memory", "disk"):
        dm = ManifestDataModule(phantom_manifest, None, train, val, batch_size=2, cache=cache,
                                cache_dir=tmp_path / "cache")
        dm.setup("fit")
        batch = next(iter(dm.train_dataloader()))
        shapes[cache] = tuple(batch["image"].shape)
        vb = next(iter(dm.val_dataloader()))
        assert tuple(vb["label"].shape) == (1, 1, 32, 32, 32)
    assert set(shapes.values()) == {(4, 1, 16, 16, 16)}  # 2 volumes x 2 crops each
    assert any((tmp_path / "cache" / "default" / "training").iterdir())  # cache_key names the folder
    with pytest.raises(ConfigError, match="unknown cache mode"):
        ManifestDataModule(phantom_manifest, None, train, val, cache="redis")


def test_disk_cache_is_keyed_on_the_transforms(tmp_path, phantom_manifest):
    """Changing pixdim changes the cache key: a second run never reads the first run's preprocessed data."""
    import hashlib
    import json

    def key(pixdim):
        specs = [segmentation_spec("val", pixdim=pixdim, intensity="none", crop_foreground=False)]
        return hashlib.sha256(json.dumps(specs, sort_keys=True, default=str).encode()).hexdigest()[:16]

    shapes = {}
    for pixdim in ((1.0, 1.0, 1.0), (2.0, 2.0, 2.0)):
        val = build_pipeline(segmentation_spec("val", pixdim=pixdim, intensity="none", crop_foreground=False))
        dm = ManifestDataModule(phantom_manifest, None, val, val, cache="disk", cache_dir=tmp_path / "cache",
                                cache_key=key(pixdim))
        shapes[pixdim] = tuple(next(iter(dm.val_dataloader()))["image"].shape)
    assert shapes[(1.0, 1.0, 1.0)] == (1, 1, 32, 32, 32) and shapes[(2.0, 2.0, 2.0)] == (1, 1, 16, 16, 16)
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_disk_cache_sees_files_edited_in_place(tmp_path):
    """A shared ``data.cache_dir``: an annotator fixes a label in place; the next run must train on the fix."""
    for name, value in (("img", 1.0), ("lab", 1)):
        nib.save(nib.Nifti1Image(np.full((8, 8, 8), value, np.float32 if name == "img" else np.uint8), np.eye(4)),
                 str(tmp_path / f"{name}.nii.gz"))
    pair = {"image": "img.nii.gz", "label": "lab.nii.gz"}
    (tmp_path / "m.json").write_text(json.dumps({"labels": {"0": "background", "1": "x"},
                                                 "training": [pair], "validation": [pair]}))
    val = build_pipeline(segmentation_spec("val", pixdim=None, intensity="none", crop_foreground=False))

    def label_sum() -> float:
        dm = ManifestDataModule(tmp_path / "m.json", tmp_path, val, val, cache="disk", cache_dir=tmp_path / "cache",
                                validate=False)
        return float(next(iter(dm.val_dataloader()))["label"].sum())

    assert label_sum() == 512.0
    cached = list((tmp_path / "cache" / "default" / "validation").iterdir())
    assert label_sum() == 512.0 and list((tmp_path / "cache" / "default" / "validation").iterdir()) == cached
    fixed = np.zeros((8, 8, 8), np.uint8)
    fixed[:2] = 1
    nib.save(nib.Nifti1Image(fixed, np.eye(4)), str(tmp_path / "lab.nii.gz"))
    assert label_sum() == 128.0


def test_disk_cache_key_stamps_only_the_loaded_files_and_sees_a_same_size_same_mtime_edit(tmp_path):
    """``cp -p`` / ``rsync -a`` / a 1 s file system keep size and mtime: inode and ctime still tell the edit.

    Other fields of an item (a notes folder, an empty string, ``/``) are no file the transforms
    load: never stamped (an empty string was the working folder, walked on every access).
    """
    import os
    import time

    from medimg.data.segmentation import file_state_hash

    label = tmp_path / "label.nii"
    label.write_bytes(b"\x01" * 1000)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    item = {"image": str(label), "label": str(label), "notes": str(tmp_path / "notes"), "site": "", "root": "/"}
    before, st = file_state_hash(item), label.stat()
    (tmp_path / "notes" / "a.txt").write_text("y, longer")  # not a loaded file: same key
    assert file_state_hash(item) == before
    time.sleep(0.01)
    fixed = tmp_path / "fixed.nii"
    fixed.write_bytes(b"\x02" * 1000)  # the corrected label, same size, moved into place keeping the old times
    os.utime(fixed, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(fixed, label)
    assert (label.stat().st_size, label.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert file_state_hash(item) != before


def test_no_validation_split_is_an_error_or_a_subject_split(tmp_path, phantom_manifest):
    import json

    from medimg.data.manifest import load_manifest, train_val_split

    doc = json.loads(phantom_manifest.read_text())
    doc["training"] += doc.pop("validation")
    for i, item in enumerate(doc["training"]):
        item["subject"] = f"s{i // 2}"  # two scans per subject
    path = tmp_path / "m.json"
    path.write_text(json.dumps(doc))
    manifest = load_manifest(path, phantom_manifest.parent)
    with pytest.raises(ConfigError, match="no 'validation' split"):
        train_val_split(manifest)
    train, val, split = train_val_split(manifest, 0.34, seed=0)
    assert val and train and "held-out subjects" in split
    assert not {i["subject"] for i in train} & {i["subject"] for i in val}  # no subject on both sides
    assert len(train) + len(val) == len(doc["training"])


def test_left_right_flip_swaps_sided_labels():
    """kidney_left (1) / kidney_right (2): a mirrored image carries the swapped labels; flips are off undeclared."""
    from medimg.data.transforms import RandLeftRightFlipd

    label = torch.zeros(1, 6, 4, 4)
    label[0, :2] = 2  # voxels at low x (patient right in RAS) are the right kidney
    label[0, 4:] = 1
    image = torch.arange(6.0)[None, :, None, None].expand(1, 6, 4, 4).clone()
    t = RandLeftRightFlipd(["image", "label"], swap=[[1, 2]], prob=1.0)
    out = t({"image": image, "label": label})
    assert torch.equal(out["image"][0, :, 0, 0], torch.arange(5.0, -1.0, -1.0))
    assert (out["label"][0, :2] == 2).all() and (out["label"][0, 4:] == 1).all()  # sides stay anatomically true
    kinds = [s["_target_"] for s in segmentation_spec("train", lr_swap=None)]
    assert not any("Flip" in k for k in kinds)
    assert any("LeftRightFlip" in s["_target_"] for s in segmentation_spec("train", lr_swap=[[1, 2]]))
