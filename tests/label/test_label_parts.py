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


@pytest.fixture
def own_tempdir(tmp_path, monkeypatch):
    """Results go to the temporary folder (MONAI Label deletes each once sent): here, one of the test's own."""
    import tempfile

    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz", ".mha"])
def test_results_keep_an_oblique_lps_geometry(suffix, own_tempdir):
    from medimg.label.results import write_result

    affine = oblique_affine(np.diag([-0.7, -0.9, 2.5, 1.0]), 20.0)
    affine[:3, 3] = [12.0, -40.0, 7.5]
    image = Image(np.zeros((9, 11, 5), np.float32), affine, None, "nifti")
    labels = np.random.default_rng(0).integers(0, 4, (9, 11, 5))
    path = write_result(labels, image, suffix)
    assert path.startswith(str(own_tempdir)) and path.endswith(suffix)
    out = read_image(path, spatial_dims=None)
    np.testing.assert_allclose(out.affine, affine, atol=1e-5)
    np.testing.assert_array_equal(out.array, labels)



@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
@pytest.mark.parametrize("plane", ["coronal", "axial"])
def test_a_2d_image_result_keeps_its_plane_in_nrrd_and_mha(suffix, plane, own_tempdir, tmp_path):
    """A 2D NIfTI of a coronal slice lies in 3D space: its NRRD/MHA result is a one-slice volume there."""
    import nibabel as nib
    import SimpleITK as sitk

    from medimg.io.image import LPS_TO_RAS
    from medimg.label.results import write_result

    if plane == "coronal":  # i -> R, j -> S, k -> P
        affine = np.array([[0.8, 0, 0, -12.0], [0, 0, -2.5, 40.0], [0, 0.6, 0, -7.0], [0, 0, 0, 1]])
    else:  # in the axial plane through z = 0: what a 2D NRRD holds
        affine = np.diag([-0.8, -0.6, 1.0, 1.0])
        affine[:2, 3] = [12.0, 40.0]
    nib.save(nib.Nifti1Image(np.zeros((9, 11), np.float32), affine), str(tmp_path / "slice.nii.gz"))
    image = read_image(tmp_path / "slice.nii.gz", spatial_dims=None)
    assert image.array.shape == (9, 11)
    labels = np.random.default_rng(0).integers(0, 3, (9, 11))
    path = write_result(labels, image, suffix)
    out = read_image(path, spatial_dims=None)
    np.testing.assert_allclose(out.affine, image.affine, atol=1e-6)
    np.testing.assert_array_equal(out.array.reshape(9, 11), labels)
    itk, lps = sitk.ReadImage(path), np.linalg.inv(LPS_TO_RAS) @ affine
    nd = 3 if plane == "coronal" else 2
    assert itk.GetSize() == (9, 11, 1)[:nd] and out.array.shape == (9, 11, 1)[:nd]
    spacing = np.sqrt((lps[:nd, :nd] ** 2).sum(0))
    np.testing.assert_allclose(itk.GetSpacing(), spacing, atol=1e-6)
    np.testing.assert_allclose(itk.GetOrigin(), lps[:nd, 3], atol=1e-6)
    np.testing.assert_allclose(np.reshape(itk.GetDirection(), (nd, nd)), lps[:nd, :nd] / spacing, atol=1e-6)

def test_result_format_errors_name_the_problem_and_leave_no_file(own_tempdir):
    from medimg.label.results import write_result

    image = Image(np.zeros((4, 4, 4), np.float32), np.eye(4), None, "nifti")
    with pytest.raises(DataError, match="DICOM SEG result needs a DICOM series"):
        write_result(np.zeros((4, 4, 4)), image, ".dcm")
    with pytest.raises(DataError, match="unsupported '.png'"):
        write_result(np.zeros((4, 4, 4)), image, ".png")
    assert not any(own_tempdir.iterdir())  # the .dcm attempt's temporary file went with the error


def test_slicer_roi_and_clicks_become_checked_voxel_prompts():
    from medimg.label.prompts import request_clicks as _clicks
    from medimg.label.prompts import request_roi as _roi
    from medimg.label.prompts import viewed_plane

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



@pytest.mark.parametrize("shape", [(20, 30, 1), (20, 30)])
def test_a_one_slice_image_takes_slicers_3d_roi_and_clicks(shape):
    """Slicer shows a one-slice volume (or a 2D file) as a volume: 6-number ROIs, 3-number clicks at k = 0."""
    from medimg.label.prompts import request_clicks as _clicks
    from medimg.label.prompts import request_prompts as _prompts
    from medimg.label.prompts import request_roi as _roi

    image = Image(np.zeros(shape, np.float32), np.eye(4), "slice.nii.gz", "nifti")
    for roi in ([15, 3, 25, 40, 0, 0], [15, 3, 25, 40, 2, -1], [3, 15, 25, 29]):  # the 2D form still works
        np.testing.assert_array_equal(_roi({"roi": roi}, image), [3, 25, 15, 29])
    with pytest.raises(ValueError, match=r"roi .* lies outside the image"):
        _roi({"roi": [3, 15, 25, 29, 1, 2]}, image)  # the k pair must contain the one slice
    with pytest.raises(ValueError, match="needs 4 numbers"):
        _roi({"roi": [3, 15, 25]}, image)
    pts, labels = _clicks({"foreground": [[1, 2, 0]], "background": [[4, 5]]}, image)
    np.testing.assert_array_equal(pts, [[1, 2], [4, 5]])
    np.testing.assert_array_equal(labels, [1, 0])
    with pytest.raises(ValueError, match="slice.nii.gz: foreground click .* outside the image"):
        _clicks({"foreground": [[1, 2, 1]]}, image)
    request = {"scribbles": [{"points": [[5, 5, 0], [5, 15, 0]], "label": 0}],
               "lasso": [[2, 3, 0], [2, 12, 0], [9, 12, 0], [9, 3, 0]]}
    pts, labels, box, lasso = _prompts(request, image, flat_boxes=True)
    assert pts.shape[1] == 2 and (pts[:, 0] == 5).all() and labels.tolist() == [0] * len(pts)
    assert box.tolist() == [2, 3, 9, 12] and lasso.cut(np.ones((20, 30), bool)).sum() > 0
    with pytest.raises(ValueError, match="outside the image"):
        _prompts({"lasso": [[2, 3, 1], [2, 12, 1], [9, 12, 1]]}, image, flat_boxes=True)

