"""Run assembly for ``bundle.task: mae`` (``mae_pretrain``): MAE pre-training that writes an encoder."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from medimg.errors import atomic_output
from medimg.models import build_network
from medimg.models.weights import read_network_state
from medimg.runs.classification import classification_splits, image_datamodule, image_source
from medimg.runs.parts import RunRecord, TaskParts, network_spec
from medimg.runs.segmentation import model_kwargs
from medimg.tasks.mae import MAETask


def build_mae(cfg: DictConfig, run_dir: Path) -> TaskParts:
    """Task parts for ``bundle.task: mae`` (unlabelled images; labels, if any, are ignored)."""
    splits = classification_splits(cfg)
    kwargs = model_kwargs(cfg)
    network = build_network(**kwargs)
    t = cfg.task
    task = MAETask(network, lr=t.lr, weight_decay=t.weight_decay, warmup_epochs=t.warmup_epochs, out_dir=str(run_dir))

    def finish(best: str | None) -> None:
        if best:
            network.load_state_dict(read_network_state(best))
        out = run_dir / "encoder.pt"
        with atomic_output(out) as tmp:
            torch.save(network.encoder_state(), tmp)
        print(f"MAE encoder written (official MAE layout, loads with model.backbone_checkpoint=...): {out}")

    record = RunRecord("mae", "", network_spec(kwargs), {"img_size": int(kwargs["img_size"])}, {},
                       image_source(cfg), validation_split="validation split")
    return TaskParts(task, image_datamodule(cfg, splits), "val/score", lambda m: print(
        f"validation masked-patch MSE (best checkpoint): {-m.get('val/score', float('nan')):.4f}"),
        record, export=False, finish=finish)
