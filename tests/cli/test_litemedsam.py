from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from tests.helpers import flip_to_lps, run_module


def test_litemedsam_bundle_metrics(lite_run):
    metrics = json.loads((lite_run / "metrics.json").read_text())
    assert metrics["val/dice_box"] >= 0.3  # a real white-matter segmentation from a box, not noise
    assert metrics["zero_shot/val/dice_box"] >= 0.3
    assert metrics["val/dice_point5"] >= metrics["val/dice_point1"]  # corrections help
    assert metrics["validation_split"] == "manifest validation split"
    meta = json.loads((lite_run / "bundle" / "configs" / "metadata.json").read_text())
    assert meta["medimg_task"] == "promptable"
    assert meta["eval_metrics"]["validation_split"] == "manifest validation split"
    inference = json.loads((lite_run / "bundle" / "configs" / "inference.json").read_text())
    assert inference["plane"] == "coronal" and inference["intensity"] == "mr"


def _validation_boxes(bundle, mni_dir):
    """The held-out slices and tight boxes that training validated on, as world boxes on the volume."""
    from medimg.bundle.loader import load_bundle_network
    from medimg.data.promptable.simulation import box_from_mask
    from medimg.data.promptable.slices import PromptSliceDataset
    from medimg.data.slicing import SliceFrame
    from medimg.io.image import read_image

    net = load_bundle_network(bundle, "cpu")
    item = {"image": str(mni_dir / "t1_posterior.nii.gz"), "label": str(mni_dir / "labels_posterior.nii.gz")}
    ds = PromptSliceDataset([item], net.preprocess, net.img_size, plane="coronal", intensity="mr", classes=[2],
                            target_mode="label", slices_per_volume=3, seed=1)
    image = read_image(item["image"])
    frame = SliceFrame.from_affine(image.affine, image.array.shape, "coronal")
    boxes, truths = [], []
    for sample in ds.samples:
        _, _, canvas, size, _, _, k = sample
        mask = canvas[0, : int(size[0]), : int(size[1])].numpy() > 0.5
        x0, y0, x1, y1 = box_from_mask(mask.T)  # working (i, j) = slice (column, row)
        corners = frame.points_from_working(np.array([[x0, y0, k], [x1, y1, k]], dtype=float))
        world = nib.affines.apply_affine(image.affine, corners)
        boxes.append([*world.min(0).tolist(), *world.max(0).tolist()])
        truths.append((k, mask))
    return boxes, truths, image, frame


def test_infer_reproduces_validation_dice_coronal_ras_and_lps(lite_run, mni_dir, tmp_path):
    """The bundle reproduces what training validated: same slices, same boxes -> the same Dice (within 0.01).

    The volume is given as stored (RAS) and as an LPS copy; the predictor slices coronally in both
    (world boxes one coronal slice thick segment only that slice) and the masks are identical.
    """
    bundle = lite_run / "bundle"
    boxes, truths, image, frame = _validation_boxes(bundle, mni_dir)
    assert len(boxes) >= 2
    (tmp_path / "p.json").write_text(json.dumps({"space": "world", "boxes": boxes, "propagate": False}))
    vol, aff = flip_to_lps(image.array, image.affine)
    nib.save(nib.Nifti1Image(vol, aff), str(tmp_path / "lps.nii.gz"))
    masks = {}
    for name, path in (("ras", mni_dir / "t1_posterior.nii.gz"), ("lps", tmp_path / "lps.nii.gz")):
        out = tmp_path / f"{name}_seg.nii.gz"
        proc = run_module("medimg.infer", "--bundle", str(bundle), "--input", str(path),
                          "--prompts", str(tmp_path / "p.json"), "--output", str(out))
        assert proc.returncode == 0, proc.stderr[-3000:]
        masks[name] = np.asarray(nib.load(str(out)).dataobj)
    lps_back, _ = flip_to_lps(masks["lps"].astype(np.float32), aff)  # flipping twice restores RAS storage
    np.testing.assert_array_equal(lps_back.astype(np.uint8), masks["ras"])
    seg = frame.to_working(masks["ras"])
    dices = []
    for value, (k, truth) in enumerate(truths, start=1):
        assert set(np.unique(np.nonzero(seg == value)[2])) == {k}  # coronal: only the prompted slice
        pred = seg[:, :, k].T == value
        dices.append(2 * (pred & truth).sum() / (pred.sum() + truth.sum()))
    metrics = json.loads((lite_run / "metrics.json").read_text())
    print("validation Dice", metrics["val/dice_box"], "medimg.infer Dice", np.mean(dices), dices)
    assert abs(float(np.mean(dices)) - metrics["val/dice_box"]) <= 0.01