def test_slicer_scribbles_and_lasso_become_clicks_and_a_bounded_box():
    from medimg.label.prompts import request_prompts as _prompts

    image = Image(np.zeros((20, 30, 10), np.float32), np.eye(4), "scan.nii.gz", "nifti")
    request = {"foreground": [[1, 2, 3]], "scribbles": [{"points": [[5, 5, 4], [5, 21, 4]], "label": 0}],
               "lasso": [[2, 3, 6], [2, 12, 6], [9, 12, 6], [9, 3, 6]]}
    pts, labels, box, lasso = _prompts(request, image, flat_boxes=True)
    assert labels.tolist() == [1, 0, 0, 0] and (pts[1:, 0] == 5).all()  # 17 voxels of stroke: 3 clicks
    assert box.tolist() == [2, 3, 6, 9, 12, 6] and lasso.axis == 2 and lasso.index == 6
    thick = _prompts(request, image, flat_boxes=False)[2]  # a 3D model: grown along the normal
    assert thick.tolist() == [2, 3, 1.5, 9, 12, 9]
    with pytest.raises(ValueError, match="an roi or a lasso, not both"):
        _prompts({**request, "roi": [0, 5, 0, 5, 0, 5]}, image, flat_boxes=True)
    with pytest.raises(ValueError, match="scan.nii.gz: a lasso must lie on one slice"):
        _prompts({"lasso": [[2, 3, 6], [2, 12, 7], [9, 12, 9]]}, image, flat_boxes=True)


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
    assert (served.parent / ".seg.original" / "models" / "model.pt").read_text() == "old"  # the first one replaced


def _bundles(tmp_path, size: int = 1):
    served, new = tmp_path / "models" / "seg", tmp_path / "run" / "bundle"
    for folder, text in ((served, "old"), (new, "new")):
        (folder / "models").mkdir(parents=True)
        (folder / "models" / "model.pt").write_text(text * size)
        (folder / "configs").mkdir()
        (folder / "configs" / "metadata.json").write_text(text * size)
    return served, new


def _served_text(served) -> str:
    from medimg.label.publish import load_locked

    def read(b):
        texts = {(b / "models" / "model.pt").read_text(), (b / "configs" / "metadata.json").read_text()}
        assert len(texts) == 1, "a mix of two bundles is served"
        return texts.pop()

    return load_locked(served, read)[0]


@pytest.mark.parametrize("crash_at", [0, 1, 2])
def test_a_publication_stopped_at_any_rename_leaves_old_or_new(tmp_path, monkeypatch, crash_at):
    from pathlib import Path

    from medimg.label.publish import publish_bundle

    served, new = _bundles(tmp_path)
    real, calls = Path.rename, []

    def rename(self, target):
        if len(calls) == crash_at:
            raise KeyboardInterrupt("killed")  # the process dies here: nothing after it runs
        calls.append(self)
        return real(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        publish_bundle(new, served)
    monkeypatch.setattr(Path, "rename", real)
    monkeypatch.setattr("medimg.label.publish._owner_alive", lambda partial: False)  # the publisher is dead
    # 0: incoming never complete -> old; 1: complete but not swapped -> old; 2: served moved aside -> new
    assert _served_text(served) == ["old", "old", "new"][crash_at]
    assert not list(served.parent.glob(".seg.incoming*"))
    publish_bundle(new, served)  # and the next publication works
    assert _served_text(served) == "new"


def test_kill_9_of_a_publisher_never_serves_a_mix_or_nothing(tmp_path):
    served, new = _bundles(tmp_path, size=4_000_000)  # 4 MB files: the copy takes a while
    code = ("import sys; from medimg.label.publish import publish_bundle; "
            "publish_bundle(sys.argv[1], sys.argv[2])")
    seen = set()
    rng = np.random.default_rng(0)
    for _ in range(12):
        proc = subprocess.Popen([sys.executable, "-c", code, str(new), str(served)], cwd=REPO)
        threading.Event().wait(float(rng.uniform(0.3, 1.2)))  # import takes ~0.3 s, then copy and swap
        proc.kill()
        proc.wait()
        text = _served_text(served)
        assert text in ("old" * 4_000_000, "new" * 4_000_000)
        seen.add(text[:3])
        (new / "models" / "model.pt").write_text(("old" if text.startswith("new") else "new") * 4_000_000)
        (new / "configs" / "metadata.json").write_text(("old" if text.startswith("new") else "new") * 4_000_000)
    assert seen == {"old", "new"}  # kills landed both before and after the swap


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
    from medimg.label.origin import is_loopback_name as is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("example.org")
