from __future__ import annotations

import gzip
import shutil
import subprocess

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medimg.errors import DataError
from medimg.io.dicom import read_dicom_series
from medimg.io.image import read_image, write_like
from medimg.io.reader import MedimgReader
from tests.helpers import flip_to_lps, oblique_affine, write_dicom_series


def _volume(shape=(12, 10, 8), seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 1000, size=shape).astype(np.float32)


def _affine(spacing=(0.8, 0.9, 2.5), origin=(-10.0, 20.0, 5.0)):
    aff = np.diag([*spacing, 1.0])
    aff[:3, 3] = origin
    return aff


def _save_nifti(path, array, affine):
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def test_nifti_reads_exact_array_and_affine(tmp_path):
    vol, aff = _volume(), oblique_affine(_affine(), 17.0, axis=0)
    img = read_image(_save_nifti(tmp_path / "a.nii.gz", vol, aff))
    np.testing.assert_array_equal(img.array, vol)
    np.testing.assert_allclose(img.affine, aff, atol=1e-5)
    np.testing.assert_allclose(img.spacing, [0.8, 0.9, 2.5], atol=1e-5)


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_itk_formats_match_nifti_geometry(tmp_path, suffix):
    vol, aff = _volume(), oblique_affine(_affine(), 30.0, axis=2)
    src = read_image(_save_nifti(tmp_path / "a.nii.gz", vol, aff))
    sitk.WriteImage(sitk.ReadImage(str(tmp_path / "a.nii.gz")), str(tmp_path / f"a{suffix}"))
    other = read_image(tmp_path / f"a{suffix}")
    np.testing.assert_array_equal(other.array, src.array)
    np.testing.assert_allclose(other.affine, src.affine, atol=1e-4)


def test_2d_image_reads_as_one_slice_volume(tmp_path):
    img = read_image(_save_nifti(tmp_path / "s.nii.gz", _volume((9, 7)), _affine()))
    assert img.array.shape == (9, 7, 1)
    assert read_image(tmp_path / "s.nii.gz", spatial_dims=2).array.shape == (9, 7)


@pytest.mark.parametrize("oblique", [False, True])
def test_shuffled_dicom_series_reads_back_source(tmp_path, oblique):
    vol = _volume((16, 12, 9))
    aff = _affine((0.7, 0.7, 3.0))
    if oblique:
        aff = oblique_affine(oblique_affine(aff, 20.0, axis=0), 10.0, axis=2)
    write_dicom_series(vol, aff, tmp_path / "series", shuffle=True)
    img = read_image(tmp_path / "series")
    assert img.kind == "dicom"
    np.testing.assert_array_equal(img.array, vol)
    np.testing.assert_allclose(img.affine, aff, atol=1e-4)
    # and against an independent reader, not only the files our own writer made: SimpleITK (GDCM)
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "series")))
    ref = reader.Execute()
    ref_array = sitk.GetArrayFromImage(ref).transpose(2, 1, 0)  # (z, y, x) -> (i, j, k)
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(ref.GetDirection()).reshape(3, 3) * np.asarray(ref.GetSpacing())
    lps[:3, 3] = ref.GetOrigin()
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    a = nib.as_closest_canonical(nib.Nifti1Image(img.array, img.affine))
    b = nib.as_closest_canonical(nib.Nifti1Image(ref_array.astype(np.float32), ras))
    np.testing.assert_allclose(a.get_fdata(), b.get_fdata(), atol=1e-3)
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-3)


def test_dicom_matches_dcm2niix_reference(tmp_path):
    if shutil.which("dcm2niix") is None:  # a missing reference tool fails the suite
        pytest.fail("dcm2niix is not installed (pip install -e '.[dev]' provides it)")
    vol = _volume((16, 12, 9))
    aff = oblique_affine(_affine((0.7, 0.7, 3.0)), 15.0, axis=0)
    write_dicom_series(vol, aff, tmp_path / "series")
    out = tmp_path / "ref"
    out.mkdir()
    subprocess.run(["dcm2niix", "-z", "y", "-f", "ref", "-o", str(out), str(tmp_path / "series")],
                   check=True, capture_output=True)
    ref = nib.as_closest_canonical(nib.load(str(out / "ref.nii.gz")))
    ours = read_image(tmp_path / "series")
    mine = nib.as_closest_canonical(nib.Nifti1Image(ours.array, ours.affine))
    np.testing.assert_allclose(mine.get_fdata(), ref.get_fdata(), atol=1e-3)
    np.testing.assert_allclose(mine.affine, ref.affine, atol=1e-3)


