"""The MONAI Label app's parts without a server: result geometry, Slicer prompts, publication, the CLI's checks."""

from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from medimg.errors import DataError, WeightsError
from medimg.io.image import Image, read_image
from tests.helpers import REPO, oblique_affine


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz", ".mha"])
def test_results_keep_an_oblique_lps_geometry(suffix):
    from medimg.label.results import write_result

    affine = oblique_affine(np.diag([-0.7, -0.9, 2.5, 1.0]), 20.0)
    affine[:3, 3] = [12.0, -40.0, 7.5]
    image = Image(np.zeros((9, 11, 5), np.float32), affine, None, "nifti")
    labels = np.random.default_rng(0).integers(0, 4, (9, 11, 5))
    out = read_image(write_result(labels, image, suffix), spatial_dims=None)
    np.testing.assert_allclose(out.affine, affine, atol=1e-5)
    np.testing.assert_array_equal(out.array, labels)


def test_result_format_errors_name_the_problem():
    from medimg.label.results import write_result

    image = Image(np.zeros((4, 4, 4), np.float32), np.eye(4), None, "nifti")
    with pytest.raises(DataError, match="DICOM SEG result needs a DICOM series"):
        write_result(np.zeros((4, 4, 4)), image, ".dcm")
    with pytest.raises(DataError, match="unsupported '.png'"):
        write_result(np.zeros((4, 4, 4)), image, ".png")


def test_slicer_roi_and_clicks_become_checked_voxel_prompts():
    from medimg.label.infer import _clicks, _roi, viewed_plane

    image = Image(np.zeros((20, 30, 10), np.float32), np.diag([-1.0, -1.0, 1.0, 1.0]), "scan.nii.gz", "nifti")
    # Slicer converts RAS corners: on an LPS image i and j come reversed; corners beyond the image are clipped
    np.testing.assert_array_equal(_roi({"roi": [15, 3, 25, 40, 2, 6]}, image), [3, 25, 2, 15, 29, 6])
    assert _roi({"roi": []}, image) is None
    with pytest.raises(ValueError, match="needs 6 numbers"):
        _roi({"roi": [1, 2, 3, 4]}, image)
    pts, labels = _clicks({"foreground": [[1, 2, 3]], "background": [[4, 5, 6]]}, image)
    np.testing.assert_array_equal(pts, [[1, 2, 3], [4, 5, 6]])
    np.testing.assert_array_equal(labels, [1, 0])
    with pytest.raises(ValueError, match="scan.nii.gz: foreground click .* outside the image"):
        _clicks({"foreground": [[20, 0, 0]]}, image)
    assert viewed_plane(np.diag([-1.0, -1.0, 1.0, 1.0])) == "axial"
    assert viewed_plane(np.array([[1.0, 0, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1]])) == "coronal"


def test_publication_replaces_the_bundle_for_readers_under_the_lock(tmp_path):
    from medimg.label.publish import bundle_lock, bundle_version, load_locked, publish_bundle

    served, new = tmp_path / "models" / "seg", tmp_path / "run" / "bundle"
    for folder, text in ((served, "old"), (new, "new")):
        (folder / "models").mkdir(parents=True)
        (folder / "models" / "model.pt").write_text(text)
    before = bundle_version(served)
    lock = bundle_lock(served)
    lock.acquire()  # a reader is loading: publication waits for it
    worker = threading.Thread(target=publish_bundle, args=(new, served))
    worker.start()
    worker.join(1.0)
    assert worker.is_alive() and (served / "models" / "model.pt").read_text() == "old"
    lock.release()
    worker.join(30)
    text, version = load_locked(served, lambda b: (b / "models" / "model.pt").read_text())
    assert text == "new" and version != before and version == bundle_version(served)
    assert [p.name.split("-")[0] for p in served.parent.glob(".seg.previous-*")] == [".seg.previous"]


def test_init_weights_must_fit_the_network(tmp_path):
    from medimg.models import build_network
    from medimg.runs.run import load_init_weights

    net = build_network("swin_unetr", in_channels=1, out_channels=3, feature_size=12, depths=[1, 1, 1, 1])
    other = build_network("swin_unetr", in_channels=1, out_channels=3, feature_size=12, depths=[1, 1, 1, 1])
    (tmp_path / "b" / "models").mkdir(parents=True)
    torch.save(other.state_dict(), tmp_path / "b" / "models" / "model.pt")
    load_init_weights(net, tmp_path / "b")
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), other.state_dict().values()))
    wrong = build_network("swin_unetr", in_channels=1, out_channels=2, feature_size=12, depths=[1, 1, 1, 1])
    with pytest.raises(WeightsError, match="do not fit"):
        load_init_weights(wrong, tmp_path / "b")
    with pytest.raises(WeightsError, match="no such bundle"):
        load_init_weights(net, tmp_path / "missing")


def test_serve_checks_its_folders_with_one_line(tmp_path):
    (tmp_path / "studies").mkdir()
    (tmp_path / "empty").mkdir()
    for models, expect in ((tmp_path / "nope", "no such folder"), (tmp_path / "empty", "no medimg bundle")):
        proc = subprocess.run([sys.executable, "-m", "medimg.label", "serve", "--models", str(models),
                               "--studies", str(tmp_path / "studies")], capture_output=True, text=True, cwd=REPO,
                              timeout=360)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {models}: --models: {expect}"), lines


def test_only_loopback_hosts_count_as_local():
    from medimg.label.serve import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("example.org")
