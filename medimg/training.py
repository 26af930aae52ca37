"""Assemble data, network, task and Lightning trainer from a composed config, train, export."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from medimg.data.datamodule import ManifestDataModule
from medimg.data.datasets import embedded_manifest
from medimg.data.manifest import Manifest, load_manifest
from medimg.data.transforms import build_pipeline, segmentation_spec
from medimg.errors import ConfigError
from medimg.models import build_network
from medimg.models.peft import trainable_summary
from medimg.tasks import SegmentationTask

log = logging.getLogger("medimg.train")
RUN_DIR_ENV = "MEDIMG_RUN_DIR"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write checkpoints to a temporary file and rename: a killed run never leaves a torn file."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        """Save ``checkpoint`` to ``path`` atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        torch.save(checkpoint, tmp)
        os.replace(tmp, path)


class SaveLastOnTrainEnd(L.Callback):
    """Refresh ``last.ckpt`` when training ends (the step-based saver may be a few steps behind)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Save the final state."""
        trainer.save_checkpoint(self.path)


def resolve_run_dir(cfg: DictConfig) -> tuple[Path, Path | None]:
    """Decide the run folder and the checkpoint to resume from.

    DDP worker processes inherit the folder chosen by rank 0 through ``$MEDIMG_RUN_DIR``.

    Returns:
        ``(run_dir, resume_checkpoint_or_None)``.
    """
    inherited = os.environ.get(RUN_DIR_ENV)
    resume = cfg.resume
    if inherited:
        run_dir = Path(inherited)
    elif resume not in (False, None, "false", "False"):
        if resume in (True, "true", "True"):
            parent = Path(cfg.runs_dir) / cfg.bundle.name
            runs = sorted(p for p in parent.glob("*") if (p / "checkpoints" / "last.ckpt").is_file())
            if not runs:
                raise ConfigError("resume", f"no run of {cfg.bundle.name} with a last.ckpt under {parent}")
            run_dir = runs[-1]
        else:
            run_dir = Path(str(resume))
            if not (run_dir / "checkpoints" / "last.ckpt").is_file():
                raise ConfigError(run_dir, "resume: no checkpoints/last.ckpt in this run folder")
    else:
        run_dir = Path(cfg.run_dir)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    resuming = resume not in (False, None, "false", "False")
    return run_dir.resolve(), (ckpt if resuming and ckpt.is_file() else None)


def resolve_data_source(cfg: DictConfig) -> tuple[Path, Path | str | None]:
    """``(manifest, dataset_dir)``: an embedded dataset (materialised on first use) or the user's manifest."""
    d = cfg.data
    if d.dataset:
        return embedded_manifest(d.dataset, d.dataset_dir)
    if d.manifest:
        return Path(d.manifest), d.dataset_dir
    raise ConfigError("data", "give data.dataset (mni152, phantom) or data.manifest (+ data.dataset_dir)")


def slice_crop(roi_size: list[int], slice_axis: int | None) -> list[int]:
    """The training crop: ``roi_size`` itself, or a one-slice crop around a 2D tile along ``slice_axis``."""
    roi = [int(r) for r in roi_size]
    if slice_axis is None:
        return roi
    if len(roi) != 2 or slice_axis not in (0, 1, 2):
        raise ConfigError("data.roi_size", "a 2D network takes a 2D tile (roi_size [H, W]) and slice_axis 0, 1 or 2")
    return roi[:slice_axis] + [1] + roi[slice_axis:]


def build_datamodule(cfg: DictConfig, run_dir: Path) -> ManifestDataModule:
    """Materialise the embedded dataset (if any), then the data module with its pipelines."""
    d = cfg.data
    manifest, dataset_dir = resolve_data_source(cfg)
    loaded = load_manifest(manifest, dataset_dir)
    common = dict(pixdim=d.pixdim, intensity=d.intensity, crop_foreground=d.crop_foreground)
    axis = d.get("slice_axis")
    train_spec = segmentation_spec("train", roi_size=slice_crop(d.roi_size, axis), num_samples=d.num_samples,
                                   num_classes=loaded.num_classes, augment=d.augment, slice_axis=axis,
                                   lr_swap=lr_swap_pairs(loaded), **common)
    val_spec = segmentation_spec("val", **common)
    cache_key = hashlib.sha256(json.dumps([train_spec, val_spec], sort_keys=True, default=str).encode()).hexdigest()
    cache_dir = d.cache_dir or (run_dir / "cache")
    return ManifestDataModule(manifest, dataset_dir, build_pipeline(train_spec), build_pipeline(val_spec),
                              batch_size=d.batch_size, num_workers=d.num_workers, cache=d.cache, cache_dir=cache_dir,
                              validate=d.validate, repeats=d.repeats, cache_key=cache_key[:16],
                              val_fraction=d.get("val_fraction"), seed=int(cfg.seed))


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


@dataclass
class TaskParts:
    """What a task kind contributes to a run."""

    task: L.LightningModule
    datamodule: L.LightningDataModule
    monitor: str
    report: Callable[[dict[str, float]], None]
    zero_shot: bool = False
    export: bool = True  # write a MONAI bundle at the end
    finish: Callable[[str | None], None] | None = None  # called with the best checkpoint (rank 0)
    val_split: str = ""  # which data produced the validation metrics (metrics.json, bundle eval_metrics)


