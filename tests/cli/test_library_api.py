"""``medimg.load_bundle`` for every bundle kind and every input type, against ``medimg.infer``.

Each input type holds the same voxels and geometry (an oblique, non-RAS affine). The predictor
must answer in the input's own type with the input's geometry, and with exactly the labels (or
probabilities) that ``medimg.infer`` writes for the same image.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.data import MetaTensor

import medimg
from medimg.infer import main as infer
from tests.helpers import RAS_TO_LPS, flip_to_lps, oblique_affine, write_dicom_series

TYPES = ("path", "dicom", "nibabel", "simpleitk", "metatensor", "array")


def to_sitk(array: np.ndarray, affine: np.ndarray) -> sitk.Image:
    nd = array.ndim
    img = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(tuple(range(nd - 1, -1, -1)))))
    lps = RAS_TO_LPS @ affine
    spacing = np.linalg.norm(lps[:nd, :nd], axis=0)
    img.SetSpacing(spacing.tolist())
    img.SetDirection((lps[:nd, :nd] / spacing).ravel().tolist())
    img.SetOrigin(lps[:nd, 3].tolist())
    return img


def make_input(kind: str, array: np.ndarray, affine: np.ndarray, tmp: Path) -> tuple[object, dict]:
    """The image as ``kind``, and the keyword arguments ``predict`` needs with it."""
    if kind == "path":
        path = tmp / "image.nii.gz"
        nib.save(nib.Nifti1Image(array, affine), str(path))
        return path, {}
    if kind == "dicom":
        vol = array if array.ndim == 3 else array[..., None]
        write_dicom_series(np.round(vol), affine, tmp / "dicom")
        return tmp / "dicom", {}
    if kind == "nibabel":
        return nib.Nifti1Image(array, affine), {}
    if kind == "simpleitk":
        return to_sitk(array, affine), {}  # 2D: the x-y geometry of an axial slice
    if kind == "metatensor":
        return MetaTensor(torch.from_numpy(array)[None], affine=torch.as_tensor(affine)), {}
    return array, {"affine": affine}


def unwrap(kind: str, result: object, source: object) -> np.ndarray:
    """The labels of ``result``, after checking it has the input's type and geometry."""
    if kind in ("path", "dicom"):
        assert isinstance(result, medimg.Image)
        return np.asarray(result.array)
    if kind == "nibabel":
        assert isinstance(result, nib.Nifti1Image) and result.shape == source.shape
        np.testing.assert_allclose(result.affine, source.affine, atol=1e-6)
        return np.asarray(result.dataobj)
    if kind == "simpleitk":
        assert isinstance(result, sitk.Image) and result.GetSize() == source.GetSize()
        for get in ("GetOrigin", "GetSpacing", "GetDirection"):
            np.testing.assert_allclose(getattr(result, get)(), getattr(source, get)(), atol=1e-9)
        arr = sitk.GetArrayFromImage(result)
        return arr.transpose(tuple(range(arr.ndim - 1, -1, -1)))
    if kind == "metatensor":
        assert isinstance(result, MetaTensor) and result.shape == source.shape
        np.testing.assert_allclose(result.affine.numpy(), source.affine.numpy(), atol=1e-6)
        return result[0].numpy()
    assert isinstance(result, np.ndarray) and result.shape == source.shape
    return result


def infer_labels(bundle: Path, image: Path, tmp: Path, prompts: dict | None = None) -> np.ndarray:
    out = tmp / f"infer_{image.name.split('.')[0]}.nii.gz"
    args = ["--bundle", str(bundle), "--input", str(image), "--output", str(out), "--device", "cpu"]
    if prompts is not None:
        (tmp / "prompts.json").write_text(json.dumps(prompts))
        args += ["--prompts", str(tmp / "prompts.json")]
    assert infer(args) == 0
    return np.asarray(nib.load(str(out)).dataobj)


@pytest.fixture(scope="module")
def volume(mni_dir) -> tuple[np.ndarray, np.ndarray]:
    """The held-out MNI152 slab, stored LPS and rotated 20 degrees (an oblique, non-RAS image)."""
    t1 = nib.load(str(mni_dir / "t1_posterior.nii.gz"))
    vol, aff = flip_to_lps(np.asarray(t1.dataobj, dtype=np.float32), t1.affine)
    return np.round(vol[::2, :, ::2]), oblique_affine(aff @ np.diag([2.0, 1.0, 2.0, 1.0]), 20.0)


@pytest.fixture(scope="module")
def axial_slice(mni_dir) -> tuple[np.ndarray, np.ndarray]:
    """One axial MNI152 slice as a 2D image (a 3D affine that places it in space)."""
    t1 = nib.load(str(mni_dir / "t1.nii.gz"))
    aff = t1.affine.copy()
    aff[:3, 3] += aff[:3, 2] * 70
    return np.round(np.asarray(t1.dataobj, dtype=np.float32)[:, :, 70]), aff


