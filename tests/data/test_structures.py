"""The ``structures`` dataset and its readers, on the real files (Debian mricron-data and
invesalius-examples, the slicerio and nimare wheels: ``.ci/run`` installs them) and on synthetic ones."""

from __future__ import annotations

import io
import json
import plistlib
import tarfile

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from medimg.data.embedded import structures as st
from medimg.data.manifest import load_manifest, validate_manifest
from medimg.errors import DataError
from medimg.io.invesalius import read_inv3
from tests.oracles import need_debian


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _write_inv3(path, volume_zyx, masks, spacing=(0.5, 0.75, 2.0), member_prefix="proj/"):
    main = {"matrix": {"dtype": "int16", "filename": "matrix.dat", "shape": list(volume_zyx.shape)},
            "spacing": list(spacing), "modality": "CT", "masks": {str(i): f"mask_{i}.plist" for i in range(len(masks))}}
    with tarfile.open(path, "w:gz") as tar:
        _add(tar, member_prefix + "main.plist", plistlib.dumps(main))
        _add(tar, member_prefix + "matrix.dat", volume_zyx.astype(np.int16).tobytes())
        for i, (name, m) in enumerate(masks.items()):
            raw = np.zeros(tuple(s + 1 for s in m.shape), np.uint8)
            raw[1:, 1:, 1:] = np.where(m, 255, 0)
            raw[0] = 1  # InVesalius' edit flags live in the first plane of each axis
            info = {"name": name, "mask_file": f"mask_{i}.dat", "mask_shape": list(raw.shape),
                    "threshold_range": [100 * i, 3000]}
            _add(tar, member_prefix + f"mask_{i}.plist", plistlib.dumps(info))
            _add(tar, member_prefix + f"mask_{i}.dat", raw.tobytes())


def test_inv3_reader_keeps_the_voxels_masks_and_spacing(tmp_path):
    rng = np.random.default_rng(0)
    vol = rng.integers(-1000, 2000, size=(5, 7, 9)).astype(np.int16)  # (Z, Y, X) as InVesalius stores it
    bone = vol > 500
    _write_inv3(tmp_path / "p.inv3", vol, {"soft": vol > -200, "bone": bone})
    project = read_inv3(tmp_path / "p.inv3")
    assert project.array.shape == (9, 7, 5) and project.modality == "CT"
    np.testing.assert_array_equal(project.array, vol.transpose(2, 1, 0))
    np.testing.assert_array_equal(project.masks["bone"], bone.transpose(2, 1, 0))  # the flag planes dropped
    np.testing.assert_allclose(project.affine, np.diag([-0.5, 0.75, 2.0, 1.0]))
    assert list(project.masks) == ["soft", "bone"] and project.thresholds["bone"] == (100.0, 3000.0)


@pytest.mark.parametrize("problem, match", [("unsafe", "unsafe archive member"), ("short", "holds"),
                                            ("not_tar", "gzipped tar"), ("no_main", "main.plist")])
def test_inv3_reader_refuses_broken_or_unsafe_archives(tmp_path, problem, match):
    path = tmp_path / "bad.inv3"
    vol = np.zeros((2, 3, 4), np.int16)
    if problem == "unsafe":
        _write_inv3(path, vol, {}, member_prefix="../")
    elif problem == "short":
        with tarfile.open(path, "w:gz") as tar:
            main = {"matrix": {"dtype": "int16", "filename": "matrix.dat", "shape": [2, 3, 4]}, "spacing": [1, 1, 1]}
            _add(tar, "p/main.plist", plistlib.dumps(main))
            _add(tar, "p/matrix.dat", b"\0" * 10)
    elif problem == "not_tar":
        path.write_bytes(b"not an archive")
    else:
        with tarfile.open(path, "w:gz") as tar:
            _add(tar, "p/other.txt", b"x")
    with pytest.raises(DataError, match=match):
        read_inv3(path)
    assert list(tmp_path.iterdir()) == [path]  # nothing extracted anywhere


