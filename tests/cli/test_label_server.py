"""The medimg app on a real MONAI Label server, started here on 127.0.0.1 and stopped without leftovers.

Studies: the MNI152 T1 (RAS), an LPS copy of it, and a DICOM series. Models: the session's tiny
Swin-UNETR, LiteMedSAM, medsam3d and ViT classifier bundles.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import monailabel  # noqa: F401 - the server under test (.ci/run installs it; see the README)
import nibabel as nib
import numpy as np
import pydicom
import pytest
from scipy import ndimage

from medimg.io.image import read_image
from tests.cli.label_client import LabelServer
from tests.helpers import dciodvfy, write_dicom_series

LPS = np.array([[0, -1], [1, -1], [2, 1]])  # flip the first two axes: RAS-stored -> LPS-stored
WM_CLICK_RAS = [-26.0, -10.0, 26.0]  # deep white matter, RAS mm
TOKEN = "medimg-suite-token-0123456789"  # every test below goes through the bearer-token check


@pytest.fixture(scope="module")
def studies(tmp_path_factory, mni_dir) -> Path:
    folder = tmp_path_factory.mktemp("studies")
    t1 = nib.load(mni_dir / "t1.nii.gz")
    nib.save(t1, folder / "mni_t1.nii.gz")
    nib.save(t1.as_reoriented(LPS), folder / "mni_t1_lps.nii.gz")
    image = read_image(mni_dir / "t1.nii.gz")
    affine = image.affine.copy()
    affine[:3, :3] *= 3
    write_dicom_series(np.round(image.array[::3, ::3, ::3]), affine, folder / "mni_series")
    (folder / "leak.nii.gz").symlink_to(mni_dir / "t1_posterior.nii.gz")  # a link out: never listed or served
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory, studies, mni_run, lite_run, run3d, cls_run):
    models = tmp_path_factory.mktemp("models")
    for name, run in (("swin_unetr", mni_run), ("litemedsam", lite_run), ("medsam3d", run3d), ("vit_cls", cls_run)):
        shutil.copytree(run / "bundle", models / name)
    srv = LabelServer(models, studies, tmp_path_factory.mktemp("label"), token=TOKEN,
                      extra=["--max-upload-mb", "8", "--conf", "embedding_cache_mb", "256"],
                      env={"TMPDIR": str(tmp_path_factory.mktemp("server_tmp"))})  # checked for leftovers
    yield srv
    srv.stop()


def same_geometry(path: Path, reference: Path) -> np.ndarray:
    out, ref = read_image(path, spatial_dims=None), read_image(reference, spatial_dims=None)
    assert out.array.shape == ref.array.shape
    np.testing.assert_allclose(out.affine, ref.affine, atol=1e-5)
    return out.array


def test_info_lists_every_bundle_and_the_datastore_its_images(server):
    info = server.get("/info/")
    models = info["models"]
    assert sorted(models) == ["litemedsam", "medsam3d", "swin_unetr", "vit_cls"]
    assert (models["swin_unetr"]["type"], models["swin_unetr"]["dimension"]) == ("segmentation", 3)
    assert (models["litemedsam"]["type"], models["litemedsam"]["dimension"]) == ("deepgrow", 2)
    assert (models["medsam3d"]["type"], models["medsam3d"]["dimension"]) == ("deepgrow", 3)
    assert models["vit_cls"]["type"] == "classification"
    assert models["swin_unetr"]["labels"] == {"grey_matter": 1, "white_matter": 2}
    assert "val/dice" in models["swin_unetr"]["eval_metrics"]
    assert sorted(info["trainers"]) == ["litemedsam", "medsam3d", "swin_unetr"]
    objects = server.get("/datastore/", params={"output": "all"})["objects"]
    assert sorted(objects) == ["mni_series", "mni_t1", "mni_t1_lps"]


def test_every_endpoint_wants_the_token(server):
    import requests
    from monailabel.client import MONAILabelClient
    from monailabel.client.client import MONAILabelClientException

    calls = [("get", "/info/"), ("get", "/datastore/?output=all"), ("post", "/infer/swin_unetr?image=mni_t1"),
             ("get", "/train/"), ("post", "/train/swin_unetr"), ("put", "/datastore/label?image=mni_t1&tag=final"),
             ("get", "/activelearning/random"), ("get", "/docs"), ("get", "/openapi.json")]
    for method, path in calls:
        for headers in ({}, {"Authorization": "Bearer medimg-wrong-token-012345"}, {"Authorization": f"Basic {TOKEN}"}):
            r = requests.request(method, f"{server.url}{path}", headers=headers, timeout=30)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (method, path, r.status_code)
    assert server.session.get(f"{server.url}/info/", timeout=30).status_code == 200
    # MONAI Label's own client, the one 3D Slicer's module uses, given the token
    client = MONAILabelClient(server.url)
    with pytest.raises(MONAILabelClientException) as refused:
        client.info()
    assert refused.value.status_code == 401
    client.update_auth({"token_type": "Bearer", "access_token": TOKEN})
    assert "swin_unetr" in client.info()["models"]


def test_a_web_page_cannot_reach_the_server(server):
    """DNS rebinding (a foreign Host) and cross-site writes (CSRF) are refused, the right token or not."""
    import requests

    url, s, train = server.url, server.session, f"{server.url}/train/swin_unetr"  # s sends the token
    for r in (requests.get(f"{url}/info/", headers={"Host": "attacker.example"}, timeout=30),
              s.get(f"{url}/info/", headers={"Host": f"attacker.example:{server.port}"}, timeout=30),
              s.delete(f"{url}/datastore/image?id=mni_series", headers={"Host": "attacker.example"}, timeout=30)):
        assert r.status_code == 421 and "attacker.example" in r.json()["detail"], r.status_code
    for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"}):
        for r in (requests.post(train, headers=headers, timeout=30), s.post(train, headers=headers, timeout=30)):
            assert r.status_code == 403 and "cross-site" in r.json()["detail"], (headers, r.status_code)  # bodiless
    assert s.get(f"{url}/train/?check_if_running=true", timeout=30).status_code == 404  # no training started
    assert "mni_series" in server.get("/datastore/", params={"output": "all"})["objects"]  # nor deleted
    r = s.post(f"{url}/activelearning/random", headers={"Origin": f"http://localhost:{server.port}"}, json={},
               timeout=60)  # the server's own origin, and the normal host, still work
    assert r.status_code == 200 and r.json()["id"] and server.get("/info/")["models"], r.text


def test_paths_uploads_and_bodies_are_refused_with_400_or_413(server, studies, mni_dir, tmp_path):
    url, s = server.url, server.session
    before = server.temp_files()
    for image in ("../mni_t1", str(mni_dir / "t1.nii.gz"), "/etc/passwd", "leak"):
        r = s.post(f"{url}/infer/swin_unetr", params={"image": image}, data={"params": "{}"}, timeout=120)
        assert r.status_code in (400, 404) and "Traceback" not in r.text, (image, r.status_code, r.text[:300])
    assert s.get(f"{url}/datastore/image", params={"image": "leak"}, timeout=30).status_code in (400, 404)
    labels = nib.load(mni_dir / "labels.nii.gz")
    nib.save(labels, tmp_path / "label.nii.gz")
    payload = (tmp_path / "label.nii.gz").read_bytes()
    for tag in ("../../escape", "/tmp/escape"):
        r = s.put(f"{url}/datastore/label", params={"image": "mni_t1", "tag": tag},
                  files={"label": ("label.nii.gz", payload)}, data={"params": "{}"}, timeout=60)
        assert r.status_code == 400 and "plain name" in r.text
    assert not list(studies.parent.glob("escape*")) and not Path("/tmp/escape").exists()
    # a label on another grid (the RAS one for the LPS copy) is refused; so is a corrupt one; the stored one stays
    r = s.put(f"{url}/datastore/label", params={"image": "mni_t1_lps", "tag": "guard"},
              files={"label": ("label.nii.gz", payload)}, data={"params": "{}"}, timeout=60)
    assert r.status_code == 400 and "does not lie on the image's grid" in r.text
    nib.save(labels.as_reoriented(LPS), tmp_path / "lps.nii.gz")
    r = s.put(f"{url}/datastore/label", params={"image": "mni_t1_lps", "tag": "guard"},
              files={"label": ("label.nii.gz", (tmp_path / "lps.nii.gz").read_bytes())}, data={"params": "{}"},
              timeout=60)
    assert r.ok, r.text
    stored = s.get(f"{url}/datastore/label", params={"label": "mni_t1_lps", "tag": "guard"}, timeout=60).content
    r = s.put(f"{url}/datastore/label", params={"image": "mni_t1_lps", "tag": "guard"},
              files={"label": ("label.nii.gz", payload[: len(payload) // 2])}, data={"params": "{}"}, timeout=60)
    assert r.status_code == 400 and "label upload for 'mni_t1_lps'" in r.text
    assert s.get(f"{url}/datastore/label", params={"label": "mni_t1_lps", "tag": "guard"}, timeout=60).content == stored
    # malformed bodies: 400, never 500
    r = s.post(f"{url}/infer/swin_unetr", params={"image": "mni_t1"}, data={"params": "{not json"}, timeout=60)
    assert r.status_code == 400 and "not valid JSON" in r.text
    truncated = b'--xx\r\nContent-Disposition: form-data; name="label"; filename="a.nii.gz"\r\n\r\nabc'
    r = s.put(f"{url}/datastore/label", params={"image": "mni_t1", "tag": "final"}, data=truncated,
              headers={"Content-Type": "multipart/form-data; boundary=xx"}, timeout=60)
    assert r.status_code == 400
    # over the upload limit (8 MB here): refused whether declared or streamed
    big = b"\0" * (9 * 2**20)
    r = s.put(f"{url}/datastore/label", params={"image": "mni_t1", "tag": "big"},
              files={"label": ("label.nii.gz", big)}, data={"params": "{}"}, timeout=120)
    assert r.status_code == 413
    head = (b'--xx\r\nContent-Disposition: form-data; name="file"; filename="streamed.nii.gz"\r\n'
            b"Content-Type: application/octet-stream\r\n\r\n")
    body = head + big + b"\r\n--xx--\r\n"
    chunks = (body[i:i + 2**20] for i in range(0, len(body), 2**20))  # no Content-Length: counted as it comes
    r = s.put(f"{url}/datastore/image", params={"image": "streamed"}, data=chunks,
              headers={"Content-Type": "multipart/form-data; boundary=xx"}, timeout=120)
    assert r.status_code == 413
    # an uploaded image that does not read: 400, and its temporary copy goes too
    r = s.post(f"{url}/infer/swin_unetr", params={"image": "mni_t1"}, files={"file": ("x.nii.gz", b"not an image")},
               data={"params": "{}"}, timeout=60)
    assert r.status_code == 400 and "Traceback" not in r.text, r.text[:300]
    objects = server.get("/datastore/", params={"output": "all"})["objects"]
    assert sorted(objects) == ["mni_series", "mni_t1", "mni_t1_lps"]
    assert server.temp_files() == before  # no refused upload left a copy behind


def test_automatic_model_answers_in_the_input_geometry(server, studies, tmp_path):
    code, res, ras = server.infer("swin_unetr", "mni_t1", {}, tmp_path)
    assert code == 200, res
    ras_labels = same_geometry(ras, studies / "mni_t1.nii.gz")
    assert set(np.unique(ras_labels)) == {0, 1, 2} and res["label_names"] == {"grey_matter": 1, "white_matter": 2}
    code, res, lps = server.infer("swin_unetr", "mni_t1_lps", {"result_extension": ".nrrd"}, tmp_path)
    assert code == 200, res
    assert lps.suffix == ".nrrd"
    lps_labels = same_geometry(lps, studies / "mni_t1_lps.nii.gz")
    # the same brain stored the other way round: the same labels, flipped back
    assert (lps_labels[::-1, ::-1, :] == ras_labels).mean() > 0.99


def test_dicom_series_gets_a_dicom_seg_referencing_it(server, studies, tmp_path):
    import highdicom as hd

    code, res, path = server.infer("swin_unetr", "mni_series", {}, tmp_path)
    assert code == 200, res
    assert path.suffix == ".dcm"
    seg = hd.seg.segread(path)
    source = pydicom.dcmread(next((studies / "mni_series").iterdir()))
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["grey_matter", "white_matter"]
    tool = dciodvfy()
    report = subprocess.run([tool, str(path)], capture_output=True, text=True)
    errors = [line for line in (report.stdout + report.stderr).splitlines() if line.startswith("Error")]
    assert errors == []
    # OHIF's output=dicom_seg: medimg's SEG too (MONAI Label's own answered 500 for every datastore)
    answers = {image: server.session.post(f"{server.url}/infer/swin_unetr", data={"params": "{}"}, timeout=600,
                                          params={"image": image, "output": "dicom_seg"})
               for image in ("mni_series", "mni_t1")}
    assert answers["mni_t1"].status_code == 400 and "DICOM series" in answers["mni_t1"].json()["detail"]
    assert answers["mni_series"].status_code == 200, answers["mni_series"].text[:300]
    (tmp_path / "out.dcm").write_bytes(answers["mni_series"].content)
    direct = hd.seg.segread(tmp_path / "out.dcm")
    assert direct.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    assert [s.SegmentLabel for s in direct.SegmentSequence] == ["grey_matter", "white_matter"]


def wm_prompts(mni_dir: Path) -> tuple[list[int], list[int], list[int]]:
    """A positive click in deep white matter, an ROI around its white matter on 5 coronal slices
    (``[i0, i1, j0, j1, k0, k1]``, as Slicer sends it) and a negative click at the darkest voxel of
    the ROI away from white matter."""
    t1 = nib.load(mni_dir / "t1.nii.gz")
    labels = np.asarray(nib.load(mni_dir / "labels.nii.gz").dataobj)
    pos = [int(c) for c in np.round(np.linalg.inv(t1.affine) @ [*WM_CLICK_RAS, 1.0])[:3]]
    wm = labels == 2
    slab = np.zeros_like(wm)
    slab[:, pos[1] - 2:pos[1] + 3, :] = True
    comp, _ = ndimage.label(wm & slab)
    idx = np.argwhere(comp == comp[tuple(pos)])
    lo, hi = idx.min(0), idx.max(0)
    roi = [int(lo[0]), int(hi[0]), int(lo[1]), int(hi[1]), int(lo[2]), int(hi[2])]
    inside = np.zeros_like(wm)
    inside[lo[0]:hi[0] + 1, pos[1], lo[2]:hi[2] + 1] = True
    cand = np.argwhere(inside & ~ndimage.binary_dilation(wm, iterations=3))
    neg = [int(c) for c in cand[np.argmin(np.asarray(t1.dataobj)[tuple(cand.T)])]]
    return pos, neg, roi


def axial_negative(mni_dir: Path, pos: list[int]) -> list[int]:
    """The darkest voxel, away from white matter, on ``pos``'s axial slice and row, within 40 voxels."""
    t1 = np.asarray(nib.load(mni_dir / "t1.nii.gz").dataobj)
    wm = np.asarray(nib.load(mni_dir / "labels.nii.gz").dataobj) == 2
    far = ~ndimage.binary_dilation(wm, iterations=3)[:, pos[1], pos[2]]
    row = np.where(far, t1[:, pos[1], pos[2]], np.inf)
    lo = max(pos[0] - 40, 0)
    i = lo + int(np.argmin(row[lo:pos[0] + 40]))
    return [i, pos[1], pos[2]]