def test_infer_2d_slice_with_box(lite_run, mni_dir, tmp_path):
    t1 = nib.load(str(mni_dir / "t1.nii.gz"))
    slice2d = np.asarray(t1.dataobj, dtype=np.float32)[:, 120, :]  # coronal (i, k) slice
    aff2d = t1.affine[:, [0, 2, 1, 3]]
    nib.save(nib.Nifti1Image(slice2d, aff2d), str(tmp_path / "slice.nii.gz"))
    (tmp_path / "box.json").write_text(json.dumps({"space": "voxel", "boxes": [[40, 60, 150, 160]]}))
    proc = run_module("medimg.infer", "--bundle", str(lite_run / "bundle"), "--input", str(tmp_path / "slice.nii.gz"),
                      "--prompts", str(tmp_path / "box.json"), "--output", str(tmp_path / "seg.nii.gz"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    seg = nib.load(str(tmp_path / "seg.nii.gz"))
    src = nib.load(str(tmp_path / "slice.nii.gz"))
    assert seg.shape == src.shape and np.abs(seg.affine - src.affine).max() <= 1e-4
    mask = np.asarray(seg.dataobj)
    assert mask.any() and not mask[:40].any() and not mask[151:].any()  # inside the box


def test_infer_3d_world_box_on_lps_volume(lite_run, mni_dir, tmp_path):
    """A 3D box in world mm on an LPS-stored copy of the real T1: 3D mask in the input's geometry."""
    t1 = nib.load(str(mni_dir / "t1.nii.gz"))
    vol, aff = flip_to_lps(np.asarray(t1.dataobj, dtype=np.float32), t1.affine)
    nib.save(nib.Nifti1Image(vol, aff), str(tmp_path / "lps.nii.gz"))
    # RAS mm box around the brain, 6 axial slices thick
    (tmp_path / "box.json").write_text(json.dumps({"space": "world", "boxes": [[-60, -90, 10, 60, 60, 15]]}))
    proc = run_module("medimg.infer", "--bundle", str(lite_run / "bundle"), "--input", str(tmp_path / "lps.nii.gz"),
                      "--prompts", str(tmp_path / "box.json"), "--output", str(tmp_path / "seg.nii.gz"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    seg = nib.load(str(tmp_path / "seg.nii.gz"))
    assert seg.shape == vol.shape and np.abs(seg.affine - aff).max() <= 1e-4
    mask = np.asarray(seg.dataobj) > 0
    ks = np.nonzero(mask.any(axis=(0, 1)))[0]
    k_lo, k_hi = (np.array([10, 15]) - aff[2, 3]) / aff[2, 2]
    assert len(ks) and ks.min() >= round(min(k_lo, k_hi)) and ks.max() <= round(max(k_lo, k_hi))


def test_monai_bundle_run_with_prompts(lite_run, mni_dir, tmp_path):
    t1 = nib.load(str(mni_dir / "t1.nii.gz"))
    nib.save(nib.Nifti1Image(np.asarray(t1.dataobj, dtype=np.float32)[:, :, 70], t1.affine),
             str(tmp_path / "axial.nii.gz"))
    (tmp_path / "p.json").write_text(json.dumps({"boxes": [[30, 40, 170, 200]]}))
    bundle = lite_run / "bundle"
    proc = run_module("monai.bundle", "run", "--config_file", str(bundle / "configs" / "inference.json"),
                      "--bundle_root", str(bundle), "--input_file", str(tmp_path / "axial.nii.gz"),
                      "--prompts_file", str(tmp_path / "p.json"), "--output_file", str(tmp_path / "o.nii.gz"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert nib.load(str(tmp_path / "o.nii.gz")).shape == (197, 233)


@pytest.mark.parametrize("doc,problem", [
    ({"boxes": [[1, 2, 3]]}, "needs 4 numbers"),
    ({"points": [[10, 10]], "point_labels": [1, 0]}, "point_labels"),
    ({"boxes": [[500, 500, 600, 600]]}, "outside the image"),
    ({"space": "mm", "boxes": [[1, 2, 3, 4]]}, "space must be"),
    ({}, "no boxes and no points"),
])
def test_bad_prompts_exit_2(lite_run, mni_dir, tmp_path, doc, problem):
    from medimg.infer import main

    t1 = nib.load(str(mni_dir / "t1.nii.gz"))
    nib.save(nib.Nifti1Image(np.asarray(t1.dataobj, dtype=np.float32)[:, :, 70], t1.affine),
             str(tmp_path / "axial.nii.gz"))
    (tmp_path / "p.json").write_text(json.dumps(doc))
    out = tmp_path / "o.nii.gz"
    code = main(["--bundle", str(lite_run / "bundle"), "--input", str(tmp_path / "axial.nii.gz"),
                 "--prompts", str(tmp_path / "p.json"), "--output", str(out)])
    assert code == 2 and not out.exists()


def test_medsam2d_trains_exports_and_infers_with_a_checkpoint(medsam2d_run, tmp_path, mni_dir):
    """medsam2d with a tiny ViT and MedSAM-format weights from a file (random values, official layout)."""
    import torch

    run = medsam2d_run
    meta = json.loads((run / "bundle" / "configs" / "metadata.json").read_text())
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == [256, 256]
    state = torch.load(run / "bundle" / "models" / "model.pt", weights_only=True)
    assert any(".adapter." in k for k in state)
    t1 = nib.load(str(mni_dir / "t1.nii.gz"))
    nib.save(nib.Nifti1Image(np.asarray(t1.dataobj, dtype=np.float32)[:, :, 70], t1.affine), str(tmp_path / "a.nii.gz"))
    (tmp_path / "p.json").write_text(json.dumps({"points": [[100, 110]], "point_labels": [1]}))
    inf = run_module("medimg.infer", "--bundle", str(run / "bundle"), "--input", str(tmp_path / "a.nii.gz"),
                     "--prompts", str(tmp_path / "p.json"), "--output", str(tmp_path / "o.nii.gz"))
    assert inf.returncode == 0, inf.stderr[-2000:]
    assert nib.load(str(tmp_path / "o.nii.gz")).shape == (197, 233)


def test_medsam2d_without_checkpoint_warns_loudly(caplog):
    from medimg.models.sam.builders import warn_if_random

    with caplog.at_level("WARNING"):
        assert warn_if_random({"name": "medsam", "checkpoint": None, "pretrained": None})
    assert "RANDOM INITIALISATION" in caplog.text
    assert not warn_if_random({"name": "medsam", "checkpoint": "/w/medsam_vit_b.pth"})
    assert not warn_if_random({"name": "litemedsam", "pretrained": True})


def test_ct_window_on_the_command_line(lite_run, mni_dir, tmp_path, capsys):
    from medimg.infer import main

    t1 = nib.load(str(mni_dir / "t1.nii.gz"))
    nib.save(nib.Nifti1Image(np.asarray(t1.dataobj, dtype=np.float32)[:, :, 70], t1.affine),
             str(tmp_path / "axial.nii.gz"))
    (tmp_path / "p.json").write_text(json.dumps({"boxes": [[30, 40, 170, 200]]}))
    args = ["--bundle", str(lite_run / "bundle"), "--input", str(tmp_path / "axial.nii.gz"),
            "--prompts", str(tmp_path / "p.json"), "--output", str(tmp_path / "o.nii.gz")]
    assert main([*args, "--intensity", "lung"]) == 2
    assert "unknown intensity preset 'lung'" in capsys.readouterr().err
    assert main([*args, "--intensity", "ct_brain"]) == 0 and (tmp_path / "o.nii.gz").is_file()
