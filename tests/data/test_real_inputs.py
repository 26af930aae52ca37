"""Messy real-world inputs: each gives a correct result or one DataError naming the file, never a crash."""

from __future__ import annotations

import gzip
import shutil
import subprocess

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.data import get_testdata_file

from medimg.errors import DataError
from medimg.io.image import read_image
from tests.helpers import write_dicom_series
from tests.label.vendors import philips_volume


def _dcm2niix() -> str:
    exe = shutil.which("dcm2niix")
    if exe is None:  # the reference tool is part of the test environment (pip install -e ".[dev]")
        pytest.fail("dcm2niix is not installed: the DICOM tests need it as their reference")
    return exe


def _reference(folder, out):
    subprocess.run([_dcm2niix(), "-z", "y", "-f", "ref", "-o", str(out), str(folder)], check=True,
                   capture_output=True)
    return nib.load(str(out / "ref.nii.gz"))


@pytest.mark.parametrize("suffix", [".nii", ".mha", ".nrrd"])
def test_header_promising_more_voxels_fails_fast(tmp_path, suffix):
    arr = np.random.default_rng(0).random((20, 30, 40)).astype(np.float32)
    path = tmp_path / f"a{suffix}"
    if suffix == ".nii":
        nib.save(nib.Nifti1Image(arr, np.eye(4)), str(path))
    else:
        sitk.WriteImage(sitk.GetImageFromArray(arr), str(path), False)
    data = path.read_bytes()
    path.write_bytes(data[:-1000])
    with pytest.raises(DataError, match=r"declares 96,000 bytes of voxel data but the file holds 95,000") as err:
        read_image(path)
    assert err.value.path == str(path)


def test_gzipped_nifti_header_promising_a_huge_volume_fails_without_allocating(tmp_path):
    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4))
    img.header.set_data_shape((4000, 4000, 4000))  # 256 GB of float32 declared, 256 bytes present
    raw = img.header.binaryblock + b"\0" * 4 + np.zeros(64, np.float32).tobytes()
    path = tmp_path / "huge.nii.gz"
    path.write_bytes(gzip.compress(raw))
    with pytest.raises(DataError, match="truncated or corrupt"):
        read_image(path)


def test_enhanced_multiframe_ct_matches_dcm2niix(tmp_path):
    """Enhanced CT (one file, per-frame functional groups): same voxels and world geometry as dcm2niix."""
    folder = tmp_path / "ect"
    folder.mkdir()
    shutil.copy(get_testdata_file("eCT_Supplemental.dcm"), folder)
    ours = read_image(folder)
    ref = _reference(folder, tmp_path)
    a = nib.as_closest_canonical(nib.Nifti1Image(ours.array, ours.affine))
    b = nib.as_closest_canonical(ref)
    assert a.shape == b.shape == (512, 512, 2)
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-4)
    np.testing.assert_array_equal(a.get_fdata(), b.get_fdata())


def test_enhanced_ct_stored_one_frame_per_file_reads_as_the_multiframe_file(tmp_path):
    """Enhanced DICOM one frame per file (NumberOfFrames 1): the geometry is only in the functional groups."""
    import copy

    from pydicom.uid import generate_uid

    src = pydicom.dcmread(get_testdata_file("eCT_Supplemental.dcm"))
    (tmp_path / "whole").mkdir()
    shutil.copy(get_testdata_file("eCT_Supplemental.dcm"), tmp_path / "whole")
    whole = read_image(tmp_path / "whole")
    pixels = src.pixel_array
    for folder, frames in (("split", (1, 0)), ("one", (0,))):
        (tmp_path / folder).mkdir()
        for i in frames:  # written in reverse: the reader sorts by position
            ds = copy.deepcopy(src)
            ds.NumberOfFrames = 1
            ds.PerFrameFunctionalGroupsSequence = pydicom.Sequence([src.PerFrameFunctionalGroupsSequence[i]])
            ds.PixelData = pixels[i].tobytes()
            ds.SOPInstanceUID = generate_uid()
            ds.save_as(tmp_path / folder / f"{i}.dcm")
    split = read_image(tmp_path / "split")
    np.testing.assert_array_equal(split.array, whole.array)
    np.testing.assert_allclose(split.affine, whole.affine, atol=1e-6)
    one = read_image(tmp_path / "one")  # frame 0 alone: the whole volume's slice at its position
    k = [np.allclose(whole.affine @ [0, 0, k, 1], one.affine[:, 3], atol=1e-4) for k in (0, 1)].index(True)
    np.testing.assert_array_equal(one.array[..., 0], whole.array[..., k])
    np.testing.assert_allclose(one.affine[:3, :2], whole.affine[:3, :2], atol=1e-6)