def test_litemedsam_clicks_and_roi_and_no_second_encoding(server, studies, mni_dir, tmp_path):
    pos, neg, roi = wm_prompts(mni_dir)
    params = {"foreground": [pos], "background": [neg], "roi": roi, "slice": pos[2], "label": "white matter",
              "result_extension": ".nrrd", "result_dtype": "uint8"}
    code, first, path = server.infer("litemedsam", "mni_t1", params, tmp_path)
    assert code == 200, first
    mask = same_geometry(path, studies / "mni_t1.nii.gz")
    assert mask[tuple(pos)] == 1 and mask[tuple(neg)] == 0
    assert first["plane"] == "coronal" and first["encoder_calls"] > 0  # the ROI follows the bundle's plane
    code, second, path = server.infer("litemedsam", "mni_t1", {**params, "foreground": [pos, [pos[0] + 2, *pos[1:]]]},
                                      tmp_path)
    assert code == 200, second
    assert second["encoder_calls"] == 0 and second["encoder_calls_total"] == first["encoder_calls_total"]
    assert same_geometry(path, studies / "mni_t1.nii.gz")[tuple(pos)] == 1


def test_litemedsam_clicks_alone_segment_the_viewed_slice(server, studies, tmp_path):
    t1 = nib.load(studies / "mni_t1_lps.nii.gz")
    pos = [int(c) for c in np.round(np.linalg.inv(t1.affine) @ [*WM_CLICK_RAS, 1.0])[:3]]
    code, res, path = server.infer("litemedsam", "mni_t1_lps", {"foreground": [pos], "slice": pos[2]}, tmp_path)
    assert code == 200, res
    mask = same_geometry(path, studies / "mni_t1_lps.nii.gz")
    assert res["plane"] == "axial"  # Slicer's slice k of this file is axial, whatever the bundle trained on
    assert mask.sum() == mask[:, :, pos[2]].sum()