def _segmentation(cfg: DictConfig, run_dir: Path) -> TaskParts:
    dm = build_datamodule(cfg, run_dir)
    manifest = dm.manifest
    cfg.model.out_channels = manifest.num_classes
    cfg.data.labels = manifest.labels or {str(i): f"class{i}" for i in range(manifest.num_classes)}
    cfg.data.source = str(manifest.meta.get("description", manifest.path.name))
    model_kwargs = OmegaConf.to_container(cfg.model, resolve=True)
    assert isinstance(model_kwargs, dict)
    if "backbone" in model_kwargs:  # ViT segmenter
        from medimg.training_vit import warn_random_backbone

        warn_random_backbone(cfg)
    t = cfg.task
    from monai.transforms import Invertd

    invert = Invertd(keys="pred", transform=dm.val_transforms, orig_keys="image", nearest_interp=False,
                     to_tensor=True)
    task = SegmentationTask(build_network(**model_kwargs), num_classes=manifest.num_classes,
                            class_names=manifest.class_names or None, roi_size=list(cfg.data.roi_size),
                            sw_batch_size=t.sw_batch_size, overlap=t.overlap, lr=t.lr, weight_decay=t.weight_decay,
                            optimizer=t.optimizer, warmup_epochs=t.warmup_epochs,
                            surface_tolerance_mm=t.surface_tolerance_mm, overlay_dir=str(run_dir / "overlays"),
                            slice_axis=cfg.data.get("slice_axis"), invert=invert)
    return TaskParts(task, dm, "val/dice", lambda m: _report(m, manifest.class_names[1:]), val_split=dm.val_split)


def _promptable(cfg: DictConfig, run_dir: Path) -> TaskParts:
    from medimg.data.datamodule import PromptSliceDataModule
    from medimg.models.peft import apply_freeze_policy
    from medimg.models.sam.builders import warn_if_random
    from medimg.tasks.promptable import PromptableTask

    d, t = cfg.data, cfg.task
    manifest, dataset_dir = resolve_data_source(cfg)
    model_kwargs = OmegaConf.to_container(cfg.model, resolve=True)
    assert isinstance(model_kwargs, dict)
    warn_if_random(model_kwargs)
    network = build_network(**model_kwargs)
    apply_freeze_policy(network, t.freeze)
    classes = list(d.classes) if d.classes else None
    if getattr(network, "spatial_dims", 2) == 3:
        from medimg.data.patches import PromptPatchDataModule

        try:
            network.check_size(tuple(d.roi_size))
        except ValueError as exc:
            raise ConfigError("data.roi_size", str(exc)) from exc
        dm = PromptPatchDataModule(manifest, dataset_dir, list(d.roi_size), pixdim=d.pixdim, intensity=d.intensity,
                                   classes=classes, target_mode=d.target_mode, train_samples=d.train_samples,
                                   val_clicks=d.val_clicks, batch_size=d.batch_size, jitter=d.jitter,
                                   connected_to_click=d.connected_to_click,
                                   region_split=OmegaConf.to_container(d.region_split, resolve=True)
                                   if d.get("region_split") else None,
                                   val_fraction=d.get("val_fraction"), seed=int(cfg.seed))
    else:
        dm = PromptSliceDataModule(manifest, dataset_dir, network.preprocess, network.img_size, plane=d.plane,
                                   intensity=d.intensity, classes=classes, target_mode=d.target_mode,
                                   train_slices=d.train_slices, val_slices=d.val_slices, batch_size=d.batch_size,
                                   val_fraction=d.get("val_fraction"), seed=int(cfg.seed))
    names = dm.manifest.labels or {}
    cfg.data.labels = {"0": "background", "1": "+".join(names.get(str(c), f"class{c}") for c in classes or [])
                       or "foreground"}
    cfg.data.source = str(dm.manifest.meta.get("description", dm.manifest.path.name))
    task = PromptableTask(network, click_rounds=t.click_rounds, box_prob=t.box_prob,
                          box_jitter_frac=t.box_jitter_frac, loss=t.loss, lr=t.lr, weight_decay=t.weight_decay,
                          click_loss_weight=float(t.get("click_loss_weight", 0.0)), seed=int(cfg.seed))
    return TaskParts(task, dm, "val/dice_box", _report_prompts, zero_shot=bool(t.zero_shot_eval),
                     val_split=dm.val_split)


def _report_prompts(metrics: dict[str, float]) -> None:
    rows = [f"{'prompt':<10}{'zero-shot Dice':>16}{'fine-tuned Dice':>17}{'fine-tuned NSD':>16}"]
    for name in ("box", "point1", "point3", "point5"):
        rows.append(f"{name:<10}{metrics.get(f'zero_shot/val/dice_{name}', float('nan')):>16.3f}"
                    f"{metrics.get(f'val/dice_{name}', float('nan')):>17.3f}"
                    f"{metrics.get(f'val/nsd_{name}', float('nan')):>16.3f}")
    if "val/volume_dice_box" in metrics:  # 3D: the bundle's predictor on whole validation volumes
        names = ("box", "point1")
        rows.append("whole-volume predictor Dice: " + ", ".join(
            f"{n} {metrics.get(f'val/volume_dice_{n}', float('nan')):.3f}" for n in names))
    print("held-out validation:\n" + "\n".join(rows))


