"""End to end: mae_pretrain -> vit_cls (with its encoder) -> verified bundle -> probabilities; vit_seg."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.cli.conftest import run_dir_of, train_vit
from tests.helpers import flip_to_lps, run_module


def test_mae_run_writes_an_official_layout_encoder(mae_run):
    import torch

    state = torch.load(mae_run, weights_only=True)
    assert set(state) == {"model"} and "blocks.0.attn.qkv.weight" in state["model"]
    assert list((mae_run.parent / "reconstructions").glob("epoch_*.png"))


def test_vit_cls_bundle_metrics_and_probabilities(cls_run, tmp_path, _data_root):
    """The bundle's probabilities on the whole validation set reproduce the logged accuracy and AUROC."""
    import csv

    import torch
    from torchmetrics.functional.classification import multiclass_auroc

    metrics = json.loads((cls_run / "metrics.json").read_text())
    assert list((cls_run / "confusion").glob("epoch_*.png"))
    inference = json.loads((cls_run / "bundle" / "configs" / "inference.json").read_text())
    assert inference["class_names"] == ["skull_base", "basal_ganglia", "ventricle_roof", "vertex"]
    assert "backbone_checkpoint" not in inference["network_def"] and inference["network_def"]["peft"] == "dvpt"
    root = _data_root / "mni152_levels"
    rows = [r for r in csv.DictReader((root / "levels.csv").open()) if r["split"] == "validation"]
    rows = rows[:64]  # trainer=debug validates one batch of 64, in manifest order
    folder = tmp_path / "in"
    folder.mkdir()
    for r in rows:
        (folder / Path(r["image"]).name).symlink_to(root / r["image"])
    images = sorted(folder.iterdir())
    out = tmp_path / "probs.json"
    proc = run_module("medimg.infer", "--bundle", str(cls_run / "bundle"), "--input", str(folder), "--output", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert len(result["predictions"]) == len(rows) and result["classes"] == inference["class_names"]
    for row in result["predictions"]:
        assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert row["label"] == max(row["probabilities"], key=row["probabilities"].get)
    truth = {Path(r["image"]).name: inference["class_names"].index(r["label"]) for r in rows}
    probs = torch.tensor([[row["probabilities"][c] for c in inference["class_names"]] for row in result["predictions"]])
    target = torch.tensor([truth[Path(row["input"]).name] for row in result["predictions"]])
    accuracy = float((probs.argmax(1) == target).float().mean())
    auroc = float(multiclass_auroc(probs, target, 4, average="macro"))
    print("validation accuracy / AUROC", metrics["val/accuracy"], metrics["val/auroc"], "bundle", accuracy, auroc)
    assert abs(accuracy - metrics["val/accuracy"]) <= 0.01 and abs(auroc - metrics["val/auroc"]) <= 0.01
    # the MONAI bundle CLI runs the same predictor
    out2 = tmp_path / "monai.json"
    proc = run_module("monai.bundle", "run", "--config_file", str(cls_run / "bundle" / "configs" / "inference.json"),
                      "--bundle_root", str(cls_run / "bundle"), "--datalist", f"['{images[0]}']",
                      "--output_file", str(out2))
    assert proc.returncode == 0, proc.stderr[-2000:]
    first = json.loads(out2.read_text())["predictions"][0]["probabilities"]
    assert first == pytest.approx(result["predictions"][0]["probabilities"], abs=1e-5)


def test_classification_infer_bad_output_is_one_line(cls_run, tmp_path):
    proc = run_module("medimg.infer", "--bundle", str(cls_run / "bundle"), "--input", str(tmp_path),
                      "--output", str(tmp_path / "x.nii.gz"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "x.nii.gz" in proc.stderr and ".json" in proc.stderr


def test_vit_cls_defaults_without_checkpoint_warn_loudly(tmp_path, schema):
    proc = train_vit(tmp_path, "bundle=vit_cls", "model.peft=lora", "model.backbone=dinov2", "model.registers=true",
                  "model.in_chans=1")
    assert "RANDOMLY INITIALISED" in proc.stdout + proc.stderr
    assert (run_dir_of(proc) / "bundle" / "models" / "model.pt").is_file()


def test_vit_cls_on_a_multilabel_csv(tmp_path, schema):
    rng = np.random.default_rng(0)
    rows = ["image,split,bright,striped"]
    for i in range(24):
        bright, striped = i % 2, (i // 2) % 2
        img = rng.normal(size=(24, 24)).astype(np.float32) * 0.1 + bright
        if striped:
            img[::4] += 2.0
        nib.save(nib.Nifti1Image(img, np.eye(4)), str(tmp_path / f"i{i}.nii.gz"))
        rows.append(f"i{i}.nii.gz,{'validation' if i >= 16 else 'training'},{bright},{striped}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    proc = train_vit(tmp_path / "runs", "bundle=vit_cls", "data.dataset=null", f"data.csv={tmp_path / 'labels.csv'}",
                  "model.in_chans=1")
    metrics = json.loads((run_dir_of(proc) / "metrics.json").read_text())
    assert "val/auroc" in metrics and "val/kappa" not in metrics  # kappa is multi-class only


def test_vit_seg_bundle_keeps_input_geometry(vit_seg_run, tmp_path, mni_dir):
    bundle = vit_seg_run / "bundle"
    inference = json.loads((bundle / "configs" / "inference.json").read_text())
    assert inference["inferer"]["_target_"] == "SliceInferer" and inference["slice_axis"] == 1
    t1 = nib.load(str(mni_dir / "t1_posterior.nii.gz"))
    vol, aff = flip_to_lps(np.asarray(t1.dataobj, dtype=np.float32), t1.affine)
    nib.save(nib.Nifti1Image(vol, aff), str(tmp_path / "lps.nii.gz"))
    proc = run_module("medimg.infer", "--bundle", str(bundle), "--input", str(tmp_path / "lps.nii.gz"),
                      "--output", str(tmp_path / "seg.nii.gz"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    seg = nib.load(str(tmp_path / "seg.nii.gz"))
    assert seg.shape == vol.shape and np.allclose(seg.affine, aff)
    assert set(np.unique(np.asarray(seg.dataobj))) <= {0, 1, 2}
    # the bundle reproduces what was validated: medimg.infer on the held-out volume reaches the
    # validation Dice (measured on the input's grid), and the LPS copy gives the same labels
    proc = run_module("medimg.infer", "--bundle", str(bundle), "--input", str(mni_dir / "t1_posterior.nii.gz"),
                      "--output", str(tmp_path / "ras_seg.nii.gz"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    pred = np.asarray(nib.load(str(tmp_path / "ras_seg.nii.gz")).dataobj)
    truth = np.asarray(nib.load(str(mni_dir / "labels_posterior.nii.gz")).dataobj)
    dice = np.mean([2 * ((pred == c) & (truth == c)).sum() / ((pred == c).sum() + (truth == c).sum()) for c in (1, 2)])
    metrics = json.loads((vit_seg_run / "metrics.json").read_text())
    print("vit_seg validation Dice", metrics["val/dice"], "medimg.infer Dice", dice)
    assert abs(dice - metrics["val/dice"]) <= 0.01
    lps_back, _ = flip_to_lps(np.asarray(seg.dataobj).astype(np.float32), aff)
    assert (lps_back.astype(np.uint8)[truth > 0] == pred[truth > 0]).mean() >= 0.999


def test_vit_cls_under_ddp_checkpoints_on_the_monitored_auroc(tmp_path, schema):
    """Two CPU processes: val/auroc is logged on every rank, so the best-AUROC checkpoint is written and exported."""
    proc = train_vit(tmp_path, "bundle=vit_cls", "model.in_chans=1", "trainer.devices=2", "trainer.strategy=ddp",
                  "trainer.accelerator=cpu")
    run = run_dir_of(proc)
    best = list((run / "checkpoints").glob("best-*.ckpt"))
    assert len(best) == 1
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["checkpoint"] == str(best[0]) and 0.0 < metrics["val/auroc"] <= 1.0
    assert (run / "bundle" / "models" / "model.pt").is_file()
