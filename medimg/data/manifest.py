"""Decathlon-style datalists: load with paths relative to a dataset folder, validate up front."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from monai.data import load_decathlon_datalist

from medimg.errors import DataError
from medimg.io.image import NIFTI_SUFFIXES, has_suffix, read_image
from medimg.io.jsonfile import read_json_object

SPLITS = ("training", "validation", "test")


@dataclass
class Manifest:
    """A datalist with absolute paths.

    Attributes:
        path: the manifest file.
        dataset_dir: the folder relative paths were resolved against.
        splits: ``training``/``validation``/``test`` lists of ``{"image": ..., "label": ...}``.
        labels: label index (as string) to name, e.g. ``{"0": "background", "1": "grey_matter"}``.
        meta: every other top-level field of the manifest.
    """

    path: Path
    dataset_dir: Path
    splits: dict[str, list[dict]]
    labels: dict[str, str] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        """Number of label classes, background included."""
        return max(len(self.labels), 2)

    @property
    def class_names(self) -> list[str]:
        """Class names ordered by label index."""
        return [self.labels[k] for k in sorted(self.labels, key=int)]


def load_manifest(path: str | Path, dataset_dir: str | Path | None = None) -> Manifest:
    """Read a datalist JSON (MONAI's ``load_decathlon_datalist``) and check what it lists.

    Args:
        path: the manifest JSON.
        dataset_dir: folder the relative paths are relative to (default: the manifest's folder).

    Returns:
        The manifest with absolute paths; entries are not opened (see :func:`validate_manifest`).

    Raises:
        DataError: unreadable JSON, no training split, malformed entries, missing files.
    """
    path = Path(path)
    raw = read_json_object(path, "manifest")
    if not raw.get("training"):
        raise DataError(path, "manifest needs a non-empty 'training' list")
    base = Path(dataset_dir) if dataset_dir is not None else path.parent
    splits: dict[str, list[dict]] = {}
    for split in SPLITS:
        items = raw.get(split) or []
        if not isinstance(items, list):
            raise DataError(path, f"'{split}' must be a list of entries")
        for i, item in enumerate(items):  # a test list may name bare images, as in the Decathlon
            if not (isinstance(item, dict) and "image" in item) and not (split == "test" and isinstance(item, str)):
                raise DataError(path, f"{split}[{i}] needs an 'image' entry")
        if not items:
            splits[split] = []
            continue
        try:  # MONAI's reader joins the paths with the base folder
            resolved = load_decathlon_datalist(path, is_segmentation=True, data_list_key=split, base_dir=base)
        except (TypeError, ValueError) as exc:
            raise DataError(path, f"{split}: {exc}") from exc
        for i, entry in enumerate(resolved):
            for key in ("image", "label"):
                if key in entry and not Path(entry[key]).exists():
                    raise DataError(entry[key], f"listed in {path.name} ({split}[{i}].{key}) but missing")
        splits[split] = resolved
    meta = {k: v for k, v in raw.items() if k not in SPLITS and k != "labels"}
    labels = {str(k): str(v) for k, v in raw.get("labels", {}).items()}
    return Manifest(path, base, splits, labels, meta)


def _geometry(path: str) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape and affine, from the header alone for NIfTI (cheap), else from a full read."""
    if has_suffix(path, NIFTI_SUFFIXES):
        try:
            img = nib.load(path)
        except Exception as exc:  # noqa: BLE001 - any header failure is a data error
            raise DataError(path, f"not a readable NIfTI image ({exc})") from exc
        shape = tuple(int(s) for s in img.shape)
        while len(shape) > 3 and shape[-1] == 1:
            shape = shape[:-1]
        return shape, np.asarray(img.affine)
    img = read_image(path, spatial_dims=None)
    return tuple(img.array.shape), img.affine


def validate_manifest(manifest: Manifest, splits: tuple[str, ...] = ("training", "validation"),
                      read_data: bool = True, atol: float = 1e-3) -> None:
    """Check every listed image/label pair before training starts.

    Checks image/label shape and affine agreement; with ``read_data`` also reads every file
    (catching corrupt files, NaN intensities, wrong dimensionality) and warns about empty labels.

    Args:
        manifest: the loaded manifest.
        splits: which splits to check.
        read_data: read voxel data too, not only headers.
        atol: tolerance on affine differences, in mm.

    Raises:
        DataError: naming the first offending file.
    """
    for split in splits:
        for item in manifest.splits.get(split, []):
            image = item["image"]
            if "label" not in item:
                if read_data:
                    read_image(image, spatial_dims=None)
                continue
            ishape, iaff = _geometry(image)
            lshape, laff = _geometry(item["label"])
            if ishape != lshape:
                raise DataError(item["label"], f"label shape {lshape} does not match image shape {ishape} ({image})")
            if not np.allclose(iaff, laff, atol=atol):
                raise DataError(item["label"], f"label affine does not match the image affine ({image})")
            if read_data:
                read_image(image, spatial_dims=None)
                label = read_image(item["label"], spatial_dims=None).array
                if not np.any(label):
                    warnings.warn(f"{item['label']}: label is empty (all background)", stacklevel=2)
                declared = [int(k) for k in manifest.labels] if manifest.labels else []
                bad = np.setdiff1d(np.unique(label), declared) if declared else []
                if len(bad):
                    shown = [int(v) if float(v).is_integer() else float(v) for v in bad]
                    raise DataError(item["label"], f"label values {shown} are not among the "
                                                   f"{len(declared)} labels the manifest declares")


def train_val_split(manifest: Manifest, val_fraction: float | None = None,
                    seed: int = 0) -> tuple[list[dict], list[dict], str]:
    """The training and validation items, and which split validates.

    The manifest's own ``validation`` list is used when it has one. Otherwise ``val_fraction`` of
    the training *subjects* are held out (entries sharing a ``subject`` field stay together; without
    one, each image is its own subject). Training never silently validates on its own data.

    Args:
        manifest: the loaded manifest.
        val_fraction: share of subjects to hold out when the manifest has no validation split.
        seed: seed of that draw.

    Returns:
        ``(training, validation, split)``; ``split`` names the validation source for metrics.json.

    Raises:
        ConfigError: no validation split and no (usable) ``val_fraction``.
    """
    from medimg.errors import ConfigError

    if manifest.splits.get("validation"):
        return manifest.splits["training"], manifest.splits["validation"], "manifest validation split"
    if not val_fraction:
        raise ConfigError(manifest.path, "has no 'validation' split; add one, or set data.val_fraction "
                                         "(e.g. 0.2) to hold out a share of the training subjects")
    if not 0.0 < float(val_fraction) < 1.0:
        raise ConfigError("data.val_fraction", f"must lie between 0 and 1, not {val_fraction}")
    items = manifest.splits["training"]
    subjects = sorted({str(item.get("subject", item["image"])) for item in items})
    if len(subjects) < 2:
        raise ConfigError(manifest.path, "has one training subject and no 'validation' split: "
                                         "nothing can be held out for validation")
    rng = np.random.default_rng(seed)
    n_val = min(max(1, round(len(subjects) * float(val_fraction))), len(subjects) - 1)
    held = {subjects[i] for i in rng.permutation(len(subjects))[:n_val]}
    train = [it for it in items if str(it.get("subject", it["image"])) not in held]
    val = [it for it in items if str(it.get("subject", it["image"])) in held]
    return train, val, f"held-out subjects (val_fraction={val_fraction}, seed={seed}): {n_val} of {len(subjects)}"