def test_two_annotators_on_their_own_images_share_the_server(server, studies, tmp_path):
    """The load test's small version: two clients clicking at once, each on its own image, no errors,
    and each image's slice embeddings survive the other's clicks (the cache spans images)."""
    from concurrent.futures import ThreadPoolExecutor

    def annotate(image: str) -> list[tuple[int, dict]]:
        t1 = nib.load(studies / f"{image}.nii.gz")
        pos = [int(c) for c in np.round(np.linalg.inv(t1.affine) @ [*WM_CLICK_RAS, 1.0])[:3]]
        out = []
        for shift in (0, 2, 4):  # three clicks on the same slice
            click = [pos[0] + shift, pos[1], pos[2]]
            code, res, _ = server.infer("litemedsam", image, {"foreground": [click], "slice": pos[2]}, tmp_path)
            out.append((code, res))
        return out

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(annotate, ["mni_t1", "mni_t1_lps"]))
    for answers in results:
        assert [code for code, _ in answers] == [200, 200, 200], answers
        assert [res["encoder_calls"] for _, res in answers[1:]] == [0, 0]  # the other image did not evict this one
        cache = answers[-1][1]["embedding_cache"]
        assert cache["bound"] == 256 * 2**20 and 0 < cache["bytes"] <= cache["bound"] and cache["images"] >= 2


