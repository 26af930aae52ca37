"""2D / 2.5D classification data: CSV manifests, MedMNIST ``.npz`` files, and their preprocessing.

**CSV manifest** (one row per image)::

    image,split,label                 # multi-class: one label column (integers or names)
    scans/a.nii.gz,training,2
    image,split,effusion,nodule,...   # multi-label: several 0/1 columns

``image`` paths are relative to the CSV's folder (or ``dataset_dir``). ``split`` is
``training`` / ``validation`` / ``test``; without it, every 5th row validates. A CSV with only
``image`` (and ``split``) is unlabelled (MAE pre-training).

**Images**: NIfTI / NRRD / MHA / DICOM files, PNG / JPEG, or arrays (MedMNIST). A 2D image is one
channel; a 3D image with ``k`` slices is a slab whose centre ``in_chans`` slices become the
channels (2.5D: neighbouring slices as channels); an RGB picture has 3 channels. Channels are
repeated (1 -> 3) or reduced to the centre slice / the mean (3 -> 1) to fit the network.

**Orientation**: the network sees every image in picture order, (rows, columns) as a viewer shows
it: PNG / JPEG and bare arrays (MedMNIST; the same at training and in a predictor's ``predict``) as
they are, and a medical image file or in-memory image (an array with an affine included), whose
array is in medimg's index order (i, j) = (column, row), transposed by :func:`load_image_array`
(the one place that does it). One picture saved as PNG and as NIfTI (SimpleITK's usual
conversion) gives the same tensor; a DICOM radiograph reaches the network as a DICOM viewer
shows it, the orientation ImageNet-pretrained backbones were trained in.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from monai.data import DataLoader

from medimg.errors import ConfigError, DataError
from medimg.io.headers import scalar_float32
from medimg.io.image import Image, read_image

PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
SPLITS = ("training", "validation", "test")
IMAGENET_GREY = (0.449, 0.226)  # the mean of ImageNet's channel means / stds, for one channel
IMAGENET_RGB = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclass
class LabelledImages:
    """Images with labels.

    Attributes:
        images: paths, or arrays (H, W) / (H, W, C).
        labels: (N,) class indices (multi-class), (N, K) 0/1 (multi-label), or ``None`` (unlabelled).
        class_names: one name per class / label.
        multilabel: several independent labels per image.
    """

    images: list
    labels: np.ndarray | None
    class_names: list[str] = field(default_factory=list)
    multilabel: bool = False

    def __len__(self) -> int:
        return len(self.images)


def _to_channels(array: np.ndarray, in_chans: int, picture: bool, source: object) -> np.ndarray:
    """(C, H, W) float32 from a 2D image, a slab (H, W, k) or a picture (H, W, 3)."""
    a = np.asarray(array, dtype=np.float32)
    if a.ndim == 2:
        a = a[None]
    elif a.ndim == 3:
        a = np.moveaxis(a, -1, 0)
    else:
        raise DataError(source, f"has shape {tuple(array.shape)}; expected a 2D image, a slab or an RGB picture")
    k = a.shape[0]
    if k == in_chans:
        return a
    if k == 1:
        return np.repeat(a, in_chans, axis=0)
    if picture and in_chans == 1:
        return a[:3].mean(0, keepdims=True)
    if k > in_chans:  # slab: the centre in_chans slices
        lo = (k - in_chans) // 2
        return a[lo:lo + in_chans]
    raise DataError(source, f"has {k} channels/slices; the network takes {in_chans}")


def load_image_array(source: str | Path | Image) -> tuple[np.ndarray, bool]:
    """An image in picture order (rows, columns[, slices or RGB]), and whether it is a picture (PNG/JPEG).

    Pictures come as PIL reads them. Medical image files (and the medimg ``Image``
    of an in-memory input) are stored in index order (i, j[, k]) = (column, row[, slice]): their
    first two axes are swapped, so one image reaches the network the same whatever its format.
    """
    if isinstance(source, Image):
        return np.swapaxes(source.array, 0, 1), False
    path = Path(source)
    if path.suffix.lower() in PICTURE_SUFFIXES:
        from PIL import Image as PILImage

        if not path.is_file():
            raise DataError(path, "no such file")
        try:
            with PILImage.open(path) as pic:
                return np.asarray(pic.convert("RGB" if pic.mode in ("RGB", "RGBA", "P") else "F")), True
        except OSError as exc:
            raise DataError(path, f"cannot read picture ({exc})") from exc
    return load_image_array(read_image(path, spatial_dims=None))


class ClassifyPreprocess:
    """Image (path or array) -> normalised (C, S, S) tensor: the same at training and in bundles.

    Steps: channels (see module doc); intensities to [0, 1] by the 0.5 / 99.5 percentiles of the
    image; zero-padding to a square; bilinear resize to ``img_size``; ImageNet standardisation (the
    statistics MAE and DINOv2 were trained with) unless ``normalize="none"``.

    Args:
        img_size: output side.
        in_chans: output channels.
        normalize: ``imagenet`` or ``none``.
    """

    def __init__(self, img_size: int, in_chans: int = 1, normalize: str = "imagenet") -> None:
        if normalize not in ("imagenet", "none"):
            raise ConfigError("data.normalize", f"unknown normalisation {normalize!r}; choose imagenet or none")
        self.img_size, self.in_chans, self.normalize = int(img_size), int(in_chans), normalize

    def __call__(self, image: str | Path | Image | np.ndarray) -> torch.Tensor:
        """Preprocess one image: a file, a read :class:`~medimg.io.image.Image`, or an array in picture order."""
        return self.standardise(self.unit(image))

    def unit(self, image: str | Path | Image | np.ndarray) -> torch.Tensor:
        """Every step but the standardisation: (C, S, S) in [0, 1] (augmentations work on this)."""
        if isinstance(image, (str, Path, Image)):
            array, picture = load_image_array(image)
            source: object = image.path if isinstance(image, Image) else image
        else:
            array, source = scalar_float32("array", np.asarray(image)), "array"
            if np.isnan(array).any():
                raise DataError(source, f"contains {int(np.isnan(array).sum())} NaN intensities")
            picture = array.ndim == 3 and array.shape[-1] == 3
        x = _to_channels(array, self.in_chans, picture, source)
        lo, hi = np.percentile(x, [0.5, 99.5])
        x = np.clip((x - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
        t = torch.from_numpy(np.ascontiguousarray(x))
        h, w = t.shape[1:]
        side = max(h, w)
        t = F.pad(t, ((side - w) // 2, side - w - (side - w) // 2, (side - h) // 2, side - h - (side - h) // 2))
        return F.interpolate(t[None], size=(self.img_size, self.img_size), mode="bilinear", antialias=True,
                             align_corners=False)[0].float()

    def standardise(self, t: torch.Tensor) -> torch.Tensor:
        """ImageNet standardisation of a [0, 1] image (identity with ``normalize="none"``)."""
        if self.normalize == "none":
            return t
        if self.in_chans == 3:
            mean, std = (torch.tensor(v).view(3, 1, 1) for v in IMAGENET_RGB)
        else:
            mean, std = IMAGENET_GREY
        return ((t - mean) / std).float()


def read_csv_manifest(path: str | Path, dataset_dir: str | Path | None = None,
                      label_columns: Sequence[str] | None = None,
                      class_names: Sequence[str] | None = None) -> dict[str, LabelledImages]:
    """Read a classification CSV into splits.

    Args:
        path: the CSV file.
        dataset_dir: folder the image paths refer to (default: the CSV's folder).
        label_columns: the label columns (default: every column but ``image`` and ``split``).
        class_names: for one label column, the class order (default: sorted integers, else sorted names).

    Returns:
        ``{"training": ..., "validation": ...}`` (and ``test`` when present).

    Raises:
        DataError: missing file or column, missing image, bad label value.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "no such CSV manifest")
    root = Path(dataset_dir) if dataset_dir else path.parent
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
        header = reader.fieldnames or []
    if "image" not in header:
        raise DataError(path, f"has no 'image' column (columns: {', '.join(header) or 'none'})")
    if not rows:
        raise DataError(path, "has no rows")
    cols = list(label_columns) if label_columns else [c for c in header if c not in ("image", "split")]
    for c in cols:
        if c not in header:
            raise DataError(path, f"has no label column {c!r}")
    splits: dict[str, list[int]] = {s: [] for s in SPLITS}
    images = [root / r["image"].strip() for r in rows]
    for i, (row, image) in enumerate(zip(rows, images, strict=True)):
        split = (row.get("split") or "").strip() or ("validation" if i % 5 == 4 else "training")
        if split not in SPLITS:
            raise DataError(path, f"row {i + 2}: unknown split {split!r}; use {', '.join(SPLITS)}")
        if not image.exists():
            raise DataError(path, f"row {i + 2}: image {image} does not exist")
        splits[split].append(i)
    labels, names, multilabel = _csv_labels(path, rows, cols, class_names)
    out = {}
    for split, idx in splits.items():
        if idx:
            out[split] = LabelledImages([images[i] for i in idx], None if labels is None else labels[idx],
                                        names, multilabel)
    if "training" not in out:
        raise DataError(path, "has no training rows")
    return out


