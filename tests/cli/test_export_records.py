"""Export reads the run's own record: the checkpoint validation chose, and run.json written and read safely."""

from __future__ import annotations

import json
import os

import pytest
import torch

from medimg.bundle.export import export_run
from medimg.errors import ConfigError
from medimg.models import build_network
from medimg.runs.parts import RunRecord

NETWORK = {"name": "vit_cls", "backbone": "mae", "size": "tiny", "img_size": 32, "num_classes": 2}


def _run_folder(tmp_path, chosen: str | None):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    nets = {}
    for seed, name in enumerate(("best-epoch=001.ckpt", "best-epoch=003.ckpt")):
        torch.manual_seed(seed)
        nets[name] = build_network(**NETWORK)
        torch.save({"state_dict": {f"network.{k}": v for k, v in nets[name].state_dict().items()}},
                   run / "checkpoints" / name)
    os.utime(run / "checkpoints" / "best-epoch=001.ckpt", (2e9, 2e9))  # the newer file (copied, touched, resumed)
    metrics = {"val/accuracy": 0.9} | ({"checkpoint": str(run / "checkpoints" / chosen)} if chosen else {})
    RunRecord("classification", "vit_cls", NETWORK, {"img_size": 32, "in_chans": 1, "normalize": "imagenet",
                                                     "class_names": ["a", "b"], "multilabel": False},
              {"0": "a", "1": "b"}, "test", metrics=metrics).save(run)
    return run, nets


def test_export_takes_the_checkpoint_the_run_validated_not_the_newest_file(tmp_path):
    run, nets = _run_folder(tmp_path, "best-epoch=003.ckpt")
    bundle = export_run(run, tmp_path / "bundle", verify=False, standard_exports=False)
    exported = torch.load(bundle / "models" / "model.pt", weights_only=True)
    for key, value in nets["best-epoch=003.ckpt"].state_dict().items():
        torch.testing.assert_close(exported[key], value, rtol=0, atol=0)
    moved = tmp_path / "moved"  # a run folder moved elsewhere: its record's path is found by name
    run.rename(moved)
    bundle = export_run(moved, tmp_path / "bundle2", verify=False, standard_exports=False)
    exported = torch.load(bundle / "models" / "model.pt", weights_only=True)
    key = next(iter(exported))
    torch.testing.assert_close(exported[key], nets["best-epoch=003.ckpt"].state_dict()[key], rtol=0, atol=0)


def test_a_copied_run_exports_its_own_checkpoint_not_the_originals(tmp_path):
    """A colleague copies a finished run (or it is archived); the original is then retrained in place."""
    import shutil

    run, nets = _run_folder(tmp_path, "best-epoch=003.ckpt")
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    torch.save({"state_dict": {f"network.{k}": v for k, v in nets["best-epoch=001.ckpt"].state_dict().items()}},
               run / "checkpoints" / "best-epoch=003.ckpt")  # the original's file now holds other weights
    bundle = export_run(copy, tmp_path / "bundle", verify=False, standard_exports=False)
    exported = torch.load(bundle / "models" / "model.pt", weights_only=True)
    for key, value in nets["best-epoch=003.ckpt"].state_dict().items():
        torch.testing.assert_close(exported[key], value, rtol=0, atol=0)


@pytest.mark.parametrize(("text", "problem"), [('{"task": "segmentation", "templ', "not valid JSON"),
                                               ('{"task": "segmentation"}', "missing"),
                                               ('["a list"]', "not a run record")])
def test_a_torn_or_foreign_run_json_is_one_line(tmp_path, capsys, text, problem):
    """A run killed while writing run.json (or a hand-edited one): ``medimg.export`` says which file, exit 2."""
    from medimg.export import main

    run, _ = _run_folder(tmp_path, "best-epoch=003.ckpt")
    (run / "run.json").write_text(text)
    code = main([str(run), "--out", str(tmp_path / "bundle"), "--no-verify", "--no-standard"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: {run / 'run.json'}: ") and problem in err[0]
    with pytest.raises(ConfigError):
        RunRecord.load(run)


def test_run_json_is_replaced_whole_or_not_at_all(tmp_path):
    """The disk fills (or the run is killed) while run.json is rewritten: the previous record stays readable."""
    import subprocess
    import sys

    from tests.helpers import REPO

    run, _ = _run_folder(tmp_path, "best-epoch=003.ckpt")
    before = json.loads((run / "run.json").read_text())
    script = ("import resource, signal, sys\n"
              "from medimg.runs.parts import RunRecord\n"
              "record = RunRecord.load(sys.argv[1])\n"
              "record.metrics['history'] = list(range(5000))\n"
              "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))  # writes past 2000 bytes fail\n"
              "record.save(sys.argv[1])\n")
    proc = subprocess.run([sys.executable, "-c", script, str(run)], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert proc.returncode != 0 and "File too large" in proc.stderr
    assert json.loads((run / "run.json").read_text()) == before
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "run.json"]  # no temporary left
