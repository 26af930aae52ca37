"""Run assembly for ``bundle.task: classification`` (``vit_cls``) and the image splits ViT runs share."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from medimg.data.classification import ClassificationDataModule, read_csv_manifest, read_medmnist
from medimg.data.embedded.mni_slices import CLASS_ORDER, embedded_csv
from medimg.errors import ConfigError
from medimg.models import build_network
from medimg.runs.parts import RunRecord, TaskParts, network_spec
from medimg.runs.segmentation import model_kwargs, warn_random_backbone
from medimg.tasks.classification import ClassificationTask

# default learning rates by tuning method (task.lr: null): a frozen backbone's few new parameters
# (head, LoRA, DVPT) want a larger step than full fine-tuning with layer-wise decay
PEFT_LR = {"full": 1e-3, "lora": 1e-2, "dvpt": 1e-2, "linear": 3e-2}


def classification_splits(cfg: DictConfig) -> dict:
    """The configured image splits: an embedded set, a CSV manifest or a MedMNIST ``.npz``."""
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


def image_source(cfg: DictConfig) -> str:
    """Where a ViT run's images came from."""
    return str(cfg.data.get("dataset") or cfg.data.get("csv") or cfg.data.get("npz"))


def image_datamodule(cfg: DictConfig, splits: dict) -> ClassificationDataModule:
    """The loaders of a ViT run (classification or MAE)."""
    d, m = cfg.data, cfg.model
    return ClassificationDataModule(splits, int(m.img_size), int(m.in_chans), d.normalize, int(d.batch_size),
                                    tuple(d.crop_scale), int(d.randaug), int(d.num_workers))


def build_classification(cfg: DictConfig, run_dir: Path) -> TaskParts:
    """Task parts for ``bundle.task: classification``."""
    splits = classification_splits(cfg)
    train = splits["training"]
    if train.labels is None:
        raise ConfigError("data", "the classification data has no label columns")
    names = list(train.class_names)
    kwargs = model_kwargs(cfg, num_classes=len(names))
    warn_random_backbone(kwargs)
    network = build_network(**kwargs)
    t = cfg.task
    lr = PEFT_LR[cfg.model.peft] if t.lr is None else float(t.lr)
    task = ClassificationTask(network, len(names), train.multilabel, names, lr=lr,
                              weight_decay=t.weight_decay, layer_decay=t.layer_decay, warmup_epochs=t.warmup_epochs,
                              label_smoothing=t.label_smoothing, knn_k=t.knn_k, out_dir=str(run_dir))
    contract = {"img_size": int(kwargs["img_size"]), "in_chans": int(kwargs["in_chans"]),
                "normalize": cfg.data.normalize, "multilabel": bool(train.multilabel), "class_names": names}
    record = RunRecord("classification", cfg.bundle.template, network_spec(kwargs), contract,
                       {str(i): n for i, n in enumerate(names)}, image_source(cfg),
                       meta={"input_channels": int(kwargs["in_chans"]),
                             "input_spatial_shape": [int(kwargs["img_size"])] * 2}, validation_split="validation split")
    return TaskParts(task, image_datamodule(cfg, splits), "val/auroc", report_classification, record)


def report_classification(metrics: dict[str, float]) -> None:
    """Print the validation metrics."""
    names = ("auroc", "accuracy", "f1", "kappa", "knn_accuracy", "knn_auroc", "knn_frozen_accuracy",
             "knn_frozen_auroc")
    print("validation (best checkpoint): " + "  ".join(f"{n} {metrics[f'val/{n}']:.3f}" for n in names
                                                       if f"val/{n}" in metrics))
