from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from tests.cli.conftest import NO_STD, run_dir_of, train
from tests.conftest import PHANTOM, TINY
from tests.helpers import REPO

NO_IR = "export.openvino=false"  # these bundles never run on a CPU here (the IR is tested where they do)


def _global_step(ckpt: Path) -> int:
    return int(torch.load(ckpt, weights_only=True, map_location="cpu")["global_step"])


def test_resume_after_kill(tmp_path, phantom_manifest, schema):
    args = [sys.executable, "-m", "medimg.train", "bundle=swin_unetr", "trainer=debug", f"runs_dir={tmp_path}", *TINY,
            *PHANTOM, f"data.dataset_dir={phantom_manifest.parent}", "trainer.max_epochs=50",
            "trainer.limit_train_batches=null"]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    ckpt = None
    while time.time() < deadline:
        found = list(tmp_path.glob("swin_unetr/*/checkpoints/last.ckpt"))
        if found and _global_step(found[0]) >= 3:
            ckpt = found[0]
            break
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ckpt is not None, "no checkpoint appeared before the kill"
    killed_at = _global_step(ckpt)
    run_dir = ckpt.parent.parent
    assert not (run_dir / "bundle").exists()
    # resume=true picks the newest run of this bundle that has checkpoints: the killed one
    done = train(tmp_path, *PHANTOM, f"data.dataset_dir={phantom_manifest.parent}", "resume=true",
                 "trainer.max_epochs=2", "trainer.limit_train_batches=null", NO_STD, NO_IR)
    assert f"resuming from {ckpt}" in done.stdout + done.stderr
    assert run_dir_of(done) == run_dir
    assert 3 <= killed_at < _global_step(ckpt) == 2 * 4  # 4 training volumes, batch 1: 4 steps per epoch
    assert (run_dir / "bundle" / "models" / "model.pt").is_file()
    assert not (run_dir / "bundle" / "models" / "openvino").exists()  # export.openvino=false: a GPU-only bundle


def test_ddp_two_cpu_processes_match_single_process(tmp_path, phantom_manifest, schema):
    """DDP with 2 ranks x batch 1 (started by torchrun, as across machines) takes the same steps as 1 x batch 2."""
    doc = json.loads(phantom_manifest.read_text())
    doc["training"] = doc["training"][:2]  # both sides see exactly these two volumes every step
    (tmp_path / "two.json").write_text(json.dumps(doc))
    common = ["data.dataset=null", f"data.manifest={tmp_path / 'two.json'}", "data.pixdim=null", "data.intensity=none",
              f"data.dataset_dir={phantom_manifest.parent}", "data.augment=false", "data.cache=none",
              "trainer.max_epochs=3", "trainer.check_val_every_n_epoch=3",
              "trainer.gradient_clip_val=null", "trainer.accelerator=cpu",
              # SGD: the update is linear in the gradient, so the two runs can be compared tightly
              # (Adam's 1/sqrt(v) turns float noise in near-zero gradients into full-size steps)
              "task.optimizer=sgd", "task.lr=0.05", "task.warmup_epochs=0", NO_STD, NO_IR]
    single = run_dir_of(train(tmp_path / "single", *common, "data.batch_size=2"))
    # launched as on many machines: torchrun starts the ranks, Lightning reads them from its environment
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "medimg.train",
           "bundle=swin_unetr", "trainer=debug", f"runs_dir={tmp_path / 'ddp'}", *TINY, *common, "data.batch_size=1",
           "trainer.devices=2", "trainer.strategy=ddp", f"run_dir={tmp_path / 'ddp' / 'run'}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(tmp_path)})  # torchelastic_* logs
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ddp = run_dir_of(proc)
    assert ddp == tmp_path / "ddp" / "run"
    a = torch.load(single / "bundle" / "models" / "model.pt", weights_only=True)
    b = torch.load(ddp / "bundle" / "models" / "model.pt", weights_only=True)
    assert _global_step(single / "checkpoints" / "last.ckpt") == _global_step(ddp / "checkpoints" / "last.ckpt") == 3
    for key in a:
        if a[key].is_floating_point():
            torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-4, msg=key)
    # and training really moved the weights: SGD momentum buffers are non-zero
    state = torch.load(ddp / "checkpoints" / "last.ckpt", weights_only=True)["optimizer_states"][0]["state"]
    norms = [float(s["momentum_buffer"].norm()) for s in state.values()]
    assert len(norms) > 50 and sum(n > 0 for n in norms) > 0.9 * len(norms)


def test_installed_wheel_runs_from_another_directory(tmp_path, phantom_manifest, schema):
    dist, site = tmp_path / "dist", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    str(REPO)], check=True, capture_output=True)
    wheel = next(dist.glob("medimg-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    assert (site / "medimg" / "_resources" / "configs" / "bundle" / "swin_unetr.yaml").is_file()
    shipped = site / "medimg" / "zoo" / "tissue_t1"  # the trained bundles travel inside the wheel
    assert (shipped / "models" / "model.pt").is_file() and (shipped / "docs" / "README.md").is_file()
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run([sys.executable, "-c", "import medimg.resources as r; print(r.resource_dir('configs'))"],
                           cwd=workdir, env=env, capture_output=True, text=True, check=True)
    assert str(site) in where.stdout
    proc = subprocess.run([sys.executable, "-m", "medimg.train", "bundle=swin_unetr", "trainer=debug", "runs_dir=runs",
                           *TINY, *PHANTOM, f"data.dataset_dir={phantom_manifest.parent}", "trainer.max_epochs=1",
                           NO_STD, NO_IR],
                          cwd=workdir, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list(workdir.glob("runs/swin_unetr/*/bundle/configs/inference.json"))
    listed = subprocess.run([sys.executable, "-m", "medimg.bundles"], cwd=workdir, env=env, capture_output=True,
                            text=True, check=True)
    assert str(shipped) in listed.stdout
