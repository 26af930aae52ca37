"""``python -m medimg.data import``: nnU-Net v2, Decathlon and paired folders -> a manifest training can use."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medimg.data.importers import import_dataset
from medimg.data.manifest import load_manifest, train_val_split
from tests.helpers import run_module

AFFINE = np.diag([1.5, 1.5, 2.0, 1.0])


def volume(path: Path, seed: int, label: bool = False, affine: np.ndarray = AFFINE, top: int = 2) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = rng.integers(0, top + 1, (12, 10, 8)).astype(np.uint8) if label else rng.random((12, 10, 8)).astype(
        np.float32)
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def nnunet(root: Path, cases: int = 3, channels: int = 2, labels: dict | None = None, test: int = 1) -> Path:
    spec = {"channel_names": {str(c): f"mod{c}" for c in range(channels)},
            "labels": labels or {"background": 0, "liver": 1, "tumour": 2},
            "numTraining": cases, "file_ending": ".nii.gz", "name": "Dataset042_Toy"}
    root.mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps(spec))
    for i in range(cases):
        for c in range(channels):
            volume(root / "imagesTr" / f"toy_{i:03d}_{c:04d}.nii.gz", 10 * i + c)
        volume(root / "labelsTr" / f"toy_{i:03d}.nii.gz", 100 + i, label=True)
    for i in range(test):
        for c in range(channels):
            volume(root / "imagesTs" / f"toy_{50 + i:03d}_{c:04d}.nii.gz", 500 + c)
    return root


def msd(root: Path, cases: int = 3) -> Path:
    root.mkdir(parents=True)
    training = []
    for i in range(cases):
        volume(root / "imagesTr" / f"spleen_{i}.nii.gz", i)
        volume(root / "labelsTr" / f"spleen_{i}.nii.gz", 100 + i, label=True, top=1)
        training.append({"image": f"./imagesTr/spleen_{i}.nii.gz", "label": f"./labelsTr/spleen_{i}.nii.gz"})
    volume(root / "imagesTs" / "spleen_9.nii.gz", 9)
    (root / "imagesTr" / "._spleen_0.nii.gz").write_bytes(b"\0\0macOS fork")  # as in the real Decathlon tars
    (root / "dataset.json").write_text(json.dumps({
        "name": "Spleen", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "spleen"},
        "numTraining": cases, "training": training, "test": ["./imagesTs/spleen_9.nii.gz"]}))
    return root


def test_nnunet_dataset_becomes_a_manifest_with_relative_paths(tmp_path):
    root = nnunet(tmp_path / "nnUNet_raw" / "Dataset042_Toy")
    out, found = import_dataset(root, tmp_path / "manifests" / "toy.json", channel="mod1", val_fraction=0.34)
    doc = json.loads(out.read_text())
    assert found.layout == "nnunet" and doc["labels"] == {"0": "background", "1": "liver", "2": "tumour"}
    assert doc["modality"] == "mod1"
    every = doc["training"] + doc["validation"]
    assert len(every) == 3 and len(doc["validation"]) == 1 and len(doc["test"]) == 1
    assert all(not Path(e["image"]).is_absolute() and e["image"].endswith("_0001.nii.gz") for e in every)
    manifest = load_manifest(out)  # paths resolve from the manifest's own folder
    assert sorted(Path(e["label"]).name for e in manifest.splits["training"] + manifest.splits["validation"]) == [
        "toy_000.nii.gz", "toy_001.nii.gz", "toy_002.nii.gz"]
    train, val, split = train_val_split(manifest)
    assert split == "manifest validation split" and {e["subject"] for e in train}.isdisjoint(e["subject"] for e in val)


def test_nnunet_single_channel_needs_no_choice_and_several_do(tmp_path):
    _, found = import_dataset(nnunet(tmp_path / "one", channels=1), tmp_path / "one.json")
    assert len(found.training) == 3
    proc = run_module("medimg.data", "import", str(nnunet(tmp_path / "two")), "--out", str(tmp_path / "two.json"))
    assert proc.returncode == 2 and "--channel" in proc.stderr and "mod0" in proc.stderr
    assert not (tmp_path / "two.json").exists()


class Result:
    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def cli(capsys, *args: str) -> Result:
    """``python -m medimg.data ...`` in this process (its exit code and output); one test runs the real module."""
    from medimg.data.__main__ import main

    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    return Result(code, out.out, out.err)


def one_line(proc, path: Path, words: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}") and words in lines[0], lines
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("fault", ["missing_label", "channel_gap", "undeclared_value", "no_suffix", "geometry"])
def test_malformed_nnunet_layout_is_one_line_naming_the_file(tmp_path, fault, capsys):
    root = nnunet(tmp_path / "Dataset042_Toy", test=0)
    if fault == "missing_label":
        bad, words = root / "labelsTr" / "toy_001.nii.gz", "label missing"
        bad.unlink()
    elif fault == "channel_gap":
        bad, words = root / "imagesTr" / "toy_002_0001.nii.gz", "channel suffix gap"
        bad.rename(root / "imagesTr" / "toy_002_0002.nii.gz")
    elif fault == "undeclared_value":
        bad, words = volume(root / "labelsTr" / "toy_001.nii.gz", 7, label=True, top=5), "not among"
    elif fault == "no_suffix":
        bad, words = volume(root / "imagesTr" / "toy_009.nii.gz", 9), "_XXXX channel suffix"
    else:
        bad, words = volume(root / "labelsTr" / "toy_000.nii.gz", 1, label=True, affine=np.eye(4)), "affine"
    out = tmp_path / "m.json"
    proc = cli(capsys, "import", str(root), "--out", str(out), "--channel", "0")
    one_line(proc, bad, words)
    assert not out.exists() and not list(tmp_path.glob(".m.json*"))  # nothing half-written


def test_decathlon_folder_and_its_faults(tmp_path, capsys):
    root = msd(tmp_path / "Task09_Spleen")
    proc = cli(capsys, "import", str(root), "--out", str(tmp_path / "spleen.json"))
    assert proc.returncode == 0, proc.stderr
    assert "Decathlon folder Spleen: 3 labelled cases, 1 test images, classes background, spleen" in proc.stdout
    doc = json.loads((tmp_path / "spleen.json").read_text())
    assert doc["training"][0] == {"image": "Task09_Spleen/imagesTr/spleen_0.nii.gz",
                                  "label": "Task09_Spleen/labelsTr/spleen_0.nii.gz", "subject": "spleen_0"}
    (root / "labelsTr" / "spleen_2.nii.gz").unlink()
    proc = cli(capsys, "import", str(root), "--out", str(tmp_path / "again.json"))
    one_line(proc, root / "./labelsTr/spleen_2.nii.gz", "missing")
    spec = json.loads((root / "dataset.json").read_text())
    spec["modality"] = {"0": "FLAIR", "1": "T1w"}
    (root / "dataset.json").write_text(json.dumps(spec))
    one_line(cli(capsys, "import", str(root), "--out", str(tmp_path / "x.json")),
             root / "dataset.json", "2 modalities")


def test_paired_folders_by_name(tmp_path, capsys):
    for i in range(3):
        volume(tmp_path / "images" / f"case{i}_0000.nii.gz", i)
        volume(tmp_path / "labels" / f"case{i}.nii.gz", 10 + i, label=True, top=3)
    out, found = import_dataset(tmp_path / "images", tmp_path / "m.json", labels_dir=tmp_path / "labels")
    assert found.labels == {"0": "background", "1": "label_1", "2": "label_2", "3": "label_3"}
    assert [e["subject"] for e in json.loads(out.read_text())["training"]] == ["case0", "case1", "case2"]
    volume(tmp_path / "images" / "case7.nii.gz", 7)
    proc = cli(capsys, "import", str(tmp_path / "images"), "--labels", str(tmp_path / "labels"),
                      "--classes", "background,a,b,c", "--out", str(tmp_path / "n.json"))
    one_line(proc, tmp_path / "images" / "case7.nii.gz", "no label named case7")


def test_dicom_series_folders_pair_with_their_labels(tmp_path):
    from tests.helpers import write_dicom_series

    for i in range(2):
        vol = np.random.default_rng(i).random((12, 10, 8)).astype(np.float32) * 100
        write_dicom_series(vol, AFFINE, tmp_path / "scans" / f"patient{i}")
        volume(tmp_path / "masks" / f"patient{i}.nii.gz", 10 + i, label=True, top=1)
    out, found = import_dataset(tmp_path / "scans", tmp_path / "m.json", labels_dir=tmp_path / "masks",
                                classes=["background", "organ"])
    assert [e["image"] for e in json.loads(out.read_text())["training"]] == ["scans/patient0", "scans/patient1"]
    assert found.labels == {"0": "background", "1": "organ"}
