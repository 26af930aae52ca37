"""3D training samples for promptable models: patches centred on simulated clicks.

Each volume goes through the bundle's own geometry and intensity pipeline (RAS, ``pixdim``,
intensity preset) once. A sample picks a target (a label value, or one connected component), puts
a positive click in the target's largest connected component (away from its edge, as a user
would), and crops a patch of ``roi_size`` centred on that click (shifted at random by up to
``jitter`` of the patch during training, so the click is not always in the centre). Patches that
reach beyond the volume are zero-padded. With ``connected_to_click`` (the default) the patch's
target is the part of the target that is connected, inside the patch, to the click: one click
means "this structure", so the click carries information even for a tissue class that fills
much of the patch (a whole-class target would make the click redundant, and the model learns to
ignore it). Correction clicks are the task's job (they depend on the model's prediction).

**Regions.** A volume may carry a boolean *region*: clicks are drawn only inside it, and each item
carries a ``weight`` patch (1 inside the region, 0 elsewhere and outside the volume) that the task
applies to its loss, its correction clicks and its metrics. Training and validation can then share
one whole volume with disjoint regions (``region_split``): patches show real anatomy on every side,
as inference windows on a whole scan do, instead of the zero-padded cut planes of separately cut
slabs, which a model learns to rely on. Labels and clicks of the other split's region never count.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import DataLoader, Dataset

from medimg.data.augment import GEN_KEY, RandLabelSynthd, SynthLabelsd, corruption_spec, synth_options
from medimg.data.manifest import Manifest, load_manifest, train_val_split, validate_manifest
from medimg.data.promptable.simulation import largest_component, sample_clicks, split_targets
from medimg.data.transforms import build_pipeline, segmentation_spec, world_range_region
from medimg.errors import ConfigError


def crop_centred(array: np.ndarray, centre: Sequence[int], size: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """A ``size`` patch of ``array`` whose centre voxel is ``centre``, zero-padded outside the array.

    Returns:
        ``(patch, origin)``: ``origin`` is the array index of the patch's first voxel (may be negative).
    """
    origin = np.asarray(centre, dtype=np.int64) - np.asarray(size) // 2
    out = np.zeros(tuple(size), dtype=array.dtype)
    src = tuple(slice(max(o, 0), min(o + s, n)) for o, s, n in zip(origin, size, array.shape))
    dst = tuple(slice(sl.start - o, sl.stop - o) for sl, o in zip(src, origin))
    out[dst] = array[src]
    return out, origin


class PromptPatchDataset(Dataset):
    """Click-centred 3D patches with a binary target.

    Each item: ``image`` (1, *roi) in [0, 1], ``target`` (1, *roi), ``click`` (3,) voxel index of
    the first (positive) click inside the patch, ``label`` (class value).

    Args:
        volumes: ``[(image (X, Y, Z) float, label (X, Y, Z) int), ...]`` in the model frame.
        roi_size: patch size.
        classes: label values to make targets from (``None``: all).
        target_mode: ``label`` or ``component``.
        samples: items per epoch (training) -- drawn afresh for each access; ``None``: fixed samples,
            ``clicks_per_target`` per target (validation: the same clicks every epoch).
        clicks_per_target: fixed samples per target when ``samples`` is ``None``.
        jitter: random shift of the patch centre, as a fraction of the patch (training).
        min_size: smallest target kept (voxels).
        connected_to_click: keep only the target voxels connected to the click inside the patch.
        synth: when given (``{}`` for the defaults), training patches are synthesised from the
            label map SynthSeg-style, with a synthetic head around the anatomy
            (:class:`~medimg.data.augment.SynthLabelsd`, :class:`~medimg.data.augment.RandLabelSynthd`;
            options as ``data.synth``): a model trained on a skull-stripped template sees heads.
            What that buys on a real head is measured in the README ("Cross-subject clicks").
        corrupt: scanner-like intensity corruptions of the training patches (gain, bias field, gamma,
            histogram shift, low resolution, Gibbs, noise: :func:`~medimg.data.augment.corruption_spec`),
            for real images that carry their own head (after ``synth`` when both are on).
        seed: sampling seed.
    """

    def __init__(self, volumes: Sequence[tuple[np.ndarray, np.ndarray]], roi_size: Sequence[int],
                 classes: Sequence[int] | None = None, target_mode: str = "label", samples: int | None = None,
                 clicks_per_target: int = 1, jitter: float = 0.25, min_size: int = 30,
                 connected_to_click: bool = True, regions: Sequence[np.ndarray | None] | None = None,
                 synth: dict | None = None, corrupt: bool = False, seed: int = 0) -> None:
        self.roi = tuple(int(r) for r in roi_size)
        self.connected_to_click = connected_to_click
        self.regions = list(regions) if regions is not None else [None] * len(volumes)
        self.samples, self.jitter = samples, jitter
        self.rng = np.random.default_rng(seed)
        self.images = [np.asarray(img, dtype=np.float32) for img, _ in volumes]
        self.targets: list[tuple[int, int, np.ndarray]] = []  # (volume, class value, largest component)
        self.masks: list[np.ndarray] = []
        for vi, (_, lab) in enumerate(volumes):
            region = self.regions[vi]
            for value, mask in split_targets(np.asarray(lab), target_mode, list(classes) if classes else None,
                                             min_size):
                clickable = largest_component(mask if region is None else mask & region)
                if clickable.sum() >= min_size:
                    self.targets.append((vi, value, clickable))
                    self.masks.append(mask)
        if not self.targets:
            raise ValueError("no target of at least min_size voxels in these volumes")
        self.synth, self.gens = None, []
        if synth is not None:
            num_labels = int(max(int(np.asarray(lab).max()) for _, lab in volumes)) + 1
            labeller = SynthLabelsd("label", num_labels=num_labels)
            self.gens = [np.asarray(labeller({"image": torch.from_numpy(img)[None],
                                              "label": torch.as_tensor(np.asarray(lab))[None]})[GEN_KEY][0])
                         for img, (_, lab) in zip(self.images, volumes)]
            self.synth = RandLabelSynthd("image", num_labels=num_labels, **synth_options(synth))
            self.synth.set_random_state(seed=seed)
        self.corrupt = build_pipeline(corruption_spec()) if corrupt else None
        if self.corrupt is not None:
            self.corrupt.set_random_state(seed=seed)
        self.fixed = None
        if samples is None:
            self.fixed = [self._draw(t, jitter=False) for t in range(len(self.targets))
                          for _ in range(clicks_per_target)]

    def _draw(self, t: int, jitter: bool) -> dict:
        vi, value, component = self.targets[t]
        click = sample_clicks(component, None, 1, rng=self.rng)[0][0]
        centre = click.copy()
        if jitter and self.jitter:
            shift = np.asarray(self.roi) * self.jitter
            centre = centre + np.round(self.rng.uniform(-shift, shift)).astype(np.int64)
        image, origin = crop_centred(self.images[vi], centre, self.roi)
        if jitter and self.synth is not None:  # training only: validation sees the real image
            gen = crop_centred(self.gens[vi], centre, self.roi)[0]
            image = np.asarray(self.synth({"image": torch.from_numpy(image)[None],
                                           GEN_KEY: torch.from_numpy(gen)[None]})["image"][0], dtype=np.float32)
        if jitter and self.corrupt is not None:
            image = np.asarray(self.corrupt({"image": torch.from_numpy(image)[None]})["image"][0], dtype=np.float32)
        target, _ = crop_centred(self.masks[t].astype(np.float32), centre, self.roi)
        local = click - origin
        region = self.regions[vi]
        weight = None if region is None else crop_centred(region.astype(np.float32), centre, self.roi)[0]
        if self.connected_to_click:
            comp, _ = ndimage.label((target > 0) if weight is None else (target > 0) & (weight > 0))
            target = (comp == comp[tuple(local)]).astype(np.float32)
        item = {"image": torch.from_numpy(image)[None], "target": torch.from_numpy(target)[None],
                "click": torch.as_tensor(local, dtype=torch.float32), "label": value,
                "volume": vi, "volume_click": torch.as_tensor(click, dtype=torch.float32), "target_index": t}
        if weight is not None:
            item["weight"] = torch.from_numpy(weight)[None]
        return item

    def __len__(self) -> int:
        return len(self.fixed) if self.fixed is not None else int(self.samples)

    def volume_target(self, t: int, click: Sequence[int]) -> tuple[np.ndarray, np.ndarray | None]:
        """The whole-volume target of a click: the part of target ``t`` (inside the region) connected to it.

        Returns:
            ``(target, region)`` over the whole model-frame volume (``region`` ``None`` without a split).
        """
        vi = self.targets[t][0]
        region = self.regions[vi]
        mask = self.masks[t] if region is None else self.masks[t] & region
        comp, _ = ndimage.label(mask)
        return comp == comp[tuple(int(c) for c in click)], region

    def __getitem__(self, i: int) -> dict:
        if self.fixed is not None:
            return self.fixed[i]
        return self._draw(int(self.rng.integers(len(self.targets))), jitter=True)


def load_volumes(items: Sequence[dict], pixdim: Sequence[float] | None, intensity: str,
                 with_affine: bool = False) -> list[tuple]:
    """Image/label pairs through the bundle's geometry + intensity pipeline (no crops, no augmentation).

    Returns ``(image, label)`` per item, or ``(image, label, affine)`` with ``with_affine``.
    """
    pipeline = build_pipeline(segmentation_spec("val", pixdim=pixdim, intensity=intensity, crop_foreground=False))
    out = []
    for item in items:
        data = pipeline(dict(item))
        pair = (np.asarray(data["image"][0], dtype=np.float32), np.asarray(data["label"][0]).astype(np.int64))
        out.append(pair + (np.asarray(data["image"].affine, dtype=np.float64),) if with_affine else pair)
    return out


def select_subjects(manifest: Manifest, subjects: Sequence[str] | None, intensity: str) -> Manifest:
    """The manifest with only the entries of ``subjects`` (all when ``None``), each checked for ``intensity``.

    Raises:
        ConfigError: a named subject is in no entry, or a chosen entry has another intensity window.
    """
    if subjects is not None:
        wanted = {str(s) for s in subjects}
        found = {item.get("subject") for items in manifest.splits.values() for item in items}
        if wanted - found:
            raise ConfigError("data.subjects", f"no manifest entry for {', '.join(sorted(wanted - found))} "
                                               f"(subjects: {', '.join(sorted(str(f) for f in found))})")
        manifest = dataclasses.replace(manifest, splits={
            split: [item for item in items if item.get("subject") in wanted]
            for split, items in manifest.splits.items()})
    chosen = [item for items in manifest.splits.values() for item in items]
    other = sorted({str(item.get("subject", item["image"])) for item in chosen
                    if item.get("intensity", intensity) != intensity})
    if other:
        raise ConfigError("data.subjects", f"{', '.join(other)} use another intensity window than data.intensity="
                                           f"{intensity!r}; a 3D bundle has one (choose subjects with data.subjects)")
    return manifest


class PromptPatchDataModule(L.LightningDataModule):
    """Click-centred 3D patches of a manifest's volumes, for volumetric promptable models.

    Args:
        manifest: datalist JSON.
        dataset_dir: folder its relative paths refer to.
        roi_size: patch size (a multiple of the network's patch).
        pixdim: model spacing in mm (``None``: native).
        intensity: intensity preset (maps the image to [0, 1]).
        classes: label values to segment (``None``: all).
        target_mode: ``label`` or ``component``.
        train_samples: training patches per epoch.
        val_clicks: fixed validation clicks per target.
        batch_size: training batch size.
        jitter: training patch-centre shift, as a fraction of the patch.
        min_size: smallest target kept (voxels).
        connected_to_click: targets are the part connected to the click inside the patch.
        region_split: ``{"split": manifest split of whole volumes, "axis": RAS axis, "train": [lo, hi],
            "val": [lo, hi]}`` (mm; ``None`` ends are open): train and validate on the same whole
            volumes with disjoint regions. ``None``: the manifest's training / validation volumes.
        synth: synthesise training patches from the label map (see :class:`PromptPatchDataset`).
        corrupt: scanner-like intensity corruptions of the training patches.
        subjects: train and validate only on the manifest entries of these ``subject`` names
            (``None``: all). A 3D bundle has one intensity contract, so every entry used must have
            the bundle's ``intensity`` (an entry's own ``intensity``, when it has one).
    """

    def __init__(self, manifest: str | Path, dataset_dir: str | Path | None, roi_size: Sequence[int],
                 pixdim: Sequence[float] | None = (2.0, 2.0, 2.0), intensity: str = "mr",
                 classes: Sequence[int] | None = None, target_mode: str = "label", train_samples: int = 32,
                 val_clicks: int = 2, batch_size: int = 2, jitter: float = 0.25, min_size: int = 30,
                 connected_to_click: bool = True, region_split: dict | None = None,
                 val_fraction: float | None = None, synth: dict | None = None, corrupt: bool = False,
                 subjects: Sequence[str] | None = None, seed: int = 0) -> None:
        super().__init__()
        self.region_split = dict(region_split) if region_split else None
        self.manifest = select_subjects(load_manifest(manifest, dataset_dir), subjects, intensity)
        if self.region_split:
            rs = self.region_split
            self.val_split = (f"region split of the {rs.get('split', 'test')!r} volumes: RAS axis {rs['axis']} "
                              f"range {rs['val']} mm (training range {rs['train']} mm)")
        else:
            self.train_items, self.val_items, self.val_split = train_val_split(self.manifest, val_fraction, seed)
        self.pixdim, self.intensity = pixdim, intensity
        self.kwargs = dict(roi_size=roi_size, classes=classes, target_mode=target_mode, min_size=min_size,
                           connected_to_click=connected_to_click)
        self.train_samples, self.val_clicks = train_samples, val_clicks
        self.batch_size, self.jitter, self.synth, self.corrupt = batch_size, jitter, synth, corrupt
        self.train_set = self.val_set = None

    def setup(self, stage: str | None = None) -> None:
        """Validate the manifest, load the volumes once and fix the validation clicks."""
        if self.train_set is None:
            validate_manifest(self.manifest)
            train_regions = val_regions = None
            if self.region_split:
                rs = self.region_split
                items = self.manifest.splits.get(rs.get("split", "test")) or []
                if not items:
                    raise ConfigError("data.region_split.split", f"manifest has no {rs.get('split')!r} volumes")
                loaded = load_volumes(items, self.pixdim, self.intensity, with_affine=True)
                train = val = [(img, lab) for img, lab, _ in loaded]
                train_regions = [world_range_region(img.shape, aff, int(rs["axis"]), *rs["train"])
                                 for img, _, aff in loaded]
                val_regions = [world_range_region(img.shape, aff, int(rs["axis"]), *rs["val"])
                               for img, _, aff in loaded]
                if any((a & b).any() for a, b in zip(train_regions, val_regions)):
                    raise ConfigError("data.region_split", "the train and val ranges overlap")
            else:
                train = load_volumes(self.train_items, self.pixdim, self.intensity)
                val = load_volumes(self.val_items, self.pixdim, self.intensity)
            self.train_set = PromptPatchDataset(train, samples=self.train_samples, jitter=self.jitter, seed=0,
                                                regions=train_regions, synth=self.synth, corrupt=self.corrupt,
                                                **self.kwargs)
            self.val_set = PromptPatchDataset(val, samples=None, clicks_per_target=self.val_clicks, seed=1,
                                              regions=val_regions, **self.kwargs)

    def train_dataloader(self) -> DataLoader:
        """Fresh click-centred patches every epoch."""
        return DataLoader(self.train_set, batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader:
        """The fixed validation patches."""
        return DataLoader(self.val_set, batch_size=2, shuffle=False)

    def state_dict(self) -> dict:
        """Nothing to resume: the volumes reload from the manifest."""
        return {}
