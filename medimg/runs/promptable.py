"""Run assembly for ``bundle.task: promptable`` (``litemedsam``, ``medsam2d``, ``medsam3d``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from medimg.data.manifest import Manifest
from medimg.errors import ConfigError
from medimg.models import build_network
from medimg.models.peft import apply_freeze_policy
from medimg.models.sam.builders import warn_if_random
from medimg.predictors.protocols import PromptableNetwork3D
from medimg.runs.parts import RunRecord, TaskParts, network_spec
from medimg.runs.segmentation import data_source, model_kwargs, resolve_data_source
from medimg.tasks.promptable import PromptableTask


def target_labels(manifest: Manifest, classes: list[int] | None) -> dict[str, str]:
    """The binary task's labels: background and the (joined) names of the classes it segments."""
    names = manifest.labels or {}
    joined = "+".join(names.get(str(c), f"class{c}") for c in classes or [])
    return {"0": "background", "1": joined or "foreground"}


def build_promptable(cfg: DictConfig, run_dir: Path) -> TaskParts:
    """Task parts for ``bundle.task: promptable``: 2D slices or 3D patches, by the network's protocol."""
    d, t = cfg.data, cfg.task
    manifest, dataset_dir = resolve_data_source(cfg)
    kwargs = model_kwargs(cfg)
    warn_if_random(kwargs)
    network = build_network(**kwargs)
    apply_freeze_policy(network, t.freeze)
    classes = list(d.classes) if d.classes else None
    common = dict(classes=classes, target_mode=d.target_mode, batch_size=d.batch_size,
                  val_fraction=d.get("val_fraction"), seed=int(cfg.seed))
    meta: dict[str, Any] = {}
    if isinstance(network, PromptableNetwork3D):
        from medimg.data.promptable.patches import PromptPatchDataModule

        try:
            network.check_size(tuple(d.roi_size))
        except ValueError as exc:
            raise ConfigError("data.roi_size", str(exc)) from exc
        region = OmegaConf.to_container(d.region_split, resolve=True) if d.get("region_split") else None
        dm = PromptPatchDataModule(manifest, dataset_dir, list(d.roi_size), pixdim=d.pixdim, intensity=d.intensity,
                                   train_samples=d.train_samples, val_clicks=d.val_clicks, jitter=d.jitter,
                                   connected_to_click=d.connected_to_click, region_split=region,
                                   synth=OmegaConf.to_container(d.synth, resolve=True) if d.get("synth") is not None
                                   else None, corrupt=bool(d.get("corrupt", False)),
                                   subjects=list(d.subjects) if d.get("subjects") else None, **common)
        contract = {"roi_size": [int(r) for r in d.roi_size],
                    "pixdim": None if d.pixdim is None else [float(p) for p in d.pixdim], "intensity": d.intensity}
    else:
        from medimg.data.promptable.slices import PromptSliceDataModule

        dm = PromptSliceDataModule(manifest, dataset_dir, network.preprocess, network.img_size, plane=d.plane,
                                   intensity=d.intensity, train_slices=d.train_slices, val_slices=d.val_slices,
                                   **common)
        contract = {"plane": d.plane, "intensity": d.intensity}
        meta["input_spatial_shape"] = [int(network.img_size)] * 2
    if t.get("rounds", "all") not in ("all", "last"):
        raise ConfigError("task.rounds", f"unknown {t.rounds!r}; choose all or last")
    task = PromptableTask(network, click_rounds=t.click_rounds, box_prob=t.box_prob,
                          box_jitter_frac=t.box_jitter_frac, loss=t.loss, lr=t.lr, weight_decay=t.weight_decay,
                          click_loss_weight=float(t.get("click_loss_weight", 0.0)), seed=int(cfg.seed),
                          distill_weight=float(t.get("distill_weight", 0.0)),
                          distill_boxes=int(t.get("distill_boxes", 2)), rounds=str(t.get("rounds", "all")))
    record = RunRecord("promptable", cfg.bundle.template, network_spec(kwargs), contract,
                       target_labels(dm.manifest, classes), data_source(dm.manifest), meta=meta,
                       validation_split=dm.val_split)
    volume_eval = None
    if isinstance(network, PromptableNetwork3D):  # the final validation also runs the whole-volume predictor
        def volume_eval() -> None:
            from medimg.predictors.volumetric import VolumePromptPredictor

            task.volume_predictor = VolumePromptPredictor
    return TaskParts(task, dm, "val/dice_box", report_prompts, record, zero_shot=bool(t.zero_shot_eval),
                     before_final_validation=volume_eval)


def report_prompts(metrics: dict[str, float]) -> None:
    """Print zero-shot and fine-tuned Dice per prompt kind."""
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