def test_mixed_series_need_a_uid(tmp_path):
    vol = _volume((8, 8, 4))
    uid_a = write_dicom_series(vol, _affine(), tmp_path / "mix", description="A", seed=1)
    uid_b = write_dicom_series(vol * 2, _affine(), tmp_path / "mix", description="B", seed=2)
    with pytest.raises(DataError, match="mixes 2 series") as err:
        read_image(tmp_path / "mix")
    assert uid_a in str(err.value) and uid_b in str(err.value)
    np.testing.assert_array_equal(read_image(tmp_path / "mix", series_uid=uid_b).array, vol * 2)


def test_non_uniform_spacing_is_an_error(tmp_path):
    write_dicom_series(_volume((8, 8, 5)), _affine(), tmp_path / "s", slice_positions_mm=[0, 2.5, 5.0, 9.0, 11.5])
    with pytest.raises(DataError, match="non-uniform slice spacing"):
        read_dicom_series(tmp_path / "s")


def test_stray_files_are_skipped_with_a_warning(tmp_path):
    vol = _volume((8, 8, 4))
    write_dicom_series(vol, _affine(), tmp_path / "s")
    (tmp_path / "s" / "notes.txt").write_text("scanner notes")
    with pytest.warns(UserWarning, match="skipped 1 non-image file"):
        img = read_image(tmp_path / "s")
    np.testing.assert_array_equal(img.array, vol)


@pytest.mark.parametrize("case,match", [
    ("missing", "no such file"),
    ("empty", "file is empty"),
    ("truncated", "truncated or corrupt"),
    ("not_image", "not a readable NIfTI|truncated or corrupt"),
    ("text_suffix", "unsupported file type"),
    ("four_d", "is 4D"),
    ("five_d", "is 5D"),
    ("nan", "NaN intensities"),
    ("no_dicom", "no DICOM"),
])
def test_bad_inputs_name_the_file(tmp_path, case, match):
    good = _save_nifti(tmp_path / "good.nii.gz", _volume(), _affine())
    path = tmp_path / f"{case}.nii.gz"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "truncated":
        data = good.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case == "not_image":
        path.write_bytes(gzip.compress(b"this is not an image" * 20))
    elif case == "text_suffix":
        path = tmp_path / "scan.txt"
        path.write_text("hello")
    elif case == "four_d":
        _save_nifti(path, _volume((6, 6, 6, 3)), _affine())
    elif case == "five_d":
        _save_nifti(path, _volume((6, 6, 6, 1, 2)), _affine())
    elif case == "nan":
        vol = _volume()
        vol[1, 2, 3] = np.nan
        _save_nifti(path, vol, _affine())
    elif case == "no_dicom":
        path = tmp_path / "folder"
        path.mkdir()
        (path / "readme.txt").write_text("x")
    with pytest.raises(DataError, match=match) as err:
        read_image(path)
    assert path.name in str(err.value)


def test_trailing_singleton_axes_are_dropped(tmp_path):
    img = read_image(_save_nifti(tmp_path / "a.nii.gz", _volume((6, 6, 6, 1)), _affine()))
    assert img.array.shape == (6, 6, 6)


def test_monai_reader_matches_read_image(tmp_path):
    from monai.transforms import LoadImage

    vol, aff = _volume(), oblique_affine(_affine(), 12.0)
    path = _save_nifti(tmp_path / "a.nii.gz", vol, aff)
    loaded = LoadImage(reader=MedimgReader(), image_only=True)(str(path))
    np.testing.assert_array_equal(loaded.numpy(), vol)
    np.testing.assert_allclose(loaded.affine.numpy(), aff, atol=1e-5)


@pytest.mark.parametrize("geometry", ["ras", "lps", "oblique"])
def test_write_like_keeps_exact_geometry(tmp_path, geometry):
    vol, aff = _volume(), _affine()
    if geometry == "lps":
        vol, aff = flip_to_lps(vol, aff)
    elif geometry == "oblique":
        aff = oblique_affine(aff, 33.0, axis=1)
    src = _save_nifti(tmp_path / "in.nii.gz", vol, aff)
    ref = read_image(src)
    out = write_like((vol > 500).astype(np.uint8), ref, tmp_path / "out.nii.gz")
    a, b = nib.load(str(src)), nib.load(str(out))
    assert a.shape == b.shape
    np.testing.assert_array_equal(a.affine, b.affine)
    np.testing.assert_array_equal(a.header.get_qform(), b.header.get_qform())
    assert not list(tmp_path.glob(".*partial*"))


def test_write_like_refuses_wrong_shape_and_leaves_nothing(tmp_path):
    ref = read_image(_save_nifti(tmp_path / "in.nii.gz", _volume(), _affine()))
    with pytest.raises(DataError, match="differs from input shape"):
        write_like(np.zeros((3, 3, 3)), ref, tmp_path / "out.nii.gz")
    assert not (tmp_path / "out.nii.gz").exists()


