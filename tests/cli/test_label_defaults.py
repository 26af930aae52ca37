"""The server as a new user starts it: ``python -m medimg.label serve --studies studies/``, nothing else.

3D Slicer's first call is ``GET /info/``; then clicks on a 2D and a 3D model, on a real head
(Colin27, Debian ``mricron-data``). The app folder is the default lasting one (here under the
test's own ``MEDIMG_LABEL_HOME``): restarts keep what it serves, and SIGTERM to the server alone
(what ``docker stop`` sends) stops a running training.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests

from medimg.bundles import shipped_bundles
from tests.cli.label_client import LabelServer
from tests.oracles import COLIN, need_debian


def _strict(text: str):
    def refuse(constant: str):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def default_server(tmp_path_factory):
    need_debian("mricron-data")
    studies = tmp_path_factory.mktemp("studies")
    shutil.copy(COLIN, studies / "colin.nii.gz")
    work = tmp_path_factory.mktemp("default-label")
    home = work / "home"
    srv = LabelServer(None, studies, work, env={"MEDIMG_LABEL_HOME": str(home)})
    srv.home, srv.studies = home, studies
    yield srv
    srv.stop()
    assert not srv.alive()


def _served(srv: LabelServer) -> Path:
    (app,) = list(srv.home.iterdir())
    return app / "models"


def test_slicer_connects_to_the_default_server_and_clicks_in_2d_and_3d(default_server, tmp_path):
    from medimg.io.image import read_image

    r = default_server.session.get(f"{default_server.url}/info/", timeout=60)
    assert r.status_code == 200, r.text[:500]
    info = _strict(r.text)  # what JavaScript's JSON.parse (OHIF) accepts
    assert set(info["models"]) == set(shipped_bundles()) >= {"tissue_t1", "litemedsam", "medsam3d"}
    aal = read_image(COLIN.parent / "aal.nii.gz").array
    thalamus = aal == 77
    k = int(np.argmax(thalamus.sum(axis=(0, 1))))
    i, j = np.argwhere(thalamus[:, :, k]).mean(0).round().astype(int)
    status, result, path = default_server.infer(
        "litemedsam", "colin", {"foreground": [[int(i), int(j), k]], "slice": k, "result_extension": ".nii.gz"},
        tmp_path)
    assert status == 200, result
    mask = np.asarray(nib.load(path).dataobj)
    assert mask.shape == thalamus.shape and mask[i, j, k] == 1 and not mask[:, :, k + 5].any()
    assert (mask[:, :, k] & thalamus[:, :, k]).sum() >= 0.9 * mask[:, :, k].sum()
    status, result, path = default_server.infer(
        "medsam3d", "colin", {"foreground": [[int(i), int(j), k]], "result_extension": ".nii.gz"}, tmp_path)
    assert status == 200, result
    mask3d = np.asarray(nib.load(path).dataobj) > 0
    assert mask3d[i, j, k] and len(np.unique(np.nonzero(mask3d)[2])) > 5  # a 3D answer
    assert (mask3d & thalamus).sum() >= 0.5 * mask3d.sum()


def test_a_restart_keeps_the_served_models_and_a_card_with_nan_does_not_break_info(default_server):
    """A bundle whose card holds NaN (an older medimg, another tool) must not take /info/ down for every model."""
    served = _served(default_server)
    card = served / "litemedsam" / "configs" / "metadata.json"
    text = card.read_text()
    broken = text.replace('"eval_metrics": {', '"eval_metrics": {\n    "not computed": NaN,', 1)
    assert broken != text
    default_server.stop()
    card.write_text(broken)
    default_server.start()  # the same default app folder
    assert card.read_text() == broken  # the restart kept the served copy
    r = default_server.session.get(f"{default_server.url}/info/", timeout=60)
    assert r.status_code == 200, r.text[:500]
    models = _strict(r.text)["models"]
    assert "litemedsam" in models and "medsam3d" in models
    assert "not computed" in json.dumps(models["litemedsam"])
    card.write_text(text)


def test_sigterm_to_the_server_alone_stops_a_running_training(default_server):
    """``docker stop`` signals the server process only: MONAI Label's train subprocess and ``medimg.train`` end too."""
    import psutil

    labels = default_server.studies / "labels" / "final"
    labels.mkdir(parents=True, exist_ok=True)
    colin = nib.load(default_server.studies / "colin.nii.gz")
    for name, shift in (("colin", 0), ("colin_shifted", 4)):
        if shift:
            nib.save(nib.Nifti1Image(np.roll(np.asarray(colin.dataobj), shift, axis=0), colin.affine),
                     default_server.studies / f"{name}.nii.gz")
        tissue = (np.asarray(colin.dataobj) > 60).astype(np.uint8) + (np.asarray(colin.dataobj) > 85)
        nib.save(nib.Nifti1Image(np.roll(tissue, shift, axis=0), colin.affine), labels / f"{name}.nii.gz")
    default_server.stop()
    default_server.start()  # the datastore lists the new image and labels
    served = _served(default_server) / "tissue_t1" / "models" / "model.pt"
    before = served.read_bytes()
    r = default_server.session.post(f"{default_server.url}/train/tissue_t1", json={"max_epochs": 1}, timeout=60)
    assert r.status_code == 200, r.text[:500]
    deadline, trainer = time.monotonic() + 300, []
    while time.monotonic() < deadline and not trainer:
        trainer = [p for p in psutil.process_iter(["pid", "cmdline"])
                   if "medimg.train" in " ".join(p.info["cmdline"] or []) and os.getpgid(p.pid) == default_server.pgid]
        time.sleep(0.5)
    assert trainer, f"no medimg.train started:\n{default_server.tail()}"
    os.kill(default_server.proc.pid, signal.SIGTERM)  # the server process only, as docker stop does
    assert default_server.proc.wait(90) == 143
    deadline = time.monotonic() + 30
    while default_server.alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not default_server.alive(), "a training process outlived the server"
    assert served.read_bytes() == before  # nothing was published
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{default_server.url}/info/", timeout=5)