def test_real_head_ct_from_invesalius_has_bone_soft_tissue_and_its_face_in_front():
    need_debian("invesalius-examples")
    project = read_inv3(st.INVESALIUS_FILE)
    assert project.array.shape == (256, 256, 108) and project.modality == "CT"
    np.testing.assert_allclose(np.diag(project.affine)[:3], [-0.95703125, 0.95703125, 1.5], atol=1e-6)
    bone = next(m for n, m in project.masks.items() if project.thresholds[n][0] == 226)
    assert np.array_equal(bone, project.array >= 226)  # the mask is its recorded threshold, exactly
    image, labels, affine, names = st.head_ct()
    assert names == {301: "bone", 302: "soft tissue"} and set(np.unique(labels)) == {0, 301, 302}
    head = labels > 0
    # the sinuses and nasal cavity (air enclosed by the head) lie in front of and below its centre
    filled = np.stack([ndimage.binary_fill_holes(head[:, :, k]) for k in range(head.shape[2])], axis=2)
    air = filled & ~head & (image < -500)
    ras_air = affine @ np.r_[np.argwhere(air).mean(0), 1]
    ras_head = affine @ np.r_[np.argwhere(head).mean(0), 1]
    assert air.sum() > 10000 and ras_air[1] > ras_head[1] + 40 and ras_air[2] < ras_head[2] - 10


def test_real_chest_ct_labels_and_geometry_from_slicer_files():
    image, labels, affine, names = st.chest_ct()
    assert image.shape == labels.shape == (128, 128, 34)
    assert names[201] == "ribs" and names[205] == "right lung" and names[206] == "left lung"
    np.testing.assert_allclose(np.abs(np.diag(affine))[:3], [3.046875950, 3.046875950, 10.0], atol=1e-5)
    world = lambda v: affine @ np.r_[np.argwhere(labels == v).mean(0), 1]  # noqa: E731
    assert world(205)[0] > world(206)[0] + 50  # RAS: the right lung lies towards +x
    assert image[labels == 205].mean() < -600 < image[labels == 201].mean() + 900  # air in the lungs


def test_real_mni152_atlas_is_harvard_oxford_and_jhu_on_the_nlin6_head():
    need_debian("mricron-data")
    t1, labels, affine, names = st.mni152_atlas()
    values = set(np.unique(labels).tolist())
    assert set(range(1, 49)) <= values and {103, 147, 148} <= values and max(values) <= 412
    assert set(range(401, 413)) <= values and not values & set(range(149, 401))
    assert names[1] == "Frontal Pole" and names[148] == "Tapetum L"
    raw = np.asarray(nib.load(str(st.MRICRON_DIR / st.HO_FILE)).dataobj)
    ho = np.where(labels < 100, labels, 0)
    np.testing.assert_array_equal(ho, np.flip(raw, 0))  # stored LAS, resampled onto the RAS grid exactly
    assert t1[labels > 100].mean() > t1[(labels > 0) & (labels < 100)].mean() * 1.15  # tracts are white matter


def test_structures_split_holds_out_whole_structures(tmp_path):
    need_debian("mricron-data", "invesalius-examples")
    manifest_path = st.prepare_structures(tmp_path, volumes=("chest_ct", "mni152_atlas"))
    manifest = load_manifest(manifest_path)
    validate_manifest(manifest, read_data=False)
    doc = json.loads(manifest_path.read_text())
    assert [e["planes"] for e in doc["training"]] == [["axial"], ["axial", "coronal", "sagittal"]]
    for train, val in zip(manifest.splits["training"], manifest.splits["validation"]):
        seen = set(np.unique(np.asarray(nib.load(train["label"]).dataobj)).tolist())
        held = set(np.unique(np.asarray(nib.load(val["label"]).dataobj)).tolist()) - {0}
        assert held and held <= st.HELD_OUT and not (seen & st.HELD_OUT)
    assert st.prepare_structures(tmp_path) == manifest_path  # materialised once


