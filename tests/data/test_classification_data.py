"""Classification data: CSV manifests, MedMNIST files, the MNI152 level task, preprocessing, metrics."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from medimg.data.classification import ClassificationDataset, ClassifyPreprocess, read_csv_manifest, read_medmnist
from medimg.errors import DataError
from medimg.models import build_network
from medimg.tasks.classification import ClassificationTask, knn_predict


def _img(path, array):
    nib.save(nib.Nifti1Image(np.asarray(array, dtype=np.float32), np.eye(4)), str(path))
    return path.name


def test_csv_multiclass_with_names_and_multilabel(tmp_path):
    for i in range(4):
        _img(tmp_path / f"i{i}.nii.gz", np.random.rand(20, 16))
    (tmp_path / "cls.csv").write_text("image,split,label\ni0.nii.gz,training,cat\ni1.nii.gz,training,dog\n"
                                      "i2.nii.gz,validation,dog\ni3.nii.gz,test,cat\n")
    splits = read_csv_manifest(tmp_path / "cls.csv")
    assert splits["training"].class_names == ["cat", "dog"] and list(splits["training"].labels) == [0, 1]
    assert list(splits["validation"].labels) == [1] and len(splits["test"]) == 1
    assert not splits["training"].multilabel
    (tmp_path / "ml.csv").write_text("image,effusion,nodule\n" + "".join(f"i{i}.nii.gz,{i % 2},{i // 2}\n"
                                                                           for i in range(4)) * 2)
    ml = read_csv_manifest(tmp_path / "ml.csv")
    assert ml["training"].multilabel and ml["training"].class_names == ["effusion", "nodule"]
    assert ml["training"].labels.shape == (7, 2) and len(ml["validation"]) == 1  # every 5th row validates


@pytest.mark.parametrize(("text", "message"), [
    ("path,label\na.nii.gz,0\n", "no 'image' column"),
    ("image,label\nmissing.nii.gz,0\n", "does not exist"),
    ("image,a,b\nok.nii.gz,0,2\n", "0/1"),
    ("image,split,label\nok.nii.gz,train,0\n", "unknown split"),
])
def test_bad_csv_names_the_file_and_the_problem(tmp_path, text, message):
    _img(tmp_path / "ok.nii.gz", np.zeros((8, 8)))
    (tmp_path / "bad.csv").write_text(text)
    with pytest.raises(DataError, match=message) as err:
        read_csv_manifest(tmp_path / "bad.csv")
    assert "bad.csv" in str(err.value)


def test_medmnist_npz(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "pathmnist.npz", train_images=rng.integers(0, 255, (10, 28, 28, 3), dtype=np.uint8),
             train_labels=rng.integers(0, 9, (10, 1)), val_images=rng.integers(0, 255, (4, 28, 28, 3), dtype=np.uint8),
             val_labels=np.array([[8], [0], [1], [2]]), test_images=np.zeros((2, 28, 28, 3), np.uint8),
             test_labels=np.zeros((2, 1)))
    splits = read_medmnist(tmp_path / "pathmnist.npz")
    assert len(splits["training"]) == 10 and len(splits["test"]) == 2
    assert len(splits["training"].class_names) == len(splits["validation"].class_names) == 9
    x = ClassifyPreprocess(32, 1)(splits["training"].images[0])
    assert x.shape == (1, 32, 32)
    np.savez(tmp_path / "chestmnist.npz", train_images=np.zeros((5, 28, 28), np.uint8),
             train_labels=np.eye(14)[:5].astype(np.uint8), val_images=np.zeros((2, 28, 28), np.uint8),
             val_labels=np.eye(14)[:2].astype(np.uint8))
    chest = read_medmnist(tmp_path / "chestmnist.npz")
    assert chest["training"].multilabel and chest["training"].labels.shape == (5, 14)
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(DataError, match="not a MedMNIST file"):
        read_medmnist(tmp_path / "other.npz")


def test_preprocess_channel_rules(tmp_path):
    from medimg.data.classification import _to_channels

    slab = np.stack([np.full((10, 6), k, np.float32) for k in (0.0, 1.0, 2.0, 3.0, 4.0)], -1)  # 5 slices
    assert _to_channels(slab, 3, False, "s")[:, 0, 0].tolist() == [1.0, 2.0, 3.0]  # the centre 3 slices
    assert _to_channels(slab, 1, False, "s")[:, 0, 0].tolist() == [2.0]  # the centre slice
    rgb = np.stack([np.full((4, 4), v, np.float32) for v in (0.0, 3.0, 6.0)], -1)
    assert _to_channels(rgb, 1, True, "p")[:, 0, 0].tolist() == [3.0]  # a picture: the mean
    assert _to_channels(np.ones((4, 4)), 3, False, "g").shape == (3, 4, 4)  # a 2D image: repeated
    with pytest.raises(DataError, match="has 2 channels"):
        _to_channels(np.ones((4, 4, 2)), 3, False, "two.nii.gz")
    ramp = np.linspace(0, 1, 10, dtype=np.float32)[:, None].repeat(6, 1)
    _img(tmp_path / "slab.nii.gz", np.stack([ramp + k for k in (0.0, 1.0, 2.0)], -1))
    x3 = ClassifyPreprocess(16, 3, "none")(tmp_path / "slab.nii.gz")
    assert x3.shape == (3, 16, 16) and float(x3[2, 8, 8]) > float(x3[1, 8, 8]) > float(x3[0, 8, 8])
    # a 10 x 6 (i, j) image is 6 rows of 10 columns, padded to a square before resizing: the padded rows are zero
    assert float(x3[2, 0, 8]) == 0.0 and float(x3[2, 8, 0]) > 0.0
    norm = ClassifyPreprocess(16, 1)(np.random.rand(16, 16).astype(np.float32))  # no resize
    assert float(norm.min()) == pytest.approx((0 - 0.449) / 0.226, abs=1e-4)


def test_one_picture_as_png_nifti_or_in_memory_reaches_the_network_the_same(tmp_path):
    """A horizontal bar stays horizontal: PNG (rows, columns) and NIfTI (i, j) = (column, row) agree."""
    import SimpleITK as sitk
    from PIL import Image as PILImage

    from medimg.io.image import read_image

    picture = np.zeros((40, 60), np.uint8)
    picture[5:15, 10:50] = 200  # a horizontal bar: rows 5-15
    PILImage.fromarray(picture).save(tmp_path / "bar.png")
    sitk.WriteImage(sitk.ReadImage(str(tmp_path / "bar.png")), str(tmp_path / "bar.nii.gz"))  # the usual conversion
    assert read_image(tmp_path / "bar.nii.gz", spatial_dims=None).array.shape[:2] == (60, 40)  # (column, row)
    pp = ClassifyPreprocess(32, 1, "none")
    png, nii = pp(tmp_path / "bar.png"), pp(tmp_path / "bar.nii.gz")
    torch.testing.assert_close(nii, png, atol=1e-4, rtol=0)
    torch.testing.assert_close(pp(picture), png, atol=1e-4, rtol=0)  # a MedMNIST-style array: picture order
    rows, cols = png[0].amax(1), png[0].amax(0)  # the bar spans most columns and few rows
    assert int((cols > 0.5).sum()) > 2 * int((rows > 0.5).sum()) > 0
    from medimg.predictors.classification import ClassificationPredictor

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(32 * 32, 2))
    predictor = ClassificationPredictor(net, pp, ["a", "b"])
    by_file = predictor.predict([tmp_path / "bar.png", tmp_path / "bar.nii.gz"])
    in_memory = predictor.predict([sitk.ReadImage(str(tmp_path / "bar.nii.gz")), picture])  # bare: as in training
    in_memory.append(predictor.predict(picture.T.astype(np.float32), affine=np.eye(4)))  # with geometry: (i, j)
    for probs in (by_file[1], *in_memory):
        assert probs == pytest.approx(by_file[0], abs=1e-5)


def test_augmented_dataset_keeps_labels_and_range(tmp_path):
    from medimg.data.classification import LabelledImages

    data = LabelledImages([np.random.rand(20, 20).astype(np.float32) for _ in range(3)], np.array([0, 1, 2]))
    ds = ClassificationDataset(data, ClassifyPreprocess(32, 1, "none"), augment=True, randaug=9)
    item = ds[2]
    assert item["image"].shape == (1, 32, 32) and int(item["label"]) == 2
    assert 0.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0


def test_mni_level_task_is_real_and_split_by_brain_half(_data_root):
    from medimg.data.embedded.mni_slices import CLASS_ORDER, prepare_mni152_levels

    csv = prepare_mni152_levels(_data_root / "levels")
    splits = read_csv_manifest(csv, class_names=CLASS_ORDER["mni152_levels"])
    assert [len(splits[s]) for s in ("training", "validation")] == [120, 120]
    assert np.bincount(splits["validation"].labels).tolist() == [30, 30, 30, 30]
    train = nib.load(str(splits["training"].images[0]))
    val = nib.load(str(splits["validation"].images[0]))
    assert train.shape[2] == 3 and val.shape[2] == 3
    y_train = train.affine[1, 3] + train.affine[1, 1] * np.arange(train.shape[1])
    y_val = val.affine[1, 3] + val.affine[1, 1] * np.arange(val.shape[1])
    assert y_train.min() >= -20.0 and y_val.max() <= -28.0  # disjoint halves of the brain
    assert float(np.asarray(train.dataobj).std()) > 0


def test_knn_and_metrics():
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = torch.tensor([0, 0, 1, 1])
    scores = knn_predict(bank, labels, torch.tensor([[1.0, 0.05], [0.05, 1.0]]), 2, k=3)
    assert scores.argmax(1).tolist() == [0, 1] and torch.allclose(scores.sum(1), torch.ones(2))
    net = build_network("vit_cls", backbone="mae", size="tiny", img_size=32, num_classes=3)
    task = ClassificationTask(net, 3)
    target = torch.tensor([0, 1, 2, 2, 1, 0])

    def score(probs: torch.Tensor) -> dict:
        task.val_metrics.reset()
        task.val_metrics.update(probs, target)
        return {k.removeprefix("val/"): float(v) for k, v in task.val_metrics.compute().items()}

    perfect = score(torch.nn.functional.one_hot(target, 3).float())
    assert set(perfect) == {"auroc", "accuracy", "f1", "kappa"}
    assert all(v == pytest.approx(1.0) for v in perfect.values())
    off_by_one = score(torch.nn.functional.one_hot((target + 1).clamp(max=2), 3).float())
    off_by_two = score(torch.nn.functional.one_hot(2 - target, 3).float())
    assert off_by_two["kappa"] < off_by_one["kappa"] < 1.0  # quadratic weights: far misses cost more
    assert off_by_one["accuracy"] == pytest.approx(2 / 6)
    # two batches accumulate like one (the states torchmetrics syncs across DDP processes)
    task.val_metrics.reset()
    onehot = torch.nn.functional.one_hot((target + 1).clamp(max=2), 3).float()
    task.val_metrics.update(onehot[:3], target[:3])
    task.val_metrics.update(onehot[3:], target[3:])
    assert float(task.val_metrics.compute()["val/kappa"]) == pytest.approx(off_by_one["kappa"])


def test_predict_takes_an_array_as_training_does_pictures_and_rgb():
    """``predict(array)`` feeds the network what training fed it for the same array (MedMNIST: picture order)."""
    from medimg.predictors.classification import ClassificationPredictor

    seen = []

    class Record(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            seen.append(x.clone())
            return torch.zeros(len(x), 2) + self.w

    picture = np.zeros((40, 60), np.uint8)
    picture[5:10, 5:50] = 255  # not symmetric, not square
    rgb = np.random.default_rng(0).integers(0, 255, (28, 28, 3)).astype(np.uint8)
    for array in (picture, rgb):
        pp = ClassifyPreprocess(32, 1, "none")
        ClassificationPredictor(Record(), pp, ["a", "b"]).predict(array)
        torch.testing.assert_close(seen.pop()[0], pp(array))  # training's ClassifyPreprocess(array)
    with pytest.raises(DataError, match="NaN"):
        ClassificationPredictor(Record(), ClassifyPreprocess(8, 1), ["a", "b"]).predict(np.full((8, 8), np.nan))
