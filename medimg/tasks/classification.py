"""Multi-class / multi-label image classification as a LightningModule that receives its network.

Validation reports macro AUROC, accuracy, macro F1 and (multi-class) quadratic-weighted Cohen's
kappa through torchmetrics; a kNN classifier (the DINOv2 protocol) on the pooled features of the
backbone as it was before training (``knn_frozen_*``: the pretrained, frozen features) and as it is
now (``knn_*``); and writes a confusion-matrix PNG each epoch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics import classification as tm

from medimg.tasks.schedule import epoch_schedule


def knn_predict(train_feats: torch.Tensor, train_labels: torch.Tensor, feats: torch.Tensor, num_classes: int,
                k: int = 20, temperature: float = 0.07, multilabel: bool = False) -> torch.Tensor:
    """Weighted kNN on cosine similarity (the DINO evaluation): class scores (N, num_classes).

    Args:
        train_feats: memory-bank features (M, D).
        train_labels: their labels: (M,) indices, or (M, K) 0/1 for multi-label.
        feats: query features (N, D).
        num_classes: classes (or labels).
        k: neighbours.
        temperature: softmax temperature of the similarity weights.
        multilabel: labels are (M, K).
    """
    bank, query = F.normalize(train_feats.float(), dim=1), F.normalize(feats.float(), dim=1)
    sim, idx = (query @ bank.T).topk(min(k, bank.shape[0]), dim=1)
    weights = (sim / temperature).exp()
    votes = train_labels[idx].float() if multilabel else F.one_hot(train_labels[idx], num_classes).float()
    scores = (weights[..., None] * votes).sum(1)
    return scores / weights.sum(1, keepdim=True)


def metric_collection(num_classes: int, multilabel: bool, prefix: str) -> MetricCollection:
    """AUROC (macro), accuracy, F1 (macro) and, multi-class, quadratic-weighted Cohen's kappa.

    torchmetrics keeps the states and syncs them across DDP processes on ``compute()``.
    """
    n = num_classes
    if multilabel:
        metrics = {"auroc": tm.MultilabelAUROC(n, average="macro"), "accuracy": tm.MultilabelAccuracy(n),
                   "f1": tm.MultilabelF1Score(n, average="macro")}
    else:
        metrics = {"auroc": tm.MulticlassAUROC(n, average="macro"),
                   "accuracy": tm.MulticlassAccuracy(n, average="micro"),
                   "f1": tm.MulticlassF1Score(n, average="macro"),
                   "kappa": tm.MulticlassCohenKappa(n, weights="quadratic")}
    return MetricCollection(metrics, prefix=prefix)


class ClassificationTask(L.LightningModule):
    """Cross-entropy (multi-class) or BCE (multi-label) fine-tuning.

    Args:
        network: a classifier with ``features(x)`` (pooled) and ``head`` (e.g. ``ViTClassifier``).
        num_classes: classes, or labels for multi-label.
        multilabel: independent sigmoid labels.
        class_names: names for logs and the confusion matrix.
        lr: base learning rate (the head's; blocks get less with ``layer_decay``).
        weight_decay: AdamW weight decay.
        layer_decay: layer-wise LR decay for a trainable backbone (1.0: off).
        warmup_epochs: linear warm-up before cosine decay.
        label_smoothing: multi-class label smoothing.
        knn_k: neighbours of the kNN evaluation (0: off).
        out_dir: run folder (confusion matrices go to ``out_dir/confusion``).
    """

    def __init__(self, network: nn.Module, num_classes: int, multilabel: bool = False,
                 class_names: Sequence[str] | None = None, lr: float = 1e-3, weight_decay: float = 0.05,
                 layer_decay: float = 1.0, warmup_epochs: int = 1, label_smoothing: float = 0.0, knn_k: int = 20,
                 out_dir: str | Path | None = None) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["network"])
        self.network = network
        self.class_names = list(class_names) if class_names else [f"class{i}" for i in range(num_classes)]
        self.val_metrics = metric_collection(num_classes, multilabel, "val/")
        self.knn_metrics = metric_collection(num_classes, multilabel, "val/knn_")
        self.confusion = None if multilabel else tm.MulticlassConfusionMatrix(num_classes)
        self._val: list[tuple[torch.Tensor, torch.Tensor]] = []  # features and labels, for the kNN
        self._frozen_knn: dict[str, float] = {}  # kNN scores of the backbone before training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits."""
        return self.network(x)

    def _loss(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        if self.hparams.multilabel:
            return F.binary_cross_entropy_with_logits(logits, label.float())
        return F.cross_entropy(logits, label.long(), label_smoothing=self.hparams.label_smoothing)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """One step."""
        loss = self._loss(self.network(batch["image"]), batch["label"])
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=batch["image"].shape[0])
        return loss

    def _probs(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.sigmoid() if self.hparams.multilabel else logits.softmax(1)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Collect probabilities, labels and pooled features."""
        feats = self.network.features(batch["image"])
        logits = self.network.head(feats)
        self.log("val/loss", self._loss(logits, batch["label"]), batch_size=feats.shape[0], sync_dist=True)
        probs, target = self._probs(logits).float(), batch["label"].long()
        self.val_metrics.update(probs, target)
        if self.confusion is not None:
            self.confusion.update(probs, target)
        self._val.append((feats.float(), batch["label"]))

    @torch.no_grad()
    def _features(self, loader: object) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled features and labels over a loader, in eval mode (no dropout / drop-path)."""
        was_training = self.network.training
        self.network.eval()
        feats, labels = [], []
        for batch in loader:
            feats.append(self.network.features(batch["image"].to(self.device)).float())
            labels.append(batch["label"].to(self.device))
        self.network.train(was_training)
        return torch.cat(feats), torch.cat(labels)

    def _knn_loader(self) -> object | None:
        dm = getattr(self.trainer, "datamodule", None)
        if not self.hparams.knn_k or dm is None or not hasattr(dm, "knn_dataloader"):
            return None
        return dm.knn_dataloader()

    def _knn(self, feats: torch.Tensor) -> torch.Tensor | None:
        loader = self._knn_loader()
        if loader is None or self.trainer.sanity_checking:
            return None
        return knn_predict(*self._features(loader), feats, self.hparams.num_classes, self.hparams.knn_k,
                           multilabel=self.hparams.multilabel)

    def on_train_start(self) -> None:
        """Score a kNN on the backbone's features before any training (the pretrained, frozen ones)."""
        self._frozen_knn = {}
        loader = self._knn_loader()
        if loader is None or self.trainer.global_step > 0:  # resumed runs have no untouched backbone
            return
        bank = self._features(loader)
        feats, labels = self._features(self.trainer.datamodule.val_dataloader())
        scores = knn_predict(*bank, feats, self.hparams.num_classes, self.hparams.knn_k,
                             multilabel=self.hparams.multilabel)
        frozen = metric_collection(self.hparams.num_classes, self.hparams.multilabel, "").to(self.device)
        frozen.update(scores, labels.long())
        self._frozen_knn = {k: float(v) for k, v in frozen.compute().items() if k in ("accuracy", "auroc")}

    def on_validation_epoch_end(self) -> None:
        """Epoch metrics (synced across DDP processes by torchmetrics), kNN metrics, the confusion-matrix PNG."""
        if not self._val:
            return
        # every rank computes the same synced values and logs them: the checkpoint callback monitors
        # val/auroc on all ranks (rank_zero_only broke it under DDP)
        values = self.val_metrics.compute()
        self.val_metrics.reset()
        for name, value in values.items():
            self.log(name, value, prog_bar=name in ("val/auroc", "val/kappa"))
        feats = torch.cat([f for f, _ in self._val])
        target = torch.cat([t for _, t in self._val]).long()
        self._val.clear()
        knn = self._knn(feats)
        if knn is not None:
            self.knn_metrics.update(knn, target)
            for name, value in self.knn_metrics.compute().items():
                if name in ("val/knn_accuracy", "val/knn_auroc"):
                    self.log(name, value)
        self.knn_metrics.reset()
        if not self.trainer.sanity_checking:
            for name, value in self._frozen_knn.items():
                self.log(f"val/knn_frozen_{name}", value, sync_dist=True)
        if self.confusion is not None:
            matrix = self.confusion.compute()
            if self.hparams.out_dir and self.trainer.is_global_zero and not self.trainer.sanity_checking:
                self._save_confusion(matrix)
            self.confusion.reset()

    def _save_confusion(self, matrix: torch.Tensor) -> None:
        """Save torchmetrics' own confusion-matrix plot as a PNG (one per epoch)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = self.confusion.plot(matrix, labels=self.class_names)
        acc = float(matrix.diag().sum() / matrix.sum().clamp_min(1))
        ax.set_title(f"epoch {self.current_epoch}  accuracy {acc:.3f}", fontsize=9)
        path = Path(self.hparams.out_dir) / "confusion" / f"epoch_{self.current_epoch:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=80)
        plt.close(fig)

    def configure_optimizers(self) -> dict:
        """AdamW (layer-wise LR decay when the backbone trains and ``layer_decay < 1``), warm-up + cosine."""
        from medimg.models.vit.network import layer_decay_groups

        hp = self.hparams
        backbone_trains = any(p.requires_grad for p in getattr(self.network, "backbone", nn.Module()).parameters())
        if hp.layer_decay < 1.0 and backbone_trains:
            groups = layer_decay_groups(self.network, hp.lr, hp.weight_decay, hp.layer_decay)
        else:
            groups = [{"params": [p for p in self.network.parameters() if p.requires_grad]}]
        opt = torch.optim.AdamW(groups, lr=hp.lr, weight_decay=hp.weight_decay)
        return {"optimizer": opt, "lr_scheduler": epoch_schedule(opt, int(self.trainer.max_epochs or 1),
                                                                hp.warmup_epochs)}

