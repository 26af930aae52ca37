"""Run folders: every run gets its own (Hydra multirun, runs started in the same second)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import medimg.runs.run as rr
from tests.helpers import REPO

# the training entry point with the assembly replaced: each job records the folder it was given, then stops
FAKE_TRAIN = textwrap.dedent("""
    import json, sys
    import medimg.runs.run as rr
    record = sys.argv[1]

    def fake_builder(kind):
        def build(cfg, run_dir):
            with open(record, "a") as fh:
                fh.write(json.dumps({"seed": int(cfg.seed), "run_dir": str(run_dir)}) + "\\n")
            raise RuntimeError("stop after assembly")
        return build

    rr._builder = fake_builder
    import medimg.train
    sys.argv = ["medimg.train", *sys.argv[2:]]
    medimg.train.main()
""")


def test_multirun_jobs_in_one_process_get_their_own_run_folders(tmp_path):
    """``-m seed=0,1,2``: the jobs share one process and one timestamp; none may land in another's folder."""
    script, record = tmp_path / "fake_train.py", tmp_path / "jobs.jsonl"
    script.write_text(FAKE_TRAIN)
    proc = subprocess.run([sys.executable, str(script), str(record), "-m", "bundle=tissue_t1", "seed=0,1,2",
                           f"hydra.sweep.dir={tmp_path / 'sweep'}", f"run_dir={tmp_path / 'runs' / 'same-second'}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert record.is_file(), proc.stderr[-3000:]
    jobs = [json.loads(line) for line in record.read_text().splitlines()]
    folders = [Path(j["run_dir"]) for j in jobs]
    assert [j["seed"] for j in jobs] == [0, 1, 2]
    assert [f.name for f in folders] == ["same-second", "same-second-2", "same-second-3"]
    for job, folder in zip(jobs, folders):  # each folder's config is its own job's
        assert f"seed: {job['seed']}\n" in (folder / "config.yaml").read_text()


class _Stop(Exception):
    pass


def _run(monkeypatch, tmp_path: Path, **cfg) -> Path:
    """run_training as far as the assembly; returns the folder the assembly was given."""
    given: list[Path] = []

    def fake_builder(kind):
        def build(cfg, run_dir):
            given.append(run_dir)
            raise _Stop
        return build

    monkeypatch.setattr(rr, "_builder", fake_builder)
    base = {"seed": 0, "resume": False, "runs_dir": str(tmp_path / "runs"), "bundle": {"name": "b"},
            "run_dir": str(tmp_path / "runs" / "b" / "20250101-120000")}
    with pytest.raises(_Stop):
        rr.run_training(OmegaConf.create({**base, **cfg}))
    return given[0]


def test_a_new_run_never_reuses_a_folder_holding_a_run(monkeypatch, tmp_path):
    """Two runs started in the same second resolve the same ``run_dir``: the second gets ``-2``."""
    monkeypatch.delenv(rr.RUN_DIR_ENV, raising=False)
    first = _run(monkeypatch, tmp_path, seed=0)
    second = _run(monkeypatch, tmp_path, seed=1)
    assert (first.name, second.name) == ("20250101-120000", "20250101-120000-2")
    assert "seed: 0\n" in (first / "config.yaml").read_text()
    assert "seed: 1\n" in (second / "config.yaml").read_text()
    assert rr.RUN_DIR_ENV not in os.environ  # nothing left for the next run in this process
    prepared = tmp_path / "prepared"  # a folder a caller made for the run (MONAI Label's train task): only when told
    prepared.mkdir()
    assert _run(monkeypatch, tmp_path, run_dir=str(prepared), run_dir_claimed=True) == prepared


def test_a_folder_another_task_prepared_is_taken_over_only_when_the_run_is_told_to(monkeypatch, tmp_path):
    """MONAI Label's train task prepares runs/<bundle>/<second> (finetune.yaml, labels) before its run starts.

    A CLI run started in the same second resolves the same folder: it must not take it (the label task
    would then publish that run's bundle). The label task's own run takes it over by ``run_dir_claimed``.
    """
    monkeypatch.delenv(rr.RUN_DIR_ENV, raising=False)
    prepared = tmp_path / "runs" / "b" / "20250101-120000"
    prepared.mkdir(parents=True)
    (prepared / "finetune.yaml").write_text("the label task's run\n")
    cli = _run(monkeypatch, tmp_path, seed=7)
    assert cli.name == "20250101-120000-2" and not (prepared / "config.yaml").exists()
    assert _run(monkeypatch, tmp_path, seed=8, run_dir_claimed=True) == prepared
    assert "seed: 8\n" in (prepared / "config.yaml").read_text()
    with pytest.raises(rr.ConfigError, match="holds a run already"):  # a prepared folder serves one run
        rr.run_training(OmegaConf.create({"seed": 9, "resume": False, "runs_dir": str(tmp_path / "runs"),
                                          "bundle": {"name": "b"}, "run_dir": str(prepared), "run_dir_claimed": True}))


def test_torchrun_ranks_train_in_the_folder_rank_0_claimed(monkeypatch, tmp_path):
    """Each torchrun rank is its own process: rank 0 claimed ``T-2`` (``T`` held a run), so rank 1 must too.

    torchrun's agent hosts a store every rank reaches (``$MASTER_ADDR:$MASTER_PORT``); a stale
    ``$MEDIMG_RUN_DIR`` in the environment does not count.
    """
    import itertools

    from torch.distributed import TCPStore

    agent = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)  # what torchrun's agent serves
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(agent.port))
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    taken = tmp_path / "runs" / "b" / "20250101-120000"
    taken.mkdir(parents=True)
    (taken / "config.yaml").write_text("a run started in the same second\n")
    folders = []
    for rank in ("0", "1"):  # the processes' own counters of runs: each starts at its first run
        monkeypatch.setattr(rr, "_RUNS", itertools.count(), raising=False)
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("LOCAL_RANK", rank)
        monkeypatch.setenv(rr.RUN_DIR_ENV, str(tmp_path / "stale"))
        folders.append(_run(monkeypatch, tmp_path))
    assert [f.name for f in folders] == ["20250101-120000-2", "20250101-120000-2"]


