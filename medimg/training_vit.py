"""Run assembly for the ViT tasks: classification (``vit_cls``) and MAE pre-training (``mae_pretrain``)."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from medimg.errors import ConfigError, atomic_output

log = logging.getLogger("medimg.train")
# default learning rates by tuning method (task.lr: null): a frozen backbone's few new parameters
# (head, LoRA, DVPT) want a larger step than full fine-tuning with layer-wise decay
PEFT_LR = {"full": 1e-3, "lora": 1e-2, "dvpt": 1e-2, "linear": 3e-2}
RANDOM_BACKBONE_WARNING = """
################################################################################
#  WARNING: model.backbone_checkpoint is not set: the {backbone} ViT backbone is  #
#  RANDOMLY INITIALISED. Give model.backbone_checkpoint=PATH (MAE .pth, DINOv2  #
#  hub .pth, timm file, or a medimg mae_pretrain run's encoder.pt).             #
################################################################################"""


def classification_splits(cfg: DictConfig) -> dict:
    """The configured image splits: an embedded set, a CSV manifest or a MedMNIST ``.npz``."""
    from medimg.data.classification import read_csv_manifest, read_medmnist
    from medimg.data.mni_slices import CLASS_ORDER, embedded_csv

    d = cfg.data
    names = list(d.class_names) if d.get("class_names") else None
    columns = list(d.label_columns) if d.get("label_columns") else None
    given = [k for k in ("dataset", "csv", "npz") if d.get(k)]
    if len(given) != 1:
        raise ConfigError("data", "give exactly one of data.dataset (mni152_levels, mni152_slices), data.csv or "
                                  f"data.npz (got {', '.join(given) or 'none'})")
    if d.get("npz"):
        return read_medmnist(d.npz, names)
    if d.get("csv"):
        return read_csv_manifest(d.csv, d.get("dataset_dir"), columns, names)
    csv = embedded_csv(d.dataset, d.get("dataset_dir"))
    return read_csv_manifest(csv, None, columns, names or CLASS_ORDER.get(d.dataset))


def _datamodule(cfg: DictConfig, splits: dict):
    from medimg.data.datamodule import ClassificationDataModule

    d, m = cfg.data, cfg.model
    return ClassificationDataModule(splits, int(m.img_size), int(m.in_chans), d.normalize, int(d.batch_size),
                                    tuple(d.crop_scale), int(d.randaug), int(d.num_workers))


def warn_random_backbone(cfg: DictConfig) -> None:
    """The loud warning for a randomly initialised backbone."""
    if not cfg.model.get("backbone_checkpoint"):
        log.warning(RANDOM_BACKBONE_WARNING.format(backbone=cfg.model.backbone))


def build_classification(cfg: DictConfig, run_dir: Path):
    """Task parts for ``bundle.task: classification``."""
    from medimg.models import build_network
    from medimg.tasks.classification import ClassificationTask
    from medimg.training import TaskParts

    splits = classification_splits(cfg)
    train = splits["training"]
    if train.labels is None:
        raise ConfigError("data", "the classification data has no label columns")
    OmegaConf.set_struct(cfg, False)
    cfg.model.num_classes = len(train.class_names)
    cfg.data.labels = {str(i): n for i, n in enumerate(train.class_names)}
    cfg.data.multilabel = bool(train.multilabel)
    cfg.data.source = str(cfg.data.get("dataset") or cfg.data.get("csv") or cfg.data.get("npz"))
    warn_random_backbone(cfg)
    kwargs = OmegaConf.to_container(cfg.model, resolve=True)
    network = build_network(**kwargs)
    t = cfg.task
    if t.lr is None:
        cfg.task.lr = PEFT_LR[cfg.model.peft]
    task = ClassificationTask(network, len(train.class_names), train.multilabel, train.class_names, lr=cfg.task.lr,
                              weight_decay=t.weight_decay, layer_decay=t.layer_decay, warmup_epochs=t.warmup_epochs,
                              label_smoothing=t.label_smoothing, knn_k=t.knn_k, out_dir=str(run_dir))
    return TaskParts(task, _datamodule(cfg, splits), "val/auroc", _report_classification)


def _report_classification(metrics: dict[str, float]) -> None:
    names = ("auroc", "accuracy", "f1", "kappa", "knn_accuracy", "knn_auroc", "knn_frozen_accuracy",
             "knn_frozen_auroc")
    print("validation (best checkpoint): " + "  ".join(f"{n} {metrics[f'val/{n}']:.3f}" for n in names
                                                       if f"val/{n}" in metrics))


def build_mae(cfg: DictConfig, run_dir: Path):
    """Task parts for ``bundle.task: mae`` (unlabelled images; labels, if any, are ignored)."""
    from medimg.models import build_network
    from medimg.tasks.mae import MAETask
    from medimg.training import TaskParts

    splits = classification_splits(cfg)
    OmegaConf.set_struct(cfg, False)
    cfg.data.source = str(cfg.data.get("dataset") or cfg.data.get("csv") or cfg.data.get("npz"))
    network = build_network(**OmegaConf.to_container(cfg.model, resolve=True))
    t = cfg.task
    task = MAETask(network, lr=t.lr, weight_decay=t.weight_decay, warmup_epochs=t.warmup_epochs, out_dir=str(run_dir))

    def finish(best: str | None) -> None:
        import torch

        from medimg.export import read_network_state

        if best:
            network.load_state_dict(read_network_state(best))
        out = run_dir / "encoder.pt"
        with atomic_output(out) as tmp:
            torch.save(network.encoder_state(), tmp)
        print(f"MAE encoder written (official MAE layout, loads with model.backbone_checkpoint=...): {out}")

    return TaskParts(task, _datamodule(cfg, splits), "val/score", lambda m: print(
        f"validation masked-patch MSE (best checkpoint): {-m.get('val/score', float('nan')):.4f}"),
        export=False, finish=finish)
