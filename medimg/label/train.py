"""Fine-tune a served bundle on the datastore's labels with ``medimg.train``, then publish it.

MONAI Label runs a train request in a subprocess and streams that process's output to
``GET /train/``. :class:`BundleTrain` writes the datastore's labelled images as a manifest, starts
``python -m medimg.train`` on the bundle's own training config (``configs/train_config.yaml``)
initialised from the served weights (``init_weights``), prints its log line by line, and, when the
run has trained, validated, exported and verified its bundle, publishes it over the served one
(:func:`medimg.label.publish.publish_bundle`), unless it validates worse than the served weights on
the same held-out images (:func:`publication_verdict`; ``publish=always`` overrides). Infer tasks
load it on their next request.

A SIGTERM to the train subprocess (the server stopping: ``serve`` ends its descendants) stops
``medimg.train`` and publishes nothing; the subprocess and its run also end when the server is
killed outright (:func:`die_with_parent`). A bundle's embedded-dataset options (``subjects``,
``region_split``) are cleared, since the datastore's manifest replaces that dataset.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.train import TrainTask

from medimg.bundle.loader import bundle_task
from medimg.io.jsonfile import finite
from medimg.label.infer import bundle_labels, bundle_meta
from medimg.label.publish import bundle_version, publish_bundle
from medimg.runs.folders import new_folder

# request fields a client may set (MONAI Label shows these in its train options)
DEFAULTS: dict[str, Any] = {"max_epochs": 5, "val_every": 1, "limit_train_batches": None, "val_images": 1,
                            "classes": None, "publish": "if_better"}
PUBLISH = ("if_better", "always")  # the fine-tuned bundle replaces the served one only if it validates better
HYDRA = {"job": {"chdir": False}, "run": {"dir": "."}, "output_subdir": None}
TRAINABLE = ("segmentation", "promptable")
# data options that select parts of a bundle's embedded training dataset (not of a manifest)
EMBEDDED_ONLY = ("subjects", "region_split")
STOP_GRACE_S = 10.0  # a stopped medimg.train gets this long before SIGKILL


def die_with_parent() -> None:
    """Ask Linux to send this process SIGTERM when its parent ends (``PR_SET_PDEATHSIG``; elsewhere nothing).

    MONAI Label starts its train subprocess with a plain ``Popen``: a server killed with SIGKILL,
    or by the out-of-memory killer, would leave the training running, and it would publish a
    model nobody asked for any more. Used in the train subprocess for itself and, before ``exec``,
    for the ``medimg.train`` it starts.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent ended before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