def test_malformed_number_of_frames_is_one_line_naming_the_file(tmp_path):
    """pydicom's badVR.dcm: NumberOfFrames '1A' (an IS that is no number)."""
    from medimg.io.image import probe_image

    (tmp_path / "bad").mkdir()
    shutil.copy(get_testdata_file("badVR.dcm"), tmp_path / "bad")
    for check in (probe_image, read_image):
        with pytest.raises(DataError, match=r"NumberOfFrames \(0028,0008\) .*'1A'") as err:
            check(tmp_path / "bad")
        assert err.value.path == str(tmp_path / "bad" / "badVR.dcm")


@pytest.mark.parametrize("name", ["MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm", "MR_small_RLE.dcm"])
def test_compressed_transfer_syntaxes_decode_losslessly(tmp_path, name):
    """JPEG-LS, JPEG 2000 and RLE (pylibjpeg plugins) give exactly the uncompressed slice's voxels."""
    for n, folder in ((name, tmp_path / "c"), ("MR_small.dcm", tmp_path / "u")):
        folder.mkdir()
        shutil.copy(get_testdata_file(n), folder)
    compressed = read_image(tmp_path / "c")
    plain = read_image(tmp_path / "u")
    assert pydicom.dcmread(get_testdata_file(name)).file_meta.TransferSyntaxUID.is_compressed
    np.testing.assert_array_equal(compressed.array, plain.array)
    np.testing.assert_allclose(compressed.affine, plain.affine)


@pytest.mark.parametrize("name,problem", [
    ("SC_rgb.dcm", "colour image"),
    ("emri_small.dcm", "without per-frame functional groups"),
])
def test_colour_and_unplaceable_multiframe_are_refused(tmp_path, name, problem):
    folder = tmp_path / "s"
    folder.mkdir()
    shutil.copy(get_testdata_file(name), folder)
    with pytest.raises(DataError, match=problem) as err:
        read_image(folder)
    assert name in err.value.path


def _series(tmp_path, n=6):
    vol = np.random.default_rng(0).integers(0, 1000, (16, 12, n)).astype(np.float32)
    write_dicom_series(vol, np.diag([0.8, 0.8, 2.0, 1.0]), tmp_path / "s", shuffle=False)
    return sorted((tmp_path / "s").iterdir())


def test_slice_without_position_is_named(tmp_path):
    files = _series(tmp_path)
    ds = pydicom.dcmread(files[3])
    del ds.ImagePositionPatient
    ds.save_as(files[3])
    with pytest.raises(DataError, match="no ImagePositionPatient") as err:
        read_image(tmp_path / "s")
    assert err.value.path == str(files[3])


@pytest.mark.parametrize("position", [0, 5])
def test_slice_without_orientation_is_a_data_error_naming_file_and_tag(tmp_path, position):
    """A real Philips slice without ImageOrientationPatient: a DataError naming it and the tag, no AttributeError."""
    stripped = philips_volume(tmp_path / "philips", "ImageOrientationPatient", position)[position]
    with pytest.raises(DataError, match=r"no ImageOrientationPatient \(0020,0037\)") as err:
        read_image(tmp_path / "philips")
    assert err.value.path == str(stripped)


def test_siemens_mosaic_is_refused(tmp_path):
    files = _series(tmp_path)
    for f in files:
        ds = pydicom.dcmread(f)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "MOSAIC"]
        ds.save_as(f)
    with pytest.raises(DataError, match="Siemens mosaic"):
        read_image(tmp_path / "s")
