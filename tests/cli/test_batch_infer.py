"""Folder inference at scale: ``torchrun`` shards, atomic resumable outputs, one bad file recorded, not fatal."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medimg.batch import Shard, run_shard
from medimg.infer import main as infer_main
from tests.helpers import REPO
from tests.label.vendors import philips_volume


def _folder(phantom_manifest: Path, tmp_path: Path) -> Path:
    """Four phantom volumes in new orientations and one empty file (the bad input)."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(4):
        img = nib.load(phantom_manifest.parent / f"img0{i % 2}.nii.gz")
        data = np.asarray(img.dataobj)
        affine = img.affine.copy()
        if i >= 2:  # flipped along x, so each output must follow its own input's geometry
            data, affine = data[::-1], affine @ np.array([[-1, 0, 0, data.shape[0] - 1], [0, 1, 0, 0],
                                                          [0, 0, 1, 0], [0, 0, 0, 1]])
        nib.save(nib.Nifti1Image(np.ascontiguousarray(data), affine), str(inputs / f"case{i}.nii.gz"))
    (inputs / "case_bad.nii.gz").write_bytes(b"")
    return inputs


def _summary(out: Path) -> dict[str, dict[str, str]]:
    with (out / "summary.csv").open(newline="") as fh:
        return {Path(r["input"]).name: r for r in csv.DictReader(fh)}


def test_shards_are_disjoint_and_cover_everything():
    items = [Path(f"x{i}") for i in range(7)]
    shards = [Shard(r, 3).take(items) for r in range(3)]
    assert sorted(sum(shards, [])) == items and all(set(a).isdisjoint(b) for a in shards for b in shards if a is not b)
    assert Shard(1, 3).take(items) == [items[1], items[4]]


def test_a_failed_input_is_recorded_and_its_partial_files_removed(tmp_path):
    def predict_one(item: Path, target: Path) -> list[Path]:
        target.write_text("half")  # a writer that died midway must not leave this behind
        if item.name == "bad":
            raise MemoryError("out of memory")
        return [target]

    rows = run_shard([Path("good"), Path("bad")], lambda p: tmp_path / f"{p.name}.out", predict_one)
    assert [r["status"] for r in rows] == ["ok", "failed"]
    assert rows[1]["error"] == "MemoryError: out of memory" and not (tmp_path / "bad.out").exists()
    again = run_shard([Path("good")], lambda p: tmp_path / f"{p.name}.out", predict_one)
    assert again[0]["status"] == "exists" and again[0]["seconds"] == ""


def test_torchrun_two_ranks_equal_one_process_and_resume(phantom_run, phantom_manifest, tmp_path, capsys):
    inputs = _folder(phantom_manifest, tmp_path)
    bundle = str(phantom_run / "bundle")
    single = tmp_path / "single"
    code = infer_main(["--bundle", bundle, "--input", str(inputs), "--output", str(single), "--keep-going"])
    assert code == 2 and "case_bad.nii.gz: file is empty" in capsys.readouterr().out

    sharded = tmp_path / "sharded"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "medimg.infer", "--bundle", bundle, "--input", str(inputs), "--output", str(sharded)]
    # TMPDIR: torchrun keeps its log folder (torchelastic_*) in the temporary folder; here, the test's own
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode != 0, "one input failed: the run must say so"
    assert "Traceback" not in proc.stdout
    rows = _summary(sharded)
    assert sorted(rows) == ["case0.nii.gz", "case1.nii.gz", "case2.nii.gz", "case3.nii.gz", "case_bad.nii.gz"]
    assert rows["case_bad.nii.gz"]["status"] == "failed" and "file is empty" in rows["case_bad.nii.gz"]["error"]
    assert not list(sharded.glob(".*"))  # no rank parts, no partial files
    for i in range(4):
        name = f"case{i}_seg.nii.gz"
        assert rows[f"case{i}.nii.gz"]["status"] == "ok" and float(rows[f"case{i}.nii.gz"]["seconds"]) > 0
        mine, ref, source = (nib.load(p) for p in (sharded / name, single / name, inputs / f"case{i}.nii.gz"))
        np.testing.assert_array_equal(np.asarray(mine.dataobj), np.asarray(ref.dataobj))
        np.testing.assert_array_equal(mine.affine, source.affine)
        assert (np.asarray(mine.dataobj) > 0).any()

    # a re-run resumes: the complete outputs are skipped, untouched
    stamp = (sharded / "case0_seg.nii.gz").stat().st_mtime_ns
    code = infer_main(["--bundle", bundle, "--input", str(inputs), "--output", str(sharded), "--keep-going"])
    rows = _summary(sharded)
    assert code == 2 and (sharded / "case0_seg.nii.gz").stat().st_mtime_ns == stamp
    assert [rows[f"case{i}.nii.gz"]["status"] for i in range(4)] == ["exists"] * 4


def test_keep_going_takes_a_folder(phantom_run, phantom_manifest, tmp_path, capsys):
    one = str(phantom_manifest.parent / "img00.nii.gz")
    code = infer_main(["--bundle", str(phantom_run / "bundle"), "--input", one, "--output", str(tmp_path / "o.nii.gz"),
                       "--keep-going"])
    assert code == 2 and "take a folder of inputs" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["one process", "--keep-going", "torchrun rank 1 of 2"])
def test_inputs_writing_the_same_output_are_refused_before_any_work(tmp_path, capsys, monkeypatch, mode):
    """``case01/`` (a real DICOM series) beside ``case01.nii.gz``: both map to ``case01_seg.nii.gz``; exit 2."""
    from medimg.data.embedded.mni152 import MNI_FILES, mni152_source_dir

    inputs = tmp_path / "in"
    philips_volume(inputs / "case01")
    t1 = nib.load(str(mni152_source_dir() / MNI_FILES["t1"]))
    nib.save(nib.Nifti1Image(np.asarray(t1.dataobj)[80:112, 100:132, 80:112], t1.affine), str(inputs / "case01.nii.gz"))
    nib.save(nib.Nifti1Image(np.asarray(t1.dataobj)[80:112, 100:132, 40:72], t1.affine), str(inputs / "case02.nii.gz"))
    out = tmp_path / "out"
    args = ["--bundle", "tissue_t1", "--input", str(inputs), "--output", str(out), "--preview", str(tmp_path / "png")]
    if mode == "--keep-going":
        args.append("--keep-going")
    elif mode.startswith("torchrun"):  # what torchrun sets; the check comes before any process group
        for name, value in (("WORLD_SIZE", "2"), ("RANK", "1"), ("LOCAL_RANK", "1")):
            monkeypatch.setenv(name, value)
    code = infer_main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0] == (f"error: {inputs / 'case01.nii.gz'}: writes the same output case01_seg.nii.gz as "
                      f"{inputs / 'case01'}; rename one of them")
    assert not out.exists() and not (tmp_path / "png").exists()  # nothing written, not even the folders
