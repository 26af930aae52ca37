from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from tests.cli.conftest import WM_CLICK_RAS
from tests.helpers import flip_to_lps, run_module


def test_bundle_is_verified_and_records_the_3d_frame(run3d):
    metrics = json.loads((run3d / "metrics.json").read_text())
    for prompt in ("box", "point1", "point3", "point5"):  # a tiny 4 mm model after 50 steps: clearly learning
        assert metrics[f"val/dice_{prompt}"] >= 0.4, metrics
    for prompt in ("box", "point1"):  # the bundle's whole-volume predictor
        assert metrics[f"val/volume_dice_{prompt}"] >= 0.3, metrics
    assert metrics["validation_split"].startswith("region split")
    inference = json.loads((run3d / "bundle" / "configs" / "inference.json").read_text())
    assert inference["roi_size"] == [32, 32, 32] and inference["pixdim"] == [4.0, 4.0, 4.0]
    assert inference["network_def"]["name"] == "medsam3d" and "checkpoint" not in inference["network_def"]
    meta = json.loads((run3d / "bundle" / "configs" / "metadata.json").read_text())
    assert meta["medimg_task"] == "promptable" and meta["network_data_format"]["inputs"]["image"]["num_channels"] == 1


@pytest.mark.parametrize("frame", ["ras", "lps"])
def test_world_click_on_mni_comes_back_in_the_input_geometry(run3d, mni_dir, tmp_path, frame):
    """Geometry and prompt mapping end to end. (Whether the clicked voxel is inside the mask is a
    property of the trained model, not of the path: the tiny test model is too weak to assert it;
    see benchmarks/sam3d_clicks.py and the stand-in network in tests/models/test_volume_predictor.py.)"""
    t1 = nib.load(str(mni_dir / "t1.nii.gz"))
    vol, aff = np.asarray(t1.dataobj, dtype=np.float32), t1.affine
    if frame == "lps":
        vol, aff = flip_to_lps(vol, aff)
    nib.save(nib.Nifti1Image(vol, aff), str(tmp_path / "t1.nii.gz"))
    (tmp_path / "p.json").write_text(json.dumps({"space": "world", "points": [WM_CLICK_RAS], "point_labels": [1]}))
    proc = run_module("medimg.infer", "--bundle", str(run3d / "bundle"), "--input", str(tmp_path / "t1.nii.gz"),
                      "--prompts", str(tmp_path / "p.json"), "--output", str(tmp_path / "seg.nii.gz"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    seg = nib.load(str(tmp_path / "seg.nii.gz"))
    assert seg.shape == vol.shape and np.abs(seg.affine - aff).max() <= 1e-4
    mask = np.asarray(seg.dataobj) > 0
    assert mask.any() and mask.sum() < 0.5 * vol.size
    assert (vol[mask] > 0).mean() > 0.95  # in the head, not in the background
    if frame == "lps":  # the same mask as on the RAS-stored T1, stored the LPS way
        ras = tmp_path.parent / "ras_seg.npy"
        if ras.is_file():
            np.testing.assert_array_equal(mask, np.load(ras)[::-1, ::-1])
    else:
        np.save(tmp_path.parent / "ras_seg.npy", mask)


def test_monai_bundle_run_with_a_3d_box(run3d, mni_dir, tmp_path):
    bundle = run3d / "bundle"
    (tmp_path / "p.json").write_text(json.dumps({"space": "voxel", "boxes": [[60, 80, 60, 130, 150, 110]]}))
    proc = run_module("monai.bundle", "run", "--config_file", str(bundle / "configs" / "inference.json"),
                      "--bundle_root", str(bundle), "--input_file", str(mni_dir / "t1.nii.gz"),
                      "--prompts_file", str(tmp_path / "p.json"), "--output_file", str(tmp_path / "o.nii.gz"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = np.asarray(nib.load(str(tmp_path / "o.nii.gz")).dataobj)
    assert out.shape == nib.load(str(mni_dir / "t1.nii.gz")).shape
    assert out.any() and not out[:50].any() and not out[:, :, :50].any()  # nothing far outside the box


def test_bad_3d_prompt_is_one_line_exit_2(run3d, mni_dir, tmp_path):
    (tmp_path / "p.json").write_text(json.dumps({"points": [[10, 10]]}))
    proc = run_module("medimg.infer", "--bundle", str(run3d / "bundle"), "--input", str(mni_dir / "t1.nii.gz"),
                      "--prompts", str(tmp_path / "p.json"), "--output", str(tmp_path / "seg.nii.gz"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error:") and "p.json" in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert not (tmp_path / "seg.nii.gz").exists()


def test_infer_reproduces_the_whole_volume_validation(run3d, mni_dir, tmp_path):
    """The final validation runs the bundle's own predictor on the whole held-out region from fixed clicks;
    medimg.infer with the same clicks and boxes (world mm) on that volume reaches the same Dice (within 0.01)."""
    from nibabel.affines import apply_affine

    from medimg.data.promptable.patches import PromptPatchDataset, load_volumes, world_range_region
    from medimg.data.promptable.simulation import box_from_mask
    from medimg.data.transforms import build_pipeline, geometry_spec

    item = {"image": str(mni_dir / "t1.nii.gz"), "label": str(mni_dir / "labels.nii.gz")}
    geom = build_pipeline(geometry_spec(["image"], [4.0, 4.0, 4.0], label_key=None))({"image": item["image"]})["image"]
    affine = np.asarray(geom.affine, dtype=np.float64)
    nib.save(nib.Nifti1Image(np.asarray(geom[0], dtype=np.float32), affine), str(tmp_path / "t1_4mm.nii.gz"))
    image, label, aff = load_volumes([item], [4.0, 4.0, 4.0], "mr", with_affine=True)[0]
    np.testing.assert_allclose(aff, affine)
    region = world_range_region(image.shape, aff, 1, None, -28.0)
    val = PromptPatchDataset([(image, label)], [32, 32, 32], classes=[2], target_mode="label", samples=None,
                             clicks_per_target=2, regions=[region], seed=1)
    metrics = json.loads((run3d / "metrics.json").read_text())
    for prompt in ("point1", "box"):
        dices = []
        for sample in val.fixed:
            click = sample["volume_click"].numpy()
            truth, reg = val.volume_target(sample["target_index"], click.astype(int))
            if prompt == "point1":
                doc = {"space": "world", "points": [apply_affine(aff, click).tolist()], "point_labels": [1]}
            else:
                b = box_from_mask(truth)
                corners = apply_affine(aff, np.array([b[:3], b[3:]]))
                doc = {"space": "world", "boxes": [[*corners.min(0).tolist(), *corners.max(0).tolist()]]}
            (tmp_path / "p.json").write_text(json.dumps(doc))
            out = tmp_path / "seg.nii.gz"
            proc = run_module("medimg.infer", "--bundle", str(run3d / "bundle"), "--input",
                              str(tmp_path / "t1_4mm.nii.gz"), "--prompts", str(tmp_path / "p.json"),
                              "--output", str(out))
            assert proc.returncode == 0, proc.stderr[-3000:]
            pred = (np.asarray(nib.load(str(out)).dataobj) > 0) & reg
            dices.append(2 * (pred & truth).sum() / (pred.sum() + truth.sum()))
        print(prompt, "validation", metrics[f"val/volume_dice_{prompt}"], "medimg.infer", np.mean(dices))
        assert abs(np.mean(dices) - metrics[f"val/volume_dice_{prompt}"]) <= 0.01
