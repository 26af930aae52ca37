"""Run assembly for ``bundle.task: segmentation`` (``swin_unetr``, ``vit_seg``)."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from medimg.data.embedded import embedded_manifest
from medimg.data.manifest import Manifest, load_manifest
from medimg.data.postprocess import MAIN_COMPONENT_TOLERANCE, check_mode
from medimg.data.refine import check_refinement_mode
from medimg.data.segmentation import ManifestDataModule
from medimg.data.transforms import build_pipeline, segmentation_spec
from medimg.errors import ConfigError
from medimg.models import build_network
from medimg.runs.parts import RunRecord, TaskParts, network_spec
from medimg.tasks.segmentation import SegmentationTask

log = logging.getLogger("medimg.train")
RANDOM_BACKBONE_WARNING = """
################################################################################
#  WARNING: model.backbone_checkpoint is not set: the {backbone} ViT backbone is  #
#  RANDOMLY INITIALISED. Give model.backbone_checkpoint=PATH (MAE .pth, DINOv2  #
#  hub .pth, timm file, or a medimg mae_pretrain run's encoder.pt).             #
################################################################################"""


def warn_random_backbone(model_cfg: DictConfig | dict) -> None:
    """The loud warning for a randomly initialised ViT backbone."""
    if not model_cfg.get("backbone_checkpoint"):
        log.warning(RANDOM_BACKBONE_WARNING.format(backbone=model_cfg.get("backbone")))


def model_kwargs(cfg: DictConfig, **updates: Any) -> dict[str, Any]:
    """The run's ``model`` config as builder arguments, with the values assembly derives (``updates``)."""
    kwargs = OmegaConf.to_container(cfg.model, resolve=True)
    assert isinstance(kwargs, dict)
    return {**kwargs, **updates}


def resolve_data_source(cfg: DictConfig) -> tuple[Path, Path | str | None]:
    """``(manifest, dataset_dir)``: an embedded dataset (materialised on first use) or the user's manifest."""
    d = cfg.data
    if d.dataset:
        return embedded_manifest(d.dataset, d.dataset_dir)
    if d.manifest:
        return Path(d.manifest), d.dataset_dir
    raise ConfigError("data", "give data.dataset (mni152, mni152_head, phantom) or data.manifest (+ data.dataset_dir)")


def data_source(manifest: Manifest) -> str:
    """The manifest's description, else its file name."""
    return str(manifest.meta.get("description", manifest.path.name))


def slice_crop(roi_size: list[int], slice_axis: int | None) -> list[int]:
    """The training crop: ``roi_size`` itself, or a one-slice crop around a 2D tile along ``slice_axis``."""
    roi = [int(r) for r in roi_size]
    if slice_axis is None:
        return roi
    if len(roi) != 2 or slice_axis not in (0, 1, 2):
        raise ConfigError("data.roi_size", "a 2D network takes a 2D tile (roi_size [H, W]) and slice_axis 0, 1 or 2")
    return roi[:slice_axis] + [1] + roi[slice_axis:]


def lr_swap_pairs(manifest: Manifest) -> list[list[int]] | None:
    """The manifest's ``lr_swap`` (pairs of sided label values), ``None`` when it declares none."""
    swap = manifest.meta.get("lr_swap")
    if swap is None:
        return None
    ok = isinstance(swap, list) and all(isinstance(p, list) and len(p) == 2 and all(isinstance(v, int) for v in p)
                                        for p in swap)
    if not ok:
        raise ConfigError(manifest.path, "lr_swap must be a list of [left, right] label-value pairs, e.g. [[2, 3]]")
    return swap


def build_datamodule(cfg: DictConfig, run_dir: Path) -> ManifestDataModule:
    """Materialise the embedded dataset (if any), then the data module with its pipelines."""
    d = cfg.data
    manifest, dataset_dir = resolve_data_source(cfg)
    loaded = load_manifest(manifest, dataset_dir)
    common = dict(pixdim=d.pixdim, intensity=d.intensity, crop_foreground=d.crop_foreground)
    axis = d.get("slice_axis")
    split = region_split(d.get("region_split"), loaded)
    synth = OmegaConf.to_container(d.synth, resolve=True) if d.get("synth") else None
    train_spec = segmentation_spec("train", roi_size=slice_crop(d.roi_size, axis), num_samples=d.num_samples,
                                   num_classes=loaded.num_classes, augment=d.augment, slice_axis=axis,
                                   lr_swap=lr_swap_pairs(loaded), synth=synth,
                                   region=split["train"] if split else None, **common)
    val_spec = segmentation_spec("val", region=split["val"] if split else None, **common)
    cache_key = hashlib.sha256(json.dumps([train_spec, val_spec], sort_keys=True, default=str).encode()).hexdigest()
    cache_dir = d.cache_dir or (run_dir / "cache")
    return ManifestDataModule(manifest, dataset_dir, build_pipeline(train_spec), build_pipeline(val_spec),
                              batch_size=d.batch_size, num_workers=d.num_workers, cache=d.cache, cache_dir=cache_dir,
                              validate=d.validate, repeats=d.repeats, cache_key=cache_key[:16],
                              val_fraction=d.get("val_fraction"), seed=int(cfg.seed),
                              items=split["items"] if split else None)