def test_slice_dataset_honours_each_entrys_planes_and_window(tmp_path):
    """MR and CT train together: each manifest entry is sliced in its own planes with its own window."""
    import torch

    from medimg.data.promptable.slices import PromptSliceDataset

    vol = np.full((16, 12, 10), -1000.0, np.float32)
    lab = np.zeros(vol.shape, np.int16)
    vol[4:12, 3:9, 2:8], lab[4:12, 3:9, 2:8] = 300.0, 5
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / "ct.nii.gz"))
    nib.save(nib.Nifti1Image(lab, np.eye(4)), str(tmp_path / "lab.nii.gz"))
    seen = []

    def preprocess(img2d):
        seen.append(img2d.shape)
        x = torch.zeros(1, 3, 32, 32)
        x[0, :, : img2d.shape[0], : img2d.shape[1]] = torch.as_tensor(img2d, dtype=torch.float32)
        return x, img2d.shape

    item = {"image": str(tmp_path / "ct.nii.gz"), "label": str(tmp_path / "lab.nii.gz")}
    ds = PromptSliceDataset([{**item, "planes": ["axial", "sagittal"], "intensity": "ct_bone"}], preprocess, 32,
                            plane="coronal", intensity="mr", min_size=4)
    assert {s[5] for s in ds.samples} == {0, 1}  # one cache id per (volume, plane)
    assert (12, 16) in seen and (10, 12) in seen and (10, 16) not in seen  # axial and sagittal, no coronal
    ct_bone = ds.samples[0][0].max().item()
    assert 0 < ct_bone < 255  # 300 HU in the bone window (-500..1300) is mid-grey; "mr" would stretch it to 255
    default = PromptSliceDataset([item], preprocess, 32, plane="coronal", intensity="mr", min_size=4)
    assert {s[5] for s in default.samples} == {0} and default.samples[0][0].max().item() == 255


def test_deep_grey_nuclei_come_from_aicha_split_at_the_midline_where_no_other_atlas_labels():
    """AICHA's parcels merged per structure: thalamus, caudate ... amygdala, each side, in their places (RAS mm)."""
    need_debian("mricron-data")
    t1, labels, affine, names = st.mni152_atlas()
    world = lambda v: (affine @ np.r_[np.argwhere(labels == v).mean(0), 1])[:3]  # noqa: E731
    assert names[401] == "Left Thalamus" and names[402] == "Right Thalamus" and names[412] == "Right Amygdala"
    expected = {"Thalamus": (11, -17, 6), "Caudate": (14, 10, 9), "Putamen": (25, 0, 1), "Hippocampus": (26, -22, -9)}
    for value in range(401, 413):
        x, y, z = world(value)
        side = 1 if value % 2 == 0 else -1  # even values are the right side: RAS +x
        assert side * x > 5, (names[value], x)
        structure = names[value].split()[1]
        if structure in expected:
            ex, ey, ez = expected[structure]
            assert abs(side * x - ex) < 8 and abs(y - ey) < 8 and abs(z - ez) < 8, (names[value], x, y, z)
        assert (labels == value).sum() > 200  # the pallidum is the smallest (it borders the capsules JHU keeps)
    thalamus = labels == 401
    assert t1[thalamus].mean() > t1[labels == 1].mean()  # grey nuclei brighter than cortex in T1, darker than tracts
    assert t1[thalamus].mean() < t1[labels == 103].mean()
    ho = np.rint(st.resample_to(nib.load(str(st.MRICRON_DIR / st.HO_FILE)), t1.shape, affine, 0))
    jhu = np.rint(st.resample_to(nib.load(str(st.MRICRON_DIR / st.JHU_FILE)), t1.shape, affine, 0))
    deep = labels > 400
    assert not (deep & ((ho > 0) | (jhu > 0))).any()  # the held-out atlas structures keep every voxel
