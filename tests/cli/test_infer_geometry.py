from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from medimg.io.image import read_image
from tests.helpers import flip_to_lps, oblique_affine, run_module, write_dicom_series


@pytest.fixture(scope="module")
def predictions(mni_run, mni_dir, tmp_path_factory):
    """One infer call over a folder of real MNI152 variants: original, LPS, oblique, permuted, anisotropic, DICOM."""
    src = nib.load(str(mni_dir / "t1.nii.gz"))
    vol, aff = np.asarray(src.dataobj, dtype=np.float32), src.affine
    inputs = tmp_path_factory.mktemp("inputs")
    variants = {
        "orig": (vol, aff),
        "lps": flip_to_lps(vol, aff),
        "oblique": (vol, oblique_affine(oblique_affine(aff, 25.0, axis=2), 10.0, axis=0)),
        "permuted": (vol.transpose(2, 0, 1).copy(), aff[:, [2, 0, 1, 3]]),
        "aniso": (vol[:, :, ::3].copy(), aff @ np.diag([1.0, 1.0, 3.0, 1.0])),
    }
    for name, (v, a) in variants.items():
        nib.save(nib.Nifti1Image(v, a), str(inputs / f"{name}.nii.gz"))
    write_dicom_series(vol, aff, inputs / "dicom_series", shuffle=True)
    out = tmp_path_factory.mktemp("preds")
    proc = run_module("medimg.infer", "--bundle", str(mni_run / "bundle"), "--input", str(inputs), "--output", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return inputs, out


@pytest.mark.parametrize("name", ["orig", "lps", "oblique", "permuted", "aniso"])
def test_output_geometry_equals_input(predictions, name):
    inputs, out = predictions
    a, b = nib.load(str(inputs / f"{name}.nii.gz")), nib.load(str(out / f"{name}_seg.nii.gz"))
    assert a.shape == b.shape
    assert np.abs(a.affine - b.affine).max() <= 1e-4
    assert set(np.unique(np.asarray(b.dataobj))) <= {0, 1, 2}


def _pred(out, name):
    return np.asarray(nib.load(str(out / f"{name}_seg.nii.gz")).dataobj)


def test_reoriented_copies_agree_with_original(predictions):
    _, out = predictions
    orig = _pred(out, "orig")
    assert orig.any()
    lps = _pred(out, "lps")[::-1, ::-1]
    permuted = _pred(out, "permuted").transpose(1, 2, 0)
    for other in (lps, permuted):  # pure axis flips/permutations: the model sees the identical array
        fg = (other > 0) | (orig > 0)  # on the foreground, not the background-dominated whole image
        assert fg.sum() > 1000 and (other[fg] == orig[fg]).mean() >= 0.999
    # oblique frame: MONAI's Spacingd resamples the rotated grid with a sub-voxel offset, so the
    # (tiny, 4 mm) model sees slightly different input; labels must still agree closely
    oblique = _pred(out, "oblique")  # the same voxel array under a rotated affine: voxel (i, j, k) is the same anatomy
    fg = (oblique > 0) | (orig > 0)
    # the tiny 4 mm model's grey/white call is sensitive to the rotated resampling grid (about 2/3 agree);
    # geometry is what the tissue-mask Dice below checks: a misplaced output would miss the brain
    assert (oblique[fg] == orig[fg]).mean() >= 0.6
    inter = np.logical_and(oblique > 0, orig > 0).sum()
    assert 2 * inter / ((oblique > 0).sum() + (orig > 0).sum()) >= 0.85


def test_dicom_series_prediction_matches_nifti(predictions):
    inputs, out = predictions
    series = read_image(inputs / "dicom_series")
    pred = nib.load(str(out / "dicom_series_seg.nii.gz"))
    np.testing.assert_allclose(pred.affine, series.affine, atol=1e-4)
    got, orig = np.asarray(pred.dataobj), _pred(out, "orig")
    fg = (got > 0) | (orig > 0)
    assert (got[fg] == orig[fg]).mean() >= 0.999


def test_monai_bundle_run_writes_input_geometry(mni_run, mni_dir, tmp_path):
    bundle = mni_run / "bundle"
    src = tmp_path / "lps.nii.gz"
    img = nib.load(str(mni_dir / "t1_posterior.nii.gz"))
    v, a = flip_to_lps(np.asarray(img.dataobj, dtype=np.float32), img.affine)
    nib.save(nib.Nifti1Image(v, a), str(src))
    proc = run_module("monai.bundle", "run", "--config_file", str(bundle / "configs" / "inference.json"),
                      "--bundle_root", str(bundle), "--datalist", f"['{src}']", "--output_dir", str(tmp_path / "o"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = nib.load(str(tmp_path / "o" / "lps_seg.nii.gz"))
    assert out.shape == v.shape
    assert np.abs(out.affine - a).max() <= 1e-4


def test_dicom_seg_output_references_the_series_and_holds_the_prediction(predictions, mni_run, tmp_path):
    import highdicom as hd
    import pydicom

    from medimg.io.dicom import read_dicom_series

    inputs, out = predictions
    seg_path = tmp_path / "seg.dcm"
    proc = run_module("medimg.infer", "--bundle", str(mni_run / "bundle"), "--input", str(inputs / "dicom_series"),
                      "--output", str(seg_path), "--format", "dicom-seg")
    assert proc.returncode == 0, proc.stderr[-3000:]
    seg = hd.seg.segread(seg_path)
    assert [d.SegmentLabel for d in seg.SegmentSequence] == ["grey_matter", "white_matter"]
    assert seg.SegmentSequence[0].SegmentAlgorithmName == "medimg swin_unetr"
    series = read_dicom_series(inputs / "dicom_series")
    uids = [pydicom.dcmread(p).SOPInstanceUID for p in series.files]
    source_series = pydicom.dcmread(series.files[0]).SeriesInstanceUID
    assert {r.SeriesInstanceUID for r in seg.ReferencedSeriesSequence} == {source_series}
    labels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, combine_segments=True,
                                               skip_overlap_checks=True).transpose(2, 1, 0)
    np.testing.assert_array_equal(labels, np.asarray(nib.load(str(out / "dicom_series_seg.nii.gz")).dataobj))


def test_dicom_seg_needs_a_dicom_input(mni_run, predictions, tmp_path):
    inputs, _ = predictions
    proc = run_module("medimg.infer", "--bundle", str(mni_run / "bundle"), "--input", str(inputs / "orig.nii.gz"),
                      "--output", str(tmp_path / "seg.dcm"), "--format", "dicom-seg")
    assert proc.returncode == 2 and "needs DICOM series inputs" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "seg.dcm").exists()