def region_split(cfg: DictConfig | str | None, manifest: Manifest) -> dict[str, Any] | None:
    """``data.region_split`` resolved: the whole volumes, and the training / validation regions.

    ``{"split": manifest split of whole volumes, "axis": RAS axis, "train": [lo, hi], "val": [lo, hi]}``
    (mm, ``null`` ends open), or ``"manifest"``: the manifest's own ``region_split``, if any.
    Training and validation both use those volumes; labels outside each stage's own range are
    ignored, so the network sees whole scans (as at inference) and never a cut plane, while no
    label of the validation region is trained on.
    """
    if cfg == "manifest":
        cfg = manifest.meta.get("region_split")
    if not cfg:
        return None
    rs = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    name = rs.get("split", "test")
    items = manifest.splits.get(name) or []
    if not items:
        raise ConfigError("data.region_split.split", f"manifest {manifest.path} has no {name!r} volumes")
    (t_lo, t_hi), (v_lo, v_hi) = rs["train"], rs["val"]
    inf = float("inf")
    t_lo, t_hi = (-inf if t_lo is None else t_lo), (inf if t_hi is None else t_hi)
    v_lo, v_hi = (-inf if v_lo is None else v_lo), (inf if v_hi is None else v_hi)
    if max(t_lo, v_lo) <= min(t_hi, v_hi):
        raise ConfigError("data.region_split", f"the train {rs['train']} and val {rs['val']} ranges overlap")
    axis = int(rs["axis"])
    description = (f"region split of the {name!r} volumes: RAS axis {axis} range {rs['val']} mm "
                   f"(training range {rs['train']} mm)")
    return {"items": (list(items), list(items), description),
            "train": {"axis": axis, "range": rs["train"]}, "val": {"axis": axis, "range": rs["val"]}}


def build_segmentation(cfg: DictConfig, run_dir: Path) -> TaskParts:
    """Task parts for ``bundle.task: segmentation``."""
    from monai.transforms import Invertd

    dm = build_datamodule(cfg, run_dir)
    manifest, d, t = dm.manifest, cfg.data, cfg.task
    kwargs = model_kwargs(cfg, out_channels=manifest.num_classes)
    if "backbone" in kwargs:  # ViT segmenter
        warn_random_backbone(kwargs)
    invert = Invertd(keys="pred", transform=dm.val_transforms, orig_keys="image", nearest_interp=False,
                     to_tensor=True)
    main_mode = check_mode(t.get("keep_main_component", False))
    opening = float(t.get("main_component_opening_mm", 3.0))
    refine_mode = check_refinement_mode(t.get("intensity_refinement", False))
    task = SegmentationTask(build_network(**kwargs), num_classes=manifest.num_classes,
                            class_names=manifest.class_names or None, roi_size=list(d.roi_size),
                            sw_batch_size=t.sw_batch_size, overlap=t.overlap, lr=t.lr, weight_decay=t.weight_decay,
                            optimizer=t.optimizer, warmup_epochs=t.warmup_epochs,
                            surface_tolerance_mm=t.surface_tolerance_mm, overlay_dir=str(run_dir / "overlays"),
                            slice_axis=d.get("slice_axis"), invert=invert,
                            main_component_opening_mm=opening if main_mode is not False else None,
                            refine_intensities=refine_mode is not False)
    contract: dict[str, Any] = {
        # the validation's own pipeline and sliding-window settings, exactly
        "preprocessing": segmentation_spec("infer", pixdim=d.pixdim, intensity=d.intensity,
                                           crop_foreground=d.crop_foreground),
        "roi_size": [int(r) for r in d.roi_size], "overlap": float(t.overlap), "sw_batch_size": int(t.sw_batch_size),
        # "auto" is settled by export from the validation metrics (medimg.data.postprocess)
        "keep_main_component": main_mode, "main_component_opening_mm": opening,
        "intensity_refinement": refine_mode}
    if d.get("slice_axis") is not None:  # a 2D network over the volume's slices
        contract["slice_axis"] = int(d.slice_axis)
    labels = manifest.labels or {str(i): f"class{i}" for i in range(manifest.num_classes)}
    # a ViT segmenter takes fixed-size 2D tiles: the bundle's input shape
    meta = {"input_spatial_shape": [int(kwargs["img_size"])] * 2} if "backbone" in kwargs else {}
    record = RunRecord("segmentation", cfg.bundle.template, network_spec(kwargs), contract, labels,
                       data_source(manifest), meta=meta, validation_split=dm.val_split)
    return TaskParts(task, dm, "val/dice", lambda m: report_segmentation(m, manifest.class_names[1:]), record)


def report_segmentation(metrics: dict[str, float], class_names: list[str]) -> None:
    """Print per-class validation metrics."""
    rows = [f"{'class':<16}{'Dice':>8}{'HD95 mm':>10}{'NSD':>8}"]
    for name in class_names:
        rows.append(f"{name:<16}{metrics.get(f'val/dice_{name}', float('nan')):>8.3f}"
                    f"{metrics.get(f'val/hd95_{name}', float('nan')):>10.2f}"
                    f"{metrics.get(f'val/nsd_{name}', float('nan')):>8.3f}")
    rows.append(f"{'mean':<16}{metrics.get('val/dice', float('nan')):>8.3f}")
    if "val/dice_main_component" in metrics:
        rows.append(f"{'main component':<16}{metrics['val/dice_main_component']:>8.3f}  (mean Dice with only the "
                    f"main connected component kept; kept unless it costs > {MAIN_COMPONENT_TOLERANCE})")
    if "val/dice_refined" in metrics:
        rows.append(f"{'refined':<16}{metrics['val/dice_refined']:>8.3f}  (mean Dice with the scan's intensities "
                    f"fitted under the network's prior; kept unless it costs Dice)")
    print("validation (best checkpoint):\n" + "\n".join(rows))
