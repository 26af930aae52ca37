from __future__ import annotations

import csv
import json

import torch

from tests.cli.conftest import train
from tests.helpers import run_module


def test_train_reports_per_class_metrics_and_artifacts(phantom_run, phantom_manifest):
    """The logged per-class Dice is what the exported bundle gives on the validation volumes (within 0.01)."""
    import nibabel as nib
    import numpy as np

    from medimg import load_bundle

    metrics = json.loads((phantom_run / "metrics.json").read_text())
    assert metrics["validation_split"] == "manifest validation split"
    predictor = load_bundle(phantom_run / "bundle", device="cpu")
    items = json.loads(phantom_manifest.read_text())["validation"][:1]  # trainer=debug validates one volume
    for c, name in ((1, "object1"), (2, "object2")):
        dices = []
        for item in items:
            pred = predictor.predict(phantom_manifest.parent / item["image"]).array
            truth = np.asarray(nib.load(str(phantom_manifest.parent / item["label"])).dataobj)
            p, t = pred == c, truth == c
            dices.append(2 * (p & t).sum() / max(p.sum() + t.sum(), 1))
        assert abs(float(np.mean(dices)) - metrics[f"val/dice_{name}"]) <= 0.01, (name, dices, metrics)
        assert metrics[f"val/hd95_{name}"] > 0.0 and metrics[f"val/nsd_{name}"] >= 0.0
    assert sorted(p.name for p in (phantom_run / "overlays").glob("*.png")) == ["epoch_000.png", "epoch_001.png",
                                                                               "epoch_002.png"]
    rows = list(csv.DictReader((phantom_run / "logs" / "metrics.csv").open()))
    assert any(r.get("train/loss_step") for r in rows)
    assert list((phantom_run / "tensorboard").glob("events.out.tfevents.*"))
    assert (phantom_run / "checkpoints" / "last.ckpt").is_file()


def test_bundle_layout_and_plain_state_dict(phantom_run, schema):
    bundle = phantom_run / "bundle"
    for rel in ("configs/metadata.json", "configs/inference.json", "models/model.pt", "docs/README.md", "LICENSE"):
        assert (bundle / rel).is_file(), rel
    state = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert all(not k.startswith(("network.", "model.")) for k in state)
    assert "swinViT.patch_embed.proj.weight" in state
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["network_data_format"]["outputs"]["pred"]["num_channels"] == 3
    assert meta["labels"] == {"background": 0, "object1": 1, "object2": 2}
    # keep_main_component "auto" settled by the validation: the phantom's separate spheres lose by it
    metrics = json.loads((phantom_run / "metrics.json").read_text())
    inference = json.loads((bundle / "configs" / "inference.json").read_text())
    assert inference["keep_main_component"] is (metrics["val/dice_main_component"] >= metrics["val/dice"] - 0.005)
    assert inference["main_component_opening_mm"] == 3.0
    # so is the intensity refinement: chosen only when it costs no validation Dice
    assert inference["intensity_refinement"] is (metrics["val/dice_refined"] >= metrics["val/dice"])
    # MONAI's own CLI accepts it
    proc = run_module("monai.bundle", "verify_metadata", "--meta_file", str(bundle / "configs" / "metadata.json"),
                      "--filepath", str(schema))
    assert proc.returncode == 0 and "verified with no error" in (proc.stdout + proc.stderr)


def test_export_cli_from_checkpoint(phantom_run, tmp_path, schema):
    out = tmp_path / "exported"
    ckpt = phantom_run / "checkpoints" / "last.ckpt"
    proc = run_module("medimg.export", str(ckpt), "--out", str(out), "--schema", str(schema), "--no-standard")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "verified" in proc.stdout
    full = torch.load(ckpt, weights_only=True)["state_dict"]
    exported = torch.load(out / "models" / "model.pt", weights_only=True)
    torch.testing.assert_close(exported["out.conv.conv.weight"], full["network.out.conv.conv.weight"])
    again = run_module("medimg.export", str(ckpt), "--out", str(out), "--schema", str(schema))
    assert again.returncode == 2 and again.stderr.strip().count("\n") == 0 and "already exists" in again.stderr


def test_train_bad_manifest_is_one_line(tmp_path):
    proc = train(tmp_path, "data.dataset=null", f"data.manifest={tmp_path}/nope.json", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"error: {tmp_path}/nope.json: manifest not found"
    assert "Traceback" not in proc.stderr