def check_all_types(bundle: Path, array: np.ndarray, affine: np.ndarray, tmp: Path, **prompts) -> None:
    predictor = medimg.load_bundle(bundle, device="cpu")
    json_prompts = None
    if prompts:
        assert isinstance(predictor, medimg.PromptSegmenter)
        json_prompts = {k: np.asarray(v).tolist() for k, v in prompts.items()}
    else:
        assert isinstance(predictor, medimg.Segmenter)
    path = make_input("path", array, affine, tmp)[0]
    reference = infer_labels(bundle, path, tmp, json_prompts)
    assert reference.any()
    affine = nib.load(str(path)).affine  # the geometry as the file holds it (a NIfTI stores float32)
    for kind in TYPES:
        source, extra = make_input(kind, array, affine, tmp / kind)
        labels = unwrap(kind, predictor.predict(source, **extra, **prompts), source)
        expected = infer_labels(bundle, source, tmp / kind, json_prompts) if kind == "dicom" else reference
        assert labels.shape == expected.shape, kind
        agreement = (labels == expected).mean()
        # SimpleITK rebuilds the affine from spacing x direction: equal to ~1e-16, which can flip a near tie
        assert agreement >= (0.999 if kind == "simpleitk" else 1.0), \
            f"{kind}: {agreement:.5f} of the voxels agree with medimg.infer"


@pytest.fixture(autouse=True)
def _folders(tmp_path):
    for kind in TYPES:
        (tmp_path / kind).mkdir()


def test_swin_unetr(mni_run, volume, tmp_path):
    check_all_types(mni_run / "bundle", *volume, tmp_path)


def test_vit_seg(vit_seg_run, volume, tmp_path):
    check_all_types(vit_seg_run / "bundle", *volume, tmp_path)


def test_litemedsam_box_on_a_2d_image(lite_run, axial_slice, tmp_path):
    check_all_types(lite_run / "bundle", *axial_slice, tmp_path, boxes=[[60, 70, 140, 160]])


def test_medsam2d_clicks_on_a_2d_image(medsam2d_run, axial_slice, tmp_path):
    check_all_types(medsam2d_run / "bundle", *axial_slice, tmp_path, points=[[100, 110], [40, 40]],
                    point_labels=[1, 0])


def test_medsam3d_click_on_an_oblique_volume(run3d, volume, tmp_path):
    array, affine = volume
    click = (np.asarray(array.shape) // 2).astype(float)
    check_all_types(run3d / "bundle", array, affine, tmp_path, points=[click.tolist()])


def test_litemedsam_world_prompts_mean_the_voxel_prompts(lite_run, mni_dir):
    """A 3D box given in world mm on an LPS volume is the voxel box it covers: the same mask."""
    t1 = nib.load(str(mni_dir / "t1_posterior.nii.gz"))
    array, affine = flip_to_lps(np.asarray(t1.dataobj, dtype=np.float32), t1.affine)
    image = nib.Nifti1Image(array, affine)
    affine = image.affine
    predictor = medimg.load_bundle(lite_run / "bundle", device="cpu")
    box = np.array([110.0, 40.0, 110.0, 140.0, 44.0, 140.0])
    voxel = np.asarray(predictor.predict(image, boxes=[box]).dataobj)
    world = nib.affines.apply_affine(affine, np.stack([box[:3], box[3:]]))
    by_world = np.asarray(predictor.predict(image, boxes=[np.concatenate(world)], space="world").dataobj)
    assert voxel.sum() > 100 and voxel.shape == array.shape
    np.testing.assert_array_equal(by_world, voxel)
    assert not voxel[:, :40].any() and not voxel[:, 45:].any()  # a 3D box bounds its object


def test_vit_cls_probabilities_for_every_input_type(cls_run, tmp_path):
    import csv

    from medimg.io.image import read_image

    predictor = medimg.load_bundle(cls_run / "bundle", device="cpu")
    assert isinstance(predictor, medimg.Classifier)
    with open(_csv()) as f:
        rows = list(csv.DictReader(f))
    image = read_image(_csv().parent / rows[-1]["image"], spatial_dims=None)
    array = image.array  # a 2.5D slab: neighbouring slices become the channels
    out = tmp_path / "probs.json"
    nib.save(nib.Nifti1Image(array, image.affine), str(tmp_path / "slice.nii.gz"))
    assert infer(["--bundle", str(cls_run / "bundle"), "--input", str(tmp_path / "slice.nii.gz"), "--output",
                  str(out), "--device", "cpu"]) == 0
    expected = json.loads(out.read_text())["predictions"][0]["probabilities"]
    for kind in TYPES:
        source, extra = make_input(kind, array, image.affine, tmp_path / kind)
        want = expected
        if kind == "dicom":  # DICOM stores rounded integers: compare with medimg.infer on the folder itself
            assert infer(["--bundle", str(cls_run / "bundle"), "--input", str(source), "--output",
                          str(tmp_path / "dicom.json"), "--device", "cpu"]) == 0
            want = json.loads((tmp_path / "dicom.json").read_text())["predictions"][0]["probabilities"]
        probs = predictor.predict(source, **extra)
        assert probs.keys() == want.keys()
        np.testing.assert_allclose([probs[k] for k in want], list(want.values()), atol=1e-5, err_msg=kind)
    assert len(predictor.predict([tmp_path / "slice.nii.gz", array])) == 2


def _csv() -> Path:
    from medimg.data.embedded.mni_slices import embedded_csv

    return embedded_csv("mni152_levels")


def test_bad_inputs_are_data_errors(mni_run):
    predictor = medimg.load_bundle(mni_run / "bundle", device="cpu")
    with pytest.raises(medimg.DataError, match="affine"):
        predictor.predict(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), affine=np.eye(4))
    with pytest.raises(medimg.DataError, match="unsupported input"):
        predictor.predict({"image": "x"})
    with pytest.raises(medimg.DataError, match="NaN"):
        predictor.predict(np.full((8, 8, 8), np.nan, np.float32), affine=np.eye(4))
    with pytest.raises(medimg.BundleError, match="no such bundle"):
        medimg.load_bundle(mni_run / "nowhere")