def test_saved_ct_keeps_its_hounsfield_units(tmp_path):
    """A real CT slice (pydicom's ``CT_small``, -896 to 1167 HU) saved and read back is the same image, as int16."""
    from pydicom.data import get_testdata_file

    (tmp_path / "ct").mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / "ct")
    ct = read_image(tmp_path / "ct")
    assert ct.array.min() < -800 and ct.array.max() > 1000
    back = read_image(ct.save(tmp_path / "ct.nii.gz"))
    np.testing.assert_array_equal(back.array, ct.array)
    np.testing.assert_allclose(back.affine, ct.affine, atol=1e-4)  # NIfTI stores the affine as float32
    assert nib.load(str(tmp_path / "ct.nii.gz")).get_data_dtype() == np.int16


def test_saved_probability_map_keeps_its_values(tmp_path):
    """Non-integer voxels (the MNI152 grey-matter probability map, 0..1) are saved as float32, exactly."""
    from medimg.data.embedded.mni152 import MNI_FILES, mni152_source_dir

    gm = nib.load(str(mni152_source_dir() / MNI_FILES["gm"]))
    crop = np.asarray(gm.dataobj, dtype=np.float32)[80:96, 100:116, 80:88] / np.float32(255.0)
    src = read_image(_save_nifti(tmp_path / "gm.nii.gz", crop, gm.affine))
    assert 0.0 < src.array.max() <= 1.0 and not np.array_equal(src.array, np.round(src.array))
    back = read_image(src.save(tmp_path / "copy.nii.gz"))
    np.testing.assert_array_equal(back.array, src.array)
    assert nib.load(str(tmp_path / "copy.nii.gz")).get_data_dtype() == np.float32


def test_write_like_refuses_values_its_dtype_cannot_hold(tmp_path):
    ref = read_image(_save_nifti(tmp_path / "in.nii.gz", _volume(), _affine()))
    with pytest.raises(DataError, match="do not fit uint8"):
        write_like(_volume(), ref, tmp_path / "out.nii.gz", dtype=np.uint8)
    assert not (tmp_path / "out.nii.gz").exists()


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("kind", ["RGB", "complex"])
def test_rgb_and_complex_nifti_are_refused_naming_the_file(tmp_path, suffix, kind):
    """RGB24 crashed with a numpy error; complex lost its imaginary part silently."""
    from medimg.io.image import probe_image

    if kind == "RGB":
        data = np.zeros((4, 4, 4), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    else:
        data = (np.ones((4, 4, 4)) + 2j * np.ones((4, 4, 4))).astype(np.complex64)
    path = tmp_path / f"{kind}{suffix}"
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    for check in (read_image, probe_image):
        with pytest.raises(DataError, match=f"stores {kind} voxels.*a scalar volume is expected") as err:
            check(path)
        assert err.value.path == str(path)


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_complex_and_vector_itk_files_are_refused_by_probe_and_read(tmp_path, suffix):
    """A complex NRRD / MHA lost its imaginary part silently; probe accepted a vector file that read refused."""
    from medimg.io.image import probe_image

    cx = (np.ones((4, 5, 6)) + 2j * np.ones((4, 5, 6))).astype(np.complex64)
    sitk.WriteImage(sitk.GetImageFromArray(cx), str(tmp_path / f"cx{suffix}"))
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5, 6, 3), np.uint8), isVector=True),
                    str(tmp_path / f"rgb{suffix}"))
    complex_match = "stores complex voxels" if suffix == ".nrrd" else "has 2 components"  # MetaImage: 2 channels
    for name, match in (("cx", complex_match), ("rgb", "has 3 components per voxel")):
        for check in (read_image, probe_image):
            with pytest.raises(DataError, match=match) as err:
                check(tmp_path / f"{name}{suffix}")
            assert err.value.path == str(tmp_path / f"{name}{suffix}")


def test_complex_in_memory_images_are_refused():
    """nibabel, SimpleITK and array inputs go through the same float32 conversion as the files."""
    from medimg.io.memory import as_image

    cx = (np.ones((4, 5, 6)) + 2j * np.ones((4, 5, 6))).astype(np.complex64)
    for obj, name in ((nib.Nifti1Image(cx, np.eye(4)), "nibabel image"),
                      (sitk.GetImageFromArray(cx), "SimpleITK image"), (cx, "array")):
        with pytest.raises(DataError, match="stores complex voxels") as err:
            as_image(obj)
        assert err.value.path == name