def _classification(cfg: DictConfig, run_dir: Path) -> TaskParts:
    from medimg.training_vit import build_classification

    return build_classification(cfg, run_dir)


def _mae(cfg: DictConfig, run_dir: Path) -> TaskParts:
    from medimg.training_vit import build_mae

    return build_mae(cfg, run_dir)


TASKS: dict[str, Callable[[DictConfig, Path], TaskParts]] = {
    "segmentation": _segmentation,
    "promptable": _promptable,
    "classification": _classification,
    "mae": _mae,
}


def run_training(cfg: DictConfig) -> Path:
    """Train the configured bundle, then export and verify its MONAI bundle.

    Args:
        cfg: the composed Hydra config (``configs/train.yaml`` + ``configs/bundle/NAME.yaml``).

    Returns:
        The run folder.
    """
    run_dir, resume_ckpt = resolve_run_dir(cfg)
    os.environ[RUN_DIR_ENV] = str(run_dir)  # DDP workers started by Lightning land in the same run
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    OmegaConf.set_struct(cfg, False)
    cfg.run_dir = str(run_dir)
    kind = cfg.bundle.get("task", "segmentation")
    if kind not in TASKS:
        raise ConfigError("bundle.task", f"unknown task {kind!r}; choose from {', '.join(TASKS)}")
    parts = TASKS[kind](cfg, run_dir)
    task, dm = parts.task, parts.datamodule
    log.info("network %s: %s", cfg.model.name, trainable_summary(task.network))

    is_rank_zero = int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0
    if is_rank_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    ckpt_dir = run_dir / "checkpoints"
    callbacks = [
        ModelCheckpoint(dirpath=ckpt_dir, filename="best-{epoch:03d}", monitor=parts.monitor, mode="max",
                        save_top_k=1, save_last=False),
        ModelCheckpoint(dirpath=ckpt_dir, save_top_k=0, save_last=True, enable_version_counter=False,
                        every_n_train_steps=int(cfg.checkpoint.every_n_train_steps)),
        SaveLastOnTrainEnd(ckpt_dir / "last.ckpt"),
        LearningRateMonitor(logging_interval="epoch"),
    ]
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(TQDMProgressBar(refresh_rate=1))
    loggers = [CSVLogger(str(run_dir), name="logs", version=""),
               TensorBoardLogger(str(run_dir), name="tensorboard", version="", default_hp_metric=False)]
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    assert isinstance(trainer_kwargs, dict)
    trainer = L.Trainer(**trainer_kwargs, default_root_dir=str(run_dir), callbacks=callbacks, logger=loggers,
                        plugins=[AtomicCheckpointIO()])
    zero_shot: dict[str, float] = {}
    if parts.zero_shot and resume_ckpt is None:  # the pretrained model before any fine-tuning
        before = trainer.validate(task, datamodule=dm, verbose=False)[0]
        zero_shot = {f"zero_shot/{k}": float(v) for k, v in before.items()}
    if resume_ckpt is not None:
        log.info("resuming from %s", resume_ckpt)
    trainer.fit(task, datamodule=dm, ckpt_path=str(resume_ckpt) if resume_ckpt else None)

    best = callbacks[0].best_model_path or None
    if hasattr(task, "volume_eval"):  # the final validation also runs the bundle's whole-volume predictor
        task.volume_eval = True
    results = trainer.validate(task, datamodule=dm, ckpt_path=best, verbose=False)
    metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}
    metrics.update(zero_shot)
    if trainer.is_global_zero:
        metrics["epochs"] = trainer.current_epoch
        metrics["validation_split"] = parts.val_split or "validation split"
        metrics["checkpoint"] = str(best or ckpt_dir / "last.ckpt")
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        parts.report(metrics)
        if parts.finish is not None:
            parts.finish(best)
        if cfg.export.enabled and parts.export:
            from medimg.export import export_run

            bundle = export_run(run_dir, run_dir / "bundle", schema=cfg.export.schema, overwrite=True)
            print(f"bundle written and verified: {bundle}")
    return run_dir


def _report(metrics: dict[str, float], class_names: list[str]) -> None:
    rows = [f"{'class':<16}{'Dice':>8}{'HD95 mm':>10}{'NSD':>8}"]
    for name in class_names:
        rows.append(f"{name:<16}{metrics.get(f'val/dice_{name}', float('nan')):>8.3f}"
                    f"{metrics.get(f'val/hd95_{name}', float('nan')):>10.2f}"
                    f"{metrics.get(f'val/nsd_{name}', float('nan')):>8.3f}")
    rows.append(f"{'mean':<16}{metrics.get('val/dice', float('nan')):>8.3f}")
    print("validation (best checkpoint):\n" + "\n".join(rows))
