"""What ``serve`` keeps across restarts and kills: the app folder, published models, trainings, cards."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from medimg.bundles import shipped_bundles
from tests.helpers import REPO

WAIT = (
    "import subprocess, sys, time\n"
    "from medimg.label.train import die_with_parent, stopped_by_sigterm\n"
    "{body}"
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as fh:  # a zombie is dead
        return fh.read().split(")")[-1].split()[0] != "Z"


def _wait_gone(pid: int, seconds: float = 20) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return False


def test_the_default_app_folder_lasts_and_is_one_per_studies_source(tmp_path, monkeypatch):
    from medimg.label.serve import default_app_dir

    monkeypatch.setenv("MEDIMG_LABEL_HOME", str(tmp_path / "home"))
    (tmp_path / "a" / "studies").mkdir(parents=True)
    (tmp_path / "b" / "studies").mkdir(parents=True)
    first = default_app_dir(str(tmp_path / "a" / "studies"))
    assert first == default_app_dir(str(tmp_path / "a" / "studies" / ".." / "studies"))  # the same folder
    assert first.parent == tmp_path / "home" and first.name.startswith("studies-")
    assert first != default_app_dir(str(tmp_path / "b" / "studies"))  # same name, another folder
    pacs = default_app_dir("http://127.0.0.1:8042/dicom-web")
    assert pacs.name.startswith("127.0.0.1-8042-") and pacs != default_app_dir("http://127.0.0.1:8043/dicom-web")
    monkeypatch.delenv("MEDIMG_LABEL_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))  # never a temporary folder deleted at exit
    assert default_app_dir(str(tmp_path / "a" / "studies")).parent == tmp_path / "data" / "medimg" / "label"


def test_a_restart_never_overwrites_a_published_model(tmp_path, monkeypatch):
    """Fine-tuned weights and their own OpenVINO IR stay served after ``copy_shipped`` runs again."""
    import medimg.bundles
    from medimg.label.publish import publish_bundle
    from medimg.label.serve import copy_shipped

    shipped = shipped_bundles()["tissue_t1"]
    monkeypatch.setattr(medimg.bundles, "shipped_bundles", lambda: {"tissue_t1": shipped})
    served = copy_shipped(tmp_path / "models") / "tissue_t1"
    assert (served / "models" / "model.pt").read_bytes() == (shipped / "models" / "model.pt").read_bytes()
    tuned = tmp_path / "run" / "bundle"
    shutil.copytree(shipped, tuned)
    (tuned / "models" / "model.pt").write_bytes(b"fine-tuned weights")
    (tuned / "models" / "ir-of-the-tuned-weights").write_text("tuned")
    meta = json.loads((tuned / "configs" / "metadata.json").read_text())
    (tuned / "configs" / "metadata.json").write_text(json.dumps({**meta, "version": "9.9.9"}))
    publish_bundle(tuned, served)
    copy_shipped(tmp_path / "models")  # the restart
    assert (served / "models" / "model.pt").read_bytes() == b"fine-tuned weights"
    assert (served / "models" / "ir-of-the-tuned-weights").read_text() == "tuned"
    assert json.loads((served / "configs" / "metadata.json").read_text())["version"] == "9.9.9"
    for folder in (served, *served.parent.glob(".tissue_t1.previous-*")):  # the user deletes the served copy
        shutil.rmtree(folder)
    partial = tmp_path / "models" / ".tissue_t1.shipped.partial"  # a copy killed half way
    partial.mkdir()
    copy_shipped(tmp_path / "models")
    assert (served / "models" / "model.pt").read_bytes() == (shipped / "models" / "model.pt").read_bytes()
    assert not partial.exists()


def test_publications_keep_the_original_and_only_the_newest_previous_bundles(tmp_path):
    from medimg.label.publish import KEEP_PREVIOUS, publish_bundle

    served = tmp_path / "models" / "seg"
    (served / "models").mkdir(parents=True)
    (served / "models" / "model.pt").write_text("v0")
    for version in range(1, 5):
        new = tmp_path / f"run{version}"
        (new / "models").mkdir(parents=True)
        (new / "models" / "model.pt").write_text(f"v{version}")
        publish_bundle(new, served)
    previous = sorted(served.parent.glob(".seg.previous-*"))
    assert len(previous) == KEEP_PREVIOUS == 2
    assert [(p / "models" / "model.pt").read_text() for p in previous] == ["v2", "v3"]
    assert (served / "models" / "model.pt").read_text() == "v4"
    # the bundle the department started from is never pruned: a run of bad fine-tunes can be undone
    assert (served.parent / ".seg.original" / "models" / "model.pt").read_text() == "v0"


def test_a_datastore_fine_tune_of_medsam3d_drops_its_embedded_dataset_options(tmp_path):
    from medimg.label.train import BundleTrain

    bundle = shipped_bundles()["medsam3d"]
    shipped = yaml.safe_load((bundle / "configs" / "train_config.yaml").read_text())
    assert shipped["data"]["subjects"] and "region_split" in shipped["data"]  # what made every fine-tune fail
    (tmp_path / "run").mkdir()
    manifest = tmp_path / "run" / "manifest.json"
    manifest.write_text("{}")
    cfg = BundleTrain(bundle, tmp_path / "runs").training_config({}, manifest, tmp_path / "run")
    assert cfg["data"]["subjects"] is None and cfg["data"]["region_split"] is None
    assert cfg["data"]["manifest"] == str(manifest) and cfg["data"]["dataset"] is None
    assert cfg["init_weights"] == str(bundle)


def _spawn(body: str) -> tuple[subprocess.Popen, int]:
    """A Python process running ``body`` (in :data:`WAIT`), and the pid of the child it prints first."""
    proc = subprocess.Popen([sys.executable, "-c", WAIT.format(body=body)], stdout=subprocess.PIPE, text=True,
                            cwd=REPO)
    return proc, int(proc.stdout.readline())


def test_sigterm_stops_the_training_it_runs_and_exits_143(tmp_path):
    """What the train subprocess does when the server stops: ``medimg.train`` (here a sleeper) ends too."""
    body = ("with subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'],"
            " preexec_fn=die_with_parent) as proc, stopped_by_sigterm(proc):\n"
            "    print(proc.pid, flush=True)\n"
            "    proc.wait()\n"
            "print('published', flush=True)\n")
    runner, child = _spawn(body)
    assert _alive(child)
    runner.send_signal(signal.SIGTERM)
    assert runner.wait(30) == 143
    assert "published" not in runner.stdout.read()  # nothing after the stop
    assert _wait_gone(child)


def test_a_training_ends_when_the_server_is_killed_outright(tmp_path):
    """kill -9 of the process that started the train subprocess: its ``medimg.train`` ends as well."""
    body = ("proc = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'],"
            " preexec_fn=die_with_parent)\n"
            "print(proc.pid, flush=True)\n"
            "time.sleep(600)\n")
    parent, child = _spawn(body)
    assert _alive(child)
    parent.kill()
    parent.wait(10)
    assert _wait_gone(child), "the training outlived the server"


def test_a_card_with_a_metric_that_could_not_be_computed_stays_strict_json():
    from medimg.io.jsonfile import dumps_strict, finite, loads_finite

    doc = {"compact": {"targets": 0, "box": float("nan")}, "hd95": [np.float32("inf"), 1.5], "n": 3}
    assert finite(doc) == {"compact": {"targets": 0, "box": None}, "hd95": [None, 1.5], "n": 3}
    text = dumps_strict(doc)
    assert "NaN" not in text and "Infinity" not in text and json.loads(text)["hd95"] == [None, 1.5]
    assert loads_finite('{"box": NaN, "x": -Infinity}') == {"box": None, "x": None}  # an older card
    with pytest.raises(ValueError):
        json.dumps(doc, allow_nan=False)  # what Starlette's JSONResponse does with the raw card



def test_a_publication_refreshes_the_labels_version_and_metrics_clients_see(tmp_path):
    """Slicer reads a model's labels from /info/: after a fine-tune is published they are the new bundle's."""
    from medimg.label.infer import infer_task
    from medimg.label.publish import publish_bundle

    served = tmp_path / "models" / "tissue_t1"
    shutil.copytree(shipped_bundles()["tissue_t1"], served)
    task = infer_task(served, device="cpu")
    before = task.info()
    assert before["labels"] == {"grey_matter": 1, "white_matter": 2}
    tuned = tmp_path / "run" / "bundle"
    shutil.copytree(served, tuned)
    meta = json.loads((tuned / "configs" / "metadata.json").read_text())
    meta.update(version="0.3.0", labels={"background": 0, "GM": 1, "WM": 2}, eval_metrics={"mean_dice": 0.5})
    (tuned / "configs" / "metadata.json").write_text(json.dumps(meta))
    publish_bundle(tuned, served)
    after = task.info()
    assert after["labels"] == {"GM": 1, "WM": 2} and after["config"]["bundle_version"] == "0.3.0"
    assert after["eval_metrics"] == {"mean_dice": 0.5}


def test_a_reader_loading_during_the_copy_never_destroys_a_publication(tmp_path, monkeypatch):
    """A model's first load (another process, another thread) while a training's bundle is being copied in."""
    import threading

    import medimg.label.publish as publish

    served = tmp_path / "models" / "seg"
    new = tmp_path / "run" / "bundle"
    for folder, text in ((served, "old"), (new, "new")):
        (folder / "models").mkdir(parents=True)
        (folder / "models" / "model.pt").write_text(text)
    copying, proceed = threading.Event(), threading.Event()
    real_copy = shutil.copytree

    def slow_copy(src, dst, *args, **kw):
        out = real_copy(src, dst, *args, **kw)
        if str(dst).endswith(".partial"):  # the publisher's copy, still under way
            copying.set()
            proceed.wait(30)
        return out

    monkeypatch.setattr(publish.shutil, "copytree", slow_copy)
    errors: list[BaseException] = []
    worker = threading.Thread(target=lambda: _catch(errors, publish.publish_bundle, new, served))
    worker.start()
    assert copying.wait(30), errors
    text, _ = publish.load_locked(served, lambda b: (b / "models" / "model.pt").read_text())
    assert text == "old"
    proceed.set()
    worker.join(30)
    assert not errors, errors
    assert (served / "models" / "model.pt").read_text() == "new"


def _catch(errors: list, fn, *args) -> None:
    try:
        fn(*args)
    except BaseException as exc:  # noqa: BLE001 - reported by the test
        errors.append(exc)


def test_deleting_the_served_copy_serves_the_shipped_bundle_not_an_old_fine_tune(tmp_path, monkeypatch):
    import medimg.bundles
    from medimg.label.publish import publish_bundle
    from medimg.label.serve import copy_shipped

    shipped = shipped_bundles()["tissue_t1"]
    monkeypatch.setattr(medimg.bundles, "shipped_bundles", lambda: {"tissue_t1": shipped})
    served = copy_shipped(tmp_path / "models") / "tissue_t1"
    for n in (1, 2):
        tuned = tmp_path / f"run{n}"
        shutil.copytree(shipped, tuned)
        (tuned / "models" / "model.pt").write_bytes(f"fine-tune {n}".encode())
        publish_bundle(tuned, served)
    shutil.rmtree(served)  # what the start-up message tells a user to do
    copy_shipped(tmp_path / "models")
    assert (served / "models" / "model.pt").read_bytes() == (shipped / "models" / "model.pt").read_bytes()


def test_a_fine_tune_that_validates_worse_than_the_served_weights_is_not_published():
    """The gate compares the run's monitored metric with the served weights' on the same held-out images."""
    from medimg.label.train import TrainingFailed, publication_verdict

    run = {"monitor": "val/dice", "val/dice": 0.61, "initial/val/dice": 0.64, "validation_split": "datastore"}
    ok, why = publication_verdict(run)
    assert not ok and "0.6100" in why and "0.6400" in why
    assert publication_verdict({**run, "val/dice": 0.64})[0]  # as good: the newer labels win
    assert publication_verdict(run, "always") == (True, "publish=always")
    assert not publication_verdict({"monitor": "val/dice", "val/dice": 0.9})[0]  # nothing to compare: kept
    assert not publication_verdict({**run, "initial/val/dice": float("nan")})[0]
    with pytest.raises(TrainingFailed, match="publish='sometimes'"):
        publication_verdict(run, "sometimes")


def test_a_card_whose_top_level_is_not_an_object_never_stops_the_server_starting(tmp_path, caplog):
    """``metadata.json`` holding a list: ``find_bundles`` (the server's start) raised AttributeError."""
    import logging

    from medimg.label.compat import install

    install()
    from medimg.label.main import find_bundles

    for name, card in (("a_list", ["not", "a", "card"]), ("b_good", {"medimg_held_out_3d": {"dice": 0.5}})):
        (tmp_path / name / "configs").mkdir(parents=True)
        (tmp_path / name / "configs" / "metadata.json").write_text(json.dumps(card))
    with caplog.at_level(logging.WARNING):
        assert [p.name for p in find_bundles(tmp_path)] == ["b_good", "a_list"]
    lines = [r.getMessage() for r in caplog.records if "a_list" in r.getMessage()]
    assert len(lines) == 1 and "not a JSON object" in lines[0]