@pytest.mark.parametrize("split", ["halves", "uneven"])
def test_multi_member_gzip_nifti_reads_whole_and_truncation_is_still_caught(tmp_path, split):
    """bgzip and ``cat a.gz b.gz`` write several gzip members: a valid .nii.gz that gunzip and nibabel read."""
    volume = np.arange(16 * 16 * 16, dtype=np.int16).reshape(16, 16, 16)
    nib.save(nib.Nifti1Image(volume, np.diag([2.0, 2.0, 2.0, 1.0])), str(tmp_path / "plain.nii"))
    raw = (tmp_path / "plain.nii").read_bytes()
    cut = len(raw) // 2 if split == "halves" else 1000  # halves: both members declare the same size
    members = [gzip.compress(raw[:cut]), gzip.compress(raw[cut:])]
    (tmp_path / "multi.nii.gz").write_bytes(b"".join(members))
    image = read_image(tmp_path / "multi.nii.gz")
    np.testing.assert_array_equal(image.array, volume)
    np.testing.assert_array_equal(image.affine, nib.load(str(tmp_path / "multi.nii.gz")).affine)
    (tmp_path / "cut.nii.gz").write_bytes(members[0] + members[1][: len(members[1]) // 2])
    with pytest.raises(DataError, match="truncated or corrupt"):
        read_image(tmp_path / "cut.nii.gz")


def test_real_bgzip_pigz_and_zero_padded_gzip_nifti_read_as_nibabel_reads_them(tmp_path):
    """bgzip ends with an empty member (its size field 0); tape tools pad with zeros: both valid gzip."""
    from tests.oracles import need_debian

    need_debian("tabix", "pigz")
    volume = np.arange(40 * 50 * 30, dtype=np.int16).reshape(40, 50, 30) % 977
    nib.save(nib.Nifti1Image(volume, np.diag([1.5, 1.0, 2.0, 1.0])), str(tmp_path / "v.nii"))
    raw = (tmp_path / "v.nii").read_bytes()
    files = {}
    for tool in (["bgzip", "-c"], ["pigz", "-c"], ["pigz", "-c", "-i"]):  # pigz -i: independent blocks
        files[" ".join(tool)] = subprocess.run([*tool, str(tmp_path / "v.nii")], check=True, capture_output=True).stdout
    files["gzip + zero padding"] = gzip.compress(raw) + b"\0" * 512
    for name, packed in files.items():
        path = tmp_path / "packed.nii.gz"
        path.write_bytes(packed)
        np.testing.assert_array_equal(read_image(path).array, np.asanyarray(nib.load(str(path)).dataobj), err_msg=name)
        path.write_bytes(packed[: len(packed) * 3 // 4])  # cut inside the voxel data
        with pytest.raises(DataError, match="truncated or corrupt"):
            read_image(path)
    path.write_bytes(files["bgzip -c"][:-28])  # only bgzip's empty end member missing: the voxels are all there
    np.testing.assert_array_equal(read_image(path).array, volume)
    path.write_bytes(gzip.compress(raw) + b"\0\0garbage")  # not padding: refused as gzip refuses it
    with pytest.raises(DataError, match="truncated or corrupt"):
        read_image(path)


def test_gantry_tilted_ct_is_refused_naming_the_folder(tmp_path):
    """Slices stepping along y as well as z (a GE gantry tilt of 20 degrees): the stack is sheared.

    The NIfTI sform could hold it but the qform cannot, so ITK / 3D Slicer would place it elsewhere.
    """
    tilt = np.deg2rad(20.0)
    sheared = np.diag([0.7, 0.7, 5.0, 1.0])
    sheared[1, 2] = 5.0 * np.tan(tilt)  # each slice shifted along y
    write_dicom_series(np.zeros((16, 16, 8), np.float32), sheared, tmp_path / "tilted")
    with pytest.raises(DataError, match=r"gantry tilt of 20\.0 degrees: resample it first \(e\.g\. dcm2niix\)") as err:
        read_image(tmp_path / "tilted")
    assert err.value.path == str(tmp_path / "tilted")
    # rounding of ImagePositionPatient (a hundredth of a mm over two thin slices) is no tilt
    near = np.diag([0.7, 0.7, 1.0, 1.0])
    near[0, 2] = 0.01
    write_dicom_series(np.zeros((16, 16, 2), np.float32), near, tmp_path / "rounded")
    assert read_image(tmp_path / "rounded").array.shape == (16, 16, 2)


def test_a_series_of_several_multiframe_files_is_refused(tmp_path):
    """Two multi-frame files of one series would be stacked as 3D arrays (a numpy error)."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    src = pydicom.dcmread(get_testdata_file("emri_small.dcm"))  # 10 frames, no functional groups
    folder = tmp_path / "mf"
    folder.mkdir()
    for i, name in enumerate(("a.dcm", "b.dcm")):
        ds = src.copy()
        ds.SOPInstanceUID = generate_uid()
        ds.ImageOrientationPatient, ds.ImagePositionPatient = [1, 0, 0, 0, 1, 0], [0, 0, 10.0 * i]
        ds.PixelSpacing = [1, 1]
        ds.save_as(folder / name)
    with pytest.raises(DataError, match="multi-frame file .*10 frames.* one series of several") as err:
        read_image(folder)
    assert err.value.path == str(folder / "a.dcm")