def test_an_inherited_run_folder_is_only_for_ddp_worker_ranks(monkeypatch, tmp_path):
    """``$MEDIMG_RUN_DIR`` left in the environment does not pull a new run into that folder; rank 1 follows it."""
    other = tmp_path / "someone-elses"
    monkeypatch.setenv(rr.RUN_DIR_ENV, str(other))
    mine = _run(monkeypatch, tmp_path)
    assert mine == tmp_path / "runs" / "b" / "20250101-120000" and not other.exists()
    assert os.environ[rr.RUN_DIR_ENV] == str(other)  # restored as it was
    monkeypatch.setenv(rr.RUN_DIR_ENV, str(mine))
    monkeypatch.setenv("LOCAL_RANK", "1")  # a worker Lightning started
    assert _run(monkeypatch, tmp_path) == mine


def test_resume_true_picks_the_newest_run_in_natural_order(monkeypatch, tmp_path):
    """``t-10`` is newer than ``t-9``: resume=true continues it."""
    monkeypatch.delenv(rr.RUN_DIR_ENV, raising=False)
    for name in ("20250101-120000", "20250101-120000-9", "20250101-120000-10"):
        ckpt = tmp_path / "runs" / "b" / name / "checkpoints" / "last.ckpt"
        ckpt.parent.mkdir(parents=True)
        ckpt.write_bytes(b"")
    assert _run(monkeypatch, tmp_path, resume=True).name == "20250101-120000-10"


def test_an_export_never_writes_into_another_exports_temporary_folder(tmp_path):
    """Two exports of one run at once: the second must not delete the first one's folder in progress."""
    from torch import nn

    from medimg.bundle.writer import write_bundle

    in_progress = tmp_path / ".bundle.partial"  # the temporary folder a concurrent export is writing
    (in_progress / "models").mkdir(parents=True)
    (in_progress / "models" / "model.pt").write_bytes(b"being written")
    out = write_bundle(tmp_path / "bundle", "vit_cls", nn.Linear(2, 2), {"_target_": "torch.nn.Linear"}, None, {},
                       {"0": "a", "1": "b"}, {}, verify=False, standard_exports=False)
    assert (in_progress / "models" / "model.pt").read_bytes() == b"being written"
    assert (out / "models" / "model.pt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".bundle.partial", "bundle"]  # its own temporary is gone



def _export(out: Path, how: str, writing=None, go=None) -> None:
    """A real export that dies at its first write (``kill``), or holds there until told (``hold``)."""
    import signal

    import torch
    from torch import nn

    from medimg.bundle.writer import write_bundle

    def save(*args, **kwargs):
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        writing.set()
        go.wait(60)

    torch.save = save  # in this (forked) process only
    write_bundle(out, "vit_cls", nn.Linear(2, 2), {"_target_": "torch.nn.Linear"}, None, {}, {"0": "a", "1": "b"},
                 {}, verify=False, standard_exports=False)


def test_an_export_removes_what_a_killed_export_left_but_not_one_in_progress(tmp_path):
    """SIGKILL (the OOM killer, a cluster's time limit) left ``.bundle.partial-*`` folders forever."""
    import multiprocessing

    from torch import nn

    from medimg.bundle.writer import write_bundle

    fork = multiprocessing.get_context("fork")
    writing, go = fork.Event(), fork.Event()
    held = fork.Process(target=_export, args=(tmp_path / "bundle", "hold", writing, go))
    held.start()
    try:
        assert writing.wait(60)  # an export in the middle of writing
        killed = fork.Process(target=_export, args=(tmp_path / "bundle", "kill"))
        killed.start()
        killed.join(60)
        assert killed.exitcode == -9
        partials = sorted(p.name for p in tmp_path.glob(".bundle.partial-*"))
        assert len(partials) == 2
        write_bundle(tmp_path / "bundle", "vit_cls", nn.Linear(2, 2), {"_target_": "torch.nn.Linear"}, None, {},
                     {"0": "a", "1": "b"}, {}, verify=False, standard_exports=False)
        left = sorted(p.name for p in tmp_path.glob(".bundle.partial-*"))
        assert len(left) == 1 and left[0] in partials  # the killed export's folder is gone, the live one kept
    finally:
        go.set()
        held.join(60)