def _csv_labels(path: Path, rows: list[dict], cols: list[str], class_names: Sequence[str] | None
                ) -> tuple[np.ndarray | None, list[str], bool]:
    if not cols:
        return None, [], False
    if len(cols) > 1:
        try:
            values = np.array([[float(r[c]) for c in cols] for r in rows], dtype=np.float32)
        except ValueError as exc:
            raise DataError(path, f"multi-label columns must hold 0/1 ({exc})") from exc
        if not np.isin(values, (0.0, 1.0)).all():
            raise DataError(path, "multi-label columns must hold 0/1")
        return values, cols, True
    raw = [r[cols[0]].strip() for r in rows]
    if class_names:
        names = [str(n) for n in class_names]
    elif all(v.lstrip("-").isdigit() for v in raw):
        return np.array([int(v) for v in raw], dtype=np.int64), [str(c) for c in range(max(map(int, raw)) + 1)], False
    else:
        names = sorted(set(raw))
    bad = sorted(set(raw) - set(names))
    if bad:
        raise DataError(path, f"label {bad[0]!r} is not one of the classes {names}")
    return np.array([names.index(v) for v in raw], dtype=np.int64), names, False


def read_medmnist(path: str | Path, class_names: Sequence[str] | None = None) -> dict[str, LabelledImages]:
    """A MedMNIST ``.npz`` (``{train,val,test}_images`` / ``_labels``) the user downloaded.

    Labels of shape (N, 1) are multi-class; (N, K) with K > 1 multi-label (ChestMNIST).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "no such MedMNIST .npz file")
    try:
        data = np.load(path)
    except (OSError, ValueError) as exc:
        raise DataError(path, f"cannot read .npz ({exc})") from exc
    found = {}
    for split, key in (("training", "train"), ("validation", "val"), ("test", "test")):
        if f"{key}_images" in data.files:
            labels = data[f"{key}_labels"]
            found[split] = (data[f"{key}_images"], labels[:, None] if labels.ndim == 1 else labels)
    if "training" not in found:
        raise DataError(path, "holds no train_images / train_labels: not a MedMNIST file")
    if "validation" not in found:
        raise DataError(path, "holds no val_images / val_labels")
    multilabel = found["training"][1].shape[1] > 1
    n = found["training"][1].shape[1] if multilabel else max(int(lab.max()) for _, lab in found.values()) + 1
    names = list(class_names) if class_names else [f"class{i}" for i in range(n)]
    return {split: LabelledImages(list(images), labels.astype(np.float32) if multilabel
                                  else labels[:, 0].astype(np.int64), names, multilabel)
            for split, (images, labels) in found.items()}


class ClassificationDataset(torch.utils.data.Dataset):
    """Preprocessed images (cached in memory) with the fine-tuning augmentations.

    Training augmentation (the thorax-MAE recipe): random resized crop (scale 0.5-1.0), horizontal
    flip and, with ``randaug > 0``, RandAugment of that magnitude.

    Items: ``image`` (C, S, S) normalised, ``label`` (class index, or K floats; -1 when unlabelled),
    ``index``. ``cache`` passes another dataset's preprocessed images (same ``data``) instead of
    reading them again.
    """

    def __init__(self, data: LabelledImages, preprocess: ClassifyPreprocess, augment: bool = False,
                 crop_scale: tuple[float, float] = (0.5, 1.0), randaug: int = 0, hflip: bool = True,
                 cache: list[torch.Tensor] | None = None) -> None:
        from torchvision.transforms import v2

        self.data, self.preprocess, self.augment = data, preprocess, augment
        # [0, 1] images (standardised after augmentation); another dataset over the same images can share them
        self.cache = cache if cache is not None else [preprocess.unit(item) for item in data.images]
        ops = [v2.RandomResizedCrop(preprocess.img_size, scale=tuple(crop_scale), antialias=True)]
        if hflip:
            ops.append(v2.RandomHorizontalFlip())
        self.spatial = v2.Compose(ops)
        self.randaug = v2.RandAugment(num_ops=2, magnitude=int(randaug)) if randaug else None

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        x = self.cache[i]
        if self.augment:
            x = self.spatial(x)
            if self.randaug is not None:
                x = self.randaug((x * 255).round().to(torch.uint8)).float() / 255
        labels = self.data.labels
        label = torch.tensor(-1) if labels is None else torch.as_tensor(labels[i])
        return {"image": self.preprocess.standardise(x), "label": label, "index": i}


class ClassificationDataModule(L.LightningDataModule):
    """2D / 2.5D images with class labels (or none, for MAE) from an embedded set, a CSV or a MedMNIST npz.

    Args:
        splits: ``{"training": LabelledImages, "validation": ...}``.
        img_size: network input side.
        in_chans: network input channels.
        normalize: ``imagenet`` or ``none``.
        batch_size: training batch size.
        crop_scale: random-resized-crop scale range.
        randaug: RandAugment magnitude (0: off).
        num_workers: loader workers.
    """

    def __init__(self, splits: dict, img_size: int, in_chans: int = 1, normalize: str = "imagenet",
                 batch_size: int = 16, crop_scale: tuple[float, float] = (0.5, 1.0), randaug: int = 0,
                 num_workers: int = 0) -> None:
        super().__init__()
        from medimg.data.classification import ClassifyPreprocess

        if "validation" not in splits:
            raise ConfigError("data", "the classification data has no validation split")
        self.splits = splits
        self.preprocess = ClassifyPreprocess(img_size, in_chans, normalize)
        self.batch_size, self.crop_scale, self.randaug = batch_size, tuple(crop_scale), randaug
        self.num_workers = num_workers
        self.train_set = self.val_set = self.feature_set = None

    def setup(self, stage: str | None = None) -> None:
        """Load and preprocess the images once."""
        from medimg.data.classification import ClassificationDataset

        if self.train_set is None:
            train = self.splits["training"]
            self.train_set = ClassificationDataset(train, self.preprocess, augment=True, crop_scale=self.crop_scale,
                                                   randaug=self.randaug)
            self.feature_set = ClassificationDataset(train, self.preprocess, augment=False,
                                                     cache=self.train_set.cache)
            self.val_set = ClassificationDataset(self.splits["validation"], self.preprocess, augment=False)

    def _loader(self, dataset: Any, shuffle: bool, batch_size: int) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, drop_last=shuffle and len(dataset) > batch_size)

    def train_dataloader(self) -> DataLoader:
        """Augmented, shuffled training images."""
        return self._loader(self.train_set, True, self.batch_size)

    def val_dataloader(self) -> DataLoader:
        """Validation images in a fixed order."""
        return self._loader(self.val_set, False, 64)

    def knn_dataloader(self) -> DataLoader:
        """Training images without augmentation (the kNN memory bank)."""
        return self._loader(self.feature_set, False, 64)
