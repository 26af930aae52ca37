"""Named, reusable MONAI dictionary-transform pipelines, defined once as bundle-config specs.

A pipeline is a list of MONAI bundle component dicts (``{"_target_": "Spacingd", ...}``).
Training instantiates it with :func:`build_pipeline`; export writes the very same list into the
bundle's ``inference.json``, so a bundle preprocesses exactly as training did.

Every deterministic step (orientation, spacing, intensity, foreground crop) is invertible, so
``Invertd`` maps a prediction made in the model's space back onto the input's exact grid.

Intensity presets: CT windows ``ct_abdomen``, ``ct_lung``, ``ct_bone``, ``ct_brain`` (clip to the
window, scale to [0, 1]); ``mr`` (0.5-99.5 percentile scaling to [0, 1]); ``none``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.transforms import Compose, MapTransform, RandomizableTransform

from medimg.data.augment import GEN_KEY, augmentation_spec, check_preset, synth_labels_spec
from medimg.data.slicing import CT_WINDOWS, INTENSITY_PRESETS
from medimg.errors import ConfigError

ORIENTATION_LABELS = [["L", "R"], ["P", "A"], ["I", "S"]]
IGNORE_LABEL = 255  # label value that no loss or metric counts (outside a region split's own region)

Spec = list[dict[str, Any]]


def intensity_spec(preset: str, key: str = "image") -> Spec:
    """The intensity-normalisation step of a preset.

    Args:
        preset: one of :data:`INTENSITY_PRESETS`.
        key: the image key.
    """
    if preset in CT_WINDOWS:
        level, width = CT_WINDOWS[preset]
        return [{"_target_": "ScaleIntensityRanged", "keys": key, "a_min": level - width / 2,
                 "a_max": level + width / 2, "b_min": 0.0, "b_max": 1.0, "clip": True}]
    if preset == "mr":
        return [{"_target_": "ScaleIntensityRangePercentilesd", "keys": key, "lower": 0.5, "upper": 99.5,
                 "b_min": 0.0, "b_max": 1.0, "clip": True, "relative": False}]
    if preset == "none":
        return []
    raise ConfigError("data.intensity", f"unknown preset {preset!r}; choose from {', '.join(INTENSITY_PRESETS)}")


def geometry_spec(keys: Sequence[str], pixdim: Sequence[float] | None, label_key: str | None = "label",
                  spatial_dims: int = 3, axcodes: str = "RAS") -> Spec:
    """Load (medimg reader), add the channel axis, reorient, resample.

    Args:
        keys: image and label keys.
        pixdim: target voxel size in mm, or ``None`` to keep native spacing.
        label_key: which key is a label (nearest-neighbour resampling).
        spatial_dims: 2 or 3.
        axcodes: target orientation.
    """
    keys = list(keys)
    spec: Spec = [
        {"_target_": "LoadImaged", "keys": keys, "image_only": True,
         "reader": {"_target_": "medimg.io.reader.MedimgReader", "spatial_dims": spatial_dims}},
        {"_target_": "EnsureChannelFirstd", "keys": keys, "channel_dim": "no_channel"},
        {"_target_": "Orientationd", "keys": keys, "axcodes": axcodes[:spatial_dims],
         "labels": ORIENTATION_LABELS},
    ]
    if pixdim is not None:
        spec.append({"_target_": "Spacingd", "keys": keys, "pixdim": [float(p) for p in pixdim],
                     "mode": ["nearest" if k == label_key else "bilinear" for k in keys]})
    return spec


CLASS_INDICES_POSTFIX = "_cls_indices"


def segmentation_spec(stage: str, pixdim: Sequence[float] | None = (2.0, 2.0, 2.0), intensity: str = "mr",
                      roi_size: Sequence[int] = (64, 64, 64), num_samples: int = 2, num_classes: int = 3,
                      crop_foreground: bool = True, augment: bool | str = True, spatial_dims: int = 3,
                      slice_axis: int | None = None, lr_swap: Sequence[Sequence[int]] | None = None,
                      region: dict | None = None, synth: dict | None = None) -> Spec:
    """The segmentation pipeline for one stage, as a bundle-config list.

    Args:
        stage: ``train`` (random label-balanced crops), ``val`` (whole volume with label) or
            ``infer`` (whole volume, image only; invertible for ``Invertd``).
        pixdim: target spacing in mm (``None`` keeps native spacing).
        intensity: intensity preset name.
        roi_size: training crop size (also the sliding-window size).
        num_samples: crops per volume per step.
        num_classes: classes including background (for class-balanced cropping).
        crop_foreground: crop to the image's non-zero bounding box first.
        augment: a preset of :mod:`medimg.data.augment` (``light``, ``strong``, ``synth``) applied
            after random label-balanced crops and flips in ``train``; ``none`` (or False) is a
            deterministic centre crop (used to compare DDP with a single process exactly); True
            means ``light``.
        spatial_dims: 2 or 3.
        slice_axis: for 2D networks on volumes: training crops are one slice thick along this
            spatial axis (give ``roi_size`` with 1 there) and lose that axis; ``val``/``infer`` keep
            whole volumes (a slice inferer runs the network slice by slice).
        lr_swap: the manifest's declaration of sided labels: pairs ``[left, right]`` of label values
            that trade places under a left-right flip (``[]``: no label has a side). ``None`` (not
            declared): no left-right flips at all, since a flip would corrupt a sided label.
        region: ``{"axis": RAS axis, "range": [lo, hi]}`` (mm, ``None`` ends open): labels outside
            the range become :data:`IGNORE_LABEL` (``train``: no loss there; ``val``: no metric), so
            training and validation share whole volumes with disjoint regions (``data.region_split``).
        synth: options of the ``synth`` preset's generator (``data.synth``; see
            :func:`~medimg.data.augment.augmentation_spec`).
    """
    if stage not in ("train", "val", "infer"):
        raise ConfigError("stage", f"unknown stage {stage!r}; choose train, val or infer")
    keys = ["image"] if stage == "infer" else ["image", "label"]
    preset = check_preset(augment) if stage == "train" else "none"
    work = keys + ([GEN_KEY] if preset == "synth" else [])  # synth carries its generation labels until it runs
    roi = [int(r) for r in roi_size]
    spec = geometry_spec(keys, pixdim, spatial_dims=spatial_dims)
    if stage == "val":  # the label as stored: validation measures on the input's own grid
        spec.insert(2, {"_target_": "CopyItemsd", "keys": "label", "names": "native_label"})
    if region is not None and stage != "infer":
        spec.append({"_target_": "medimg.data.transforms.RegionLabeld",
                     "keys": ["label", "native_label"] if stage == "val" else "label",
                     "axis": int(region["axis"]), "range_mm": list(region["range"])})
    spec += intensity_spec(intensity)
    spec += synth_labels_spec(preset, num_classes)
    if crop_foreground:
        source = GEN_KEY if preset == "synth" else "image"  # synth keeps the generated head around the anatomy
        # synth: a margin of air beyond the generated head, where its clutter (a neck, a face) can appear
        margin = 16 if preset == "synth" else 0
        spec.append({"_target_": "CropForegroundd", "keys": work, "source_key": source, "allow_smaller": True,
                     **({"margin": margin} if margin else {})})
    if stage == "train":
        spec.append({"_target_": "SpatialPadd", "keys": work, "spatial_size": roi})
        if preset != "none":
            spec += [
                # the class indices are deterministic: computed once, cached with the volume (CacheDataset),
                # instead of a scan of the whole label map on every draw
                {"_target_": "ClassesToIndicesd", "keys": "label", "num_classes": int(num_classes),
                 "indices_postfix": CLASS_INDICES_POSTFIX},
                {"_target_": "RandCropByLabelClassesd", "keys": work, "label_key": "label", "spatial_size": roi,
                 "num_classes": int(num_classes), "num_samples": int(num_samples),
                 "indices_key": "label" + CLASS_INDICES_POSTFIX},
                {"_target_": "DeleteItemsd", "keys": "label" + CLASS_INDICES_POSTFIX},
            ]
            if lr_swap is not None:  # RAS axis 0 is left-right
                spec.append({"_target_": "medimg.data.transforms.RandLeftRightFlipd", "keys": work,
                             "label_key": "label", "swap": [[int(a), int(b)] for a, b in lr_swap], "prob": 0.5})
        else:
            spec.append({"_target_": "CenterSpatialCropd", "keys": work, "roi_size": roi})
        if slice_axis is not None:
            spec.append({"_target_": "SqueezeDimd", "keys": work, "dim": int(slice_axis) + 1})
        spec += augmentation_spec(preset, work, 2 if slice_axis is not None else spatial_dims, num_classes, synth)
    spec.append({"_target_": "EnsureTyped", "keys": keys, "track_meta": stage != "train"})
    return spec


def build_pipeline(spec: Spec) -> Compose:
    """Instantiate a spec list into a MONAI ``Compose`` (the same way a bundle does)."""
    parser = ConfigParser({"pipeline": {"_target_": "Compose", "transforms": spec}})
    return parser.get_parsed_content("pipeline", instantiate=True)


class RandLeftRightFlipd(RandomizableTransform, MapTransform):
    """Flip along the left-right axis (axis 0 of RAS data) and swap sided labels with it.

    ``kidney_left`` seen in a mirrored image is a right kidney: each pair in ``swap`` trades label
    values in the same random draw that flips the image, so labels stay anatomically true.

    Args:
        keys: image and label keys (channel-first arrays).
        label_key: which key holds labels.
        swap: pairs ``[a, b]`` of label values to exchange when flipped.
        prob: flip probability.
    """

    def __init__(self, keys: Sequence[str] | str, label_key: str = "label",
                 swap: Sequence[Sequence[int]] = (), prob: float = 0.5) -> None:
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        self.label_key = label_key
        self.swap = [(int(a), int(b)) for a, b in swap]

    def __call__(self, data: dict) -> dict:
        """Flip every key (and swap the label pairs) with probability ``prob``."""
        self.randomize(None)
        d = dict(data)
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            img = d[key]  # channel-first: spatial axis 0 is array axis 1 (a MetaTensor keeps its meta)
            flipped = torch.flip(img, dims=[1]) if isinstance(img, torch.Tensor) else np.flip(img, axis=1).copy()
            if key == self.label_key and self.swap:
                original = flipped.clone() if isinstance(flipped, torch.Tensor) else flipped.copy()
                for a, b in self.swap:
                    flipped[original == a] = b
                    flipped[original == b] = a
            d[key] = flipped
        return d


def world_range_region(shape: Sequence[int], affine: np.ndarray, axis: int, lo: float | None,
                       hi: float | None) -> np.ndarray:
    """Voxels whose world coordinate along ``axis`` (RAS mm) lies in ``[lo, hi]`` (``None``: open)."""
    idx = np.indices(tuple(shape), dtype=np.float64)
    world = sum(affine[axis, a] * idx[a] for a in range(3)) + affine[axis, 3]
    region = np.ones(tuple(shape), dtype=bool)
    if lo is not None:
        region &= world >= lo
    if hi is not None:
        region &= world <= hi
    return region


class RegionLabeld(MapTransform):
    """Set label voxels whose world coordinate (RAS mm) along ``axis`` lies outside ``range_mm`` to ``ignore``.

    The coordinate comes from each label's own affine, so the region is the same anatomy on any
    grid (native, reoriented or resampled). The image is untouched: the network still sees the
    whole volume, only the labels of the other region never count.

    Args:
        keys: label keys (channel-first MetaTensors).
        axis: RAS axis (0 x, 1 y, 2 z).
        range_mm: ``[lo, hi]`` in mm; ``None`` ends are open.
        ignore: the value given to labels outside.
    """

    def __init__(self, keys: Sequence[str] | str, axis: int, range_mm: Sequence[float | None],
                 ignore: int = IGNORE_LABEL) -> None:
        super().__init__(keys)
        self.axis, self.ignore = int(axis), int(ignore)
        self.lo, self.hi = (None if v is None else float(v) for v in range_mm)

    def __call__(self, data: dict) -> dict:
        """Mask every key."""
        d = dict(data)
        for key in self.key_iterator(d):
            label = d[key]
            affine = np.asarray(torch.as_tensor(label.affine).double()) if hasattr(label, "affine") else np.eye(4)
            outside = ~world_range_region(label.shape[1:], affine, self.axis, self.lo, self.hi)
            masked = label.clone() if isinstance(label, torch.Tensor) else np.array(label)
            masked[:, torch.as_tensor(outside) if isinstance(masked, torch.Tensor) else outside] = self.ignore
            d[key] = masked
        return d