def test_medsam3d_click_in_the_input_geometry(server, studies, tmp_path):
    t1 = nib.load(studies / "mni_t1_lps.nii.gz")
    click = [int(c) for c in np.round(np.linalg.inv(t1.affine) @ [*WM_CLICK_RAS, 1.0])[:3]]
    code, res, path = server.infer("medsam3d", "mni_t1_lps", {"foreground": [click]}, tmp_path)
    assert code == 200, res
    mask = same_geometry(path, studies / "mni_t1_lps.nii.gz")
    assert mask[tuple(click)] == 1 and 0 < mask.mean() < 0.5


def test_bad_prompt_is_a_400_naming_the_file(server, tmp_path):
    code, text, path = server.infer("litemedsam", "mni_t1", {"foreground": [[700, 10, 10]]}, tmp_path)
    assert code == 400 and path is None
    assert "mni_t1.nii.gz" in text and "outside the image" in text


def test_classification_answers_probabilities(server, tmp_path):
    code, res, path = server.infer("vit_cls", "mni_t1", {}, tmp_path)
    assert code == 200 and path is None
    assert sorted(res["probabilities"]) == sorted(res["label_names"])
    assert res["prediction"] == max(res["probabilities"], key=res["probabilities"].get)


def test_a_running_inference_does_not_block_the_server(server, tmp_path):
    done: dict[str, float] = {}

    def slow() -> None:
        server.infer("medsam3d", "mni_t1", {"foreground": [[60, 120, 100]]}, tmp_path)
        done["infer"] = time.monotonic()

    worker = threading.Thread(target=slow)
    worker.start()
    time.sleep(0.5)
    server.get("/info/")
    done["info"] = time.monotonic()
    worker.join(300)
    assert done["info"] < done["infer"]