@contextlib.contextmanager
def stopped_by_sigterm(proc: subprocess.Popen) -> Iterator[None]:
    """While the block runs, SIGTERM to this process stops ``proc`` and leaves with status 143, unpublished."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        proc.terminate()
        try:
            proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def snapshot(label: str, folder: Path) -> str:
    """The label file as it is now, hard-linked (else copied) into ``folder``: saves replace, never edit, a file."""
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    out = folder / Path(label).name
    try:
        os.link(label, out)
    except OSError:  # another file system, or no hard links
        shutil.copy2(label, out)
    return str(out)


class TrainingFailed(RuntimeError):
    """``medimg.train`` ended with an error (its log is in the train status)."""


class BundleTrain(TrainTask):
    """Fine-tune one bundle on the datastore's ``final`` labels.

    Args:
        bundle: the served bundle folder (replaced when a run succeeds).
        runs_dir: where runs are kept (one folder per request).
        schema: local MONAI metadata schema for the exported bundle's verification (offline).
    """

    def __init__(self, bundle: Path, runs_dir: Path, schema: str | None = None) -> None:
        super().__init__(f"fine-tune {bundle.name} on the datastore's labels with medimg.train")
        self.bundle, self.runs_dir, self.schema = Path(bundle), Path(runs_dir), schema

    def config(self) -> dict[str, Any]:
        """The options a client may change."""
        return {k: v for k, v in DEFAULTS.items() if v is not None}

    def stats(self) -> dict[str, Any]:
        """The served bundle's validation metrics."""
        return finite(bundle_meta(self.bundle).get("eval_metrics", {})) if bundle_version(self.bundle) else {}

    def manifest(self, datastore: Datastore, work: Path, val_images: int) -> Path:
        """Write the datastore's labelled images as a manifest, holding out the last ``val_images`` for validation.

        The labels are the run's own copies (:func:`snapshot`): a save or clear during a long
        fine-tune neither breaks it nor mixes label versions, and the run can be repeated.
        """
        items = sorted(({"image": d["image"], "label": d["label"]} for d in datastore.datalist()),
                       key=lambda d: d["image"])
        if len(items) <= val_images:
            raise TrainingFailed(f"the datastore has {len(items)} labelled image(s); training needs more than "
                                 f"{val_images} (held out for validation)")
        kept = []
        for n, item in enumerate(items):
            try:
                kept.append({**item, "label": snapshot(item["label"], work / "labels" / f"{n:05d}")})
            except FileNotFoundError:  # cleared since it was listed
                print(f"medimg: skipped {item['image']}: its label was cleared as the training started", flush=True)
        items = kept
        if len(items) <= val_images:
            raise TrainingFailed(f"the datastore has {len(items)} labelled image(s); training needs more than "
                                 f"{val_images} (held out for validation)")
        meta = bundle_meta(self.bundle)
        labels = {str(v): k for k, v in bundle_labels(meta, background=True).items()}
        doc = {"name": f"MONAI Label datastore ({len(items)} labelled images)", "labels": labels,
               "training": items[:-val_images], "validation": items[-val_images:]}
        path = work / "manifest.json"
        path.write_text(json.dumps(doc, indent=2))
        return path

    def training_config(self, request: dict[str, Any], manifest: Path, run_dir: Path) -> dict[str, Any]:
        """The bundle's own training config, pointed at the datastore and the served weights."""
        source = self.bundle / "configs" / "train_config.yaml"
        if not source.is_file():
            raise TrainingFailed(f"{source}: missing; this bundle cannot be fine-tuned (export it again)")
        cfg = yaml.safe_load(source.read_text())
        opts = {**DEFAULTS, **{k: request[k] for k in DEFAULTS if k in request}}
        cfg["data"].update(dataset=None, manifest=str(manifest), dataset_dir=str(manifest.parent), val_fraction=None)
        for key in EMBEDDED_ONLY:  # the shipped dataset's own subjects and regions mean nothing here
            if key in cfg["data"]:
                cfg["data"][key] = None
        if cfg.get("bundle", {}).get("task") == "promptable":
            cfg["data"]["classes"] = opts["classes"]
        cfg["bundle"].update(max_epochs=int(opts["max_epochs"]), val_every=int(opts["val_every"]))
        cfg["trainer"].update(max_epochs=int(opts["max_epochs"]), check_val_every_n_epoch=int(opts["val_every"]),
                              enable_progress_bar=False)
        if opts["limit_train_batches"] is not None:
            cfg["trainer"]["limit_train_batches"] = opts["limit_train_batches"]
        cfg.update(init_weights=str(self.bundle), run_dir=str(run_dir), runs_dir=str(run_dir.parent), resume=False,
                   run_dir_claimed=True,  # run_dir is this task's folder: its run takes it over
                   validate_init=True)  # the served weights on the same held-out images: the publication gate
        cfg["export"] = {"enabled": True, "schema": self.schema}
        cfg["defaults"] = ["_self_", {"override hydra/job_logging": "stdout"}]
        cfg["hydra"] = HYDRA
        return cfg

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        """Train, stream the log, publish; raise on failure (MONAI Label then reports ERROR)."""
        if str(request.get("publish", DEFAULTS["publish"])) not in PUBLISH:
            raise TrainingFailed(f"publish={request['publish']!r}: use one of {', '.join(PUBLISH)}")
        task = bundle_task(self.bundle)
        if task not in TRAINABLE:
            raise TrainingFailed(f"{self.bundle}: {task} bundles are not trained from the datastore")
        # claimed as every run folder is (created, never found): a CLI run of the same second gets another
        run_dir = new_folder(self.runs_dir / self.bundle.name / time.strftime("%Y%m%d-%H%M%S"))
        manifest = self.manifest(datastore, run_dir, int(request.get("val_images", DEFAULTS["val_images"])))
        cfg = self.training_config(request, manifest, run_dir)
        (run_dir / "finetune.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        cmd = [sys.executable, "-m", "medimg.train", "--config-path", str(run_dir), "--config-name", "finetune"]
        print(f"medimg: fine-tuning {self.bundle.name}: {' '.join(cmd)}", flush=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        die_with_parent()  # this train subprocess ends with the server, even one killed outright
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                              preexec_fn=die_with_parent) as proc, stopped_by_sigterm(proc):
            assert proc.stdout is not None
            for line in proc.stdout:
                print(line.rstrip(), flush=True)
            code = proc.wait()
        if code != 0 or not (run_dir / "bundle" / "models" / "model.pt").is_file():
            raise TrainingFailed(f"medimg.train failed (exit code {code}); see {run_dir}")
        metrics = json.loads((run_dir / "metrics.json").read_text())
        publish, why = publication_verdict(metrics, str(request.get("publish", DEFAULTS["publish"])))
        if publish:
            publish_bundle(run_dir / "bundle", self.bundle)
            print(f"medimg: published {self.bundle} ({why}; validation: {metrics})", flush=True)
        else:
            print(f"medimg: not published, the served {self.bundle.name} is kept: {why} (the run and its bundle "
                  f"stay in {run_dir}; train with publish=always to publish anyway)", flush=True)
        return {"run_dir": str(run_dir), "bundle": str(self.bundle), "metrics": metrics, "published": publish}


def publication_verdict(metrics: dict[str, Any], publish: str = "if_better") -> tuple[bool, str]:
    """Whether a fine-tuned run replaces the served bundle, and why, from the run's ``metrics.json``.

    With ``if_better`` (the default) the run's monitored validation metric must be at least the
    served weights' on the same held-out images (``initial/<metric>``, validated before training):
    a fine-tune on a few fresh labels must not silently replace a better model. ``always``
    publishes whatever the numbers.

    Raises:
        TrainingFailed: an unknown ``publish`` value.
    """
    if publish not in PUBLISH:
        raise TrainingFailed(f"publish={publish!r}: use one of {', '.join(PUBLISH)}")
    monitor = metrics.get("monitor")
    new, old = metrics.get(monitor) if monitor else None, metrics.get(f"initial/{monitor}") if monitor else None
    if publish == "always":
        return True, "publish=always"
    if not isinstance(new, (int, float)) or not isinstance(old, (int, float)) or new != new or old != old:
        return False, f"no comparable validation of the served and the fine-tuned weights ({monitor}: {old} / {new})"
    if new < old:
        return False, f"{monitor} {new:.4f} on the held-out images is below the served weights' {old:.4f}"
    return True, f"{monitor} {new:.4f} on the held-out images, the served weights' {old:.4f}"
