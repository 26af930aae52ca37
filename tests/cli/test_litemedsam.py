from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from tests.cli.conftest import run_dir_of
from tests.helpers import flip_to_lps, run_module

TINY_LITE = ["bundle=litemedsam", "trainer=debug", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
             "trainer.max_epochs=1", "data.train_slices=3", "data.val_slices=2", "data.batch_size=2"]


@pytest.fixture(scope="module")
def lite_run(tmp_path_factory, schema, mni_dir):
    runs = tmp_path_factory.mktemp("runs")
    proc = run_module("medimg.train", *TINY_LITE, f"runs_dir={runs}", f"data.dataset_dir={mni_dir}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "zero-shot Dice" in proc.stdout and "trainable" in proc.stdout + proc.stderr
    return run_dir_of(proc)


def test_litemedsam_bundle_metrics(lite_run):
    metrics = json.loads((lite_run / "metrics.json").read_text())
    for prompt in ("box", "point1", "point5"):
        assert 0.0 <= metrics[f"val/dice_{prompt}"] <= 1.0
        assert 0.0 <= metrics[f"zero_shot/val/dice_{prompt}"] <= 1.0
    meta = json.loads((lite_run / "bundle" / "configs" / "metadata.json").read_text())
    assert meta["medimg_task"] == "promptable"


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


def test_medsam2d_trains_exports_and_infers_with_a_checkpoint(tmp_path, schema, mni_dir):
    """medsam2d with a tiny ViT and MedSAM-format weights from a file (random values, official layout)."""
    import torch

    from medimg.models import build_network

    src = build_network("medsam", size="tiny", img_size=256)
    torch.save({k: v.clone() for k, v in src.state_dict().items()}, tmp_path / "medsam_tiny.pth")
    tiny = [a.replace("bundle=litemedsam", "bundle=medsam2d") for a in TINY_LITE]
    proc = run_module("medimg.train", *tiny, f"runs_dir={tmp_path / 'runs'}", f"data.dataset_dir={mni_dir}",
                      "model.size=tiny", "model.img_size=256", f"model.checkpoint={tmp_path / 'medsam_tiny.pth'}",
                      "model.adapters=true", "task.freeze=adapters_only", "task.zero_shot_eval=false")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "loaded" in proc.stdout + proc.stderr and "RANDOM INITIALISATION" not in proc.stdout + proc.stderr
    run = run_dir_of(proc)
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