def kill_training(server, deadline: float) -> list[int]:
    """``kill -9`` the server's ``medimg.train`` subprocess once it is in its training loop."""
    import psutil

    while time.monotonic() < deadline:
        procs = [p for p in psutil.process_iter(["pid", "cmdline"])
                 if "medimg.train" in " ".join(p.info["cmdline"] or []) and os.getpgid(p.pid) == server.pgid]
        started = list(server.runs.glob("swin_unetr/*/checkpoints/last.ckpt"))  # a step is done: midway
        if procs and started:
            for p in procs:
                p.kill()
            return [p.pid for p in procs]
        time.sleep(0.2)
    return []


def wait_training(client, seconds: float = 900) -> dict:
    """The train status once it is DONE or ERROR."""
    deadline, status = time.monotonic() + seconds, {}
    while time.monotonic() < deadline:
        status = client.train_status()
        if status["status"] in ("DONE", "ERROR"):
            break
        time.sleep(2)
    return status


def test_monai_label_client_clicks_saves_trains_and_picks_the_next_sample(server, studies, mni_dir, tmp_path):
    """Driven the way 3D Slicer's module drives it: MONAI Label's own Python client, with the token."""
    from monailabel.client import MONAILabelClient

    client = MONAILabelClient(server.url, tmpdir=str(tmp_path))
    client.update_auth({"token_type": "Bearer", "access_token": TOKEN})
    info = client.info()
    assert sorted(info["models"]) == ["litemedsam", "medsam3d", "swin_unetr", "vit_cls"]
    # clicks on the viewed slice
    pos, neg, _ = wm_prompts(mni_dir)
    neg = axial_negative(mni_dir, pos)  # on the viewed slice too: clicks sharing only j come from a coronal view
    click_file, click = client.infer("litemedsam", "mni_t1", {"foreground": [pos], "background": [neg],
                                                              "slice": pos[2], "result_extension": ".nii.gz"})
    mask = same_geometry(Path(click_file), studies / "mni_t1.nii.gz")
    assert mask[tuple(pos)] == 1 and mask[tuple(neg)] == 0 and mask.sum() == mask[:, :, pos[2]].sum()
    # save labels (one stored LPS), train from them, and the next inference uses the published weights
    labels = nib.load(mni_dir / "labels.nii.gz")
    nib.save(labels, tmp_path / "ras.nii.gz")
    nib.save(labels.as_reoriented(LPS), tmp_path / "lps.nii.gz")
    for image, name in (("mni_t1", "ras.nii.gz"), ("mni_t1_lps", "lps.nii.gz")):
        saved = client.save_label(image, str(tmp_path / name), tag="final")
        assert saved["image"] == image
    weights = Path(info["models"]["swin_unetr"]["config"]["bundle"]) / "models" / "model.pt"
    mtime, served_bytes = weights.stat().st_mtime_ns, weights.read_bytes()
    _, before, before_path = server.infer("swin_unetr", "mni_t1", {}, tmp_path)
    # kill -9 of a training midway: the served bundle is unchanged, the server answers, the next training runs
    client.train_start("swin_unetr", {"max_epochs": 50})
    killed = kill_training(server, deadline=time.monotonic() + 300)
    assert killed, "no medimg.train process appeared"
    assert wait_training(client)["status"] == "ERROR"
    assert weights.read_bytes() == served_bytes and weights.stat().st_mtime_ns == mtime
    assert server.infer("swin_unetr", "mni_t1", {}, tmp_path)[1]["weights_version"] == before["weights_version"]
    client.train_start("swin_unetr", {"max_epochs": 1, "publish": "always"})  # one epoch may validate worse
    status = wait_training(client)
    assert status.get("status") == "DONE", status.get("details")
    published = [line for line in status["details"] if "medimg: published" in line]
    assert published and "publish=always" in published[0] and "initial/val/dice" in published[0]
    assert weights.stat().st_mtime_ns > mtime
    _, after, after_path = server.infer("swin_unetr", "mni_t1", {}, tmp_path)
    assert after["weights_version"] != before["weights_version"]
    changed = read_image(after_path, spatial_dims=None).array != read_image(before_path, spatial_dims=None).array
    assert changed.any()
    # next sample: the one image nobody has labelled
    assert client.next_sample("random", {})["id"] == "mni_series"


def test_a_restarted_server_serves_the_published_bundle_and_the_stored_labels(server, tmp_path):
    published = server.get("/info/")["models"]["swin_unetr"]
    weights = Path(published["config"]["bundle"]) / "models" / "model.pt"
    identity = (weights.stat().st_ino, weights.stat().st_mtime_ns)
    labels = server.get("/datastore/", params={"output": "all"})["objects"]
    server.stop()
    server.start()  # same models, studies and app folder
    code, res, _ = server.infer("swin_unetr", "mni_t1", {}, tmp_path)
    assert code == 200 and tuple(res["weights_version"]) == identity
    after = server.get("/datastore/", params={"output": "all"})["objects"]
    assert {k: sorted(v["labels"]) for k, v in after.items()} == {k: sorted(v["labels"]) for k, v in labels.items()}
    assert "final" in after["mni_t1"]["labels"]


def test_the_server_stops_and_leaves_no_process(server):
    server.stop()
    assert not server.alive()
    assert server.proc.returncode is not None
