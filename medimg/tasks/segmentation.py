"""Supervised segmentation as a LightningModule that receives its network."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import SliceInferer, sliding_window_inference
from monai.losses import DiceCELoss, MaskedDiceLoss
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice
from monai.networks.utils import one_hot
from torch import nn

from medimg.data.postprocess import keep_main_component, spacing_of
from medimg.data.refine import refine_with_intensities
from medimg.data.transforms import IGNORE_LABEL
from medimg.errors import ConfigError
from medimg.tasks.overlay import save_overlay
from medimg.tasks.schedule import epoch_schedule


class SegmentationTask(L.LightningModule):
    """DiceCE training, sliding-window validation with per-class Dice, HD95 and surface Dice.

    Label voxels equal to :data:`~medimg.data.transforms.IGNORE_LABEL` (another region of a
    region split) count in no loss and no metric.

    Args:
        network: any ``nn.Module`` mapping ``(B, C, *spatial)`` to ``(B, num_classes, *spatial)``.
        num_classes: classes including background.
        class_names: names for logging (default ``class1``...).
        roi_size: sliding-window size for validation.
        sw_batch_size: windows per forward pass.
        overlap: sliding-window overlap.
        lr: learning rate.
        weight_decay: weight decay.
        optimizer: ``adamw`` or ``sgd`` (momentum 0.9, Nesterov).
        warmup_epochs: linear warm-up before the cosine decay.
        surface_tolerance_mm: tolerance of the normalised surface Dice.
        overlay_dir: where the per-epoch PNG overlays go (``None``: none).
        slice_axis: for a 2D network: validate slice by slice along this spatial axis of the
            volume (MONAI ``SliceInferer``; ``roi_size`` is then the 2D tile).
        invert: maps ``{"image", "pred"}`` (softmax probabilities in the model's space) back onto
            the input's own grid, the way the bundle's postprocessing does (MONAI ``Invertd`` over the
            validation pipeline). When given, and the batch holds ``native_label`` (the label as
            stored), metrics are measured there: on the grid where users get predictions, so
            ``medimg.infer`` on a validation volume reproduces them.
        main_component_opening_mm: when given, validation also logs ``val/dice_main_component``:
            the mean Dice after :func:`~medimg.data.postprocess.keep_main_component` with this
            opening, which export uses to decide whether the bundle applies it.
        refine_intensities: validation also logs ``val/dice_refined``: the mean Dice after
            :func:`~medimg.data.refine.refine_with_intensities` (the scan's own intensities fitted
            under the softmax as prior), which export uses to decide whether the bundle applies it.
    """

    def __init__(self, network: nn.Module, num_classes: int, class_names: Sequence[str] | None = None,
                 roi_size: Sequence[int] = (64, 64, 64), sw_batch_size: int = 2, overlap: float = 0.25,
                 lr: float = 1e-3, weight_decay: float = 1e-5, optimizer: str = "adamw", warmup_epochs: int = 0,
                 surface_tolerance_mm: float = 2.0, overlay_dir: str | Path | None = None,
                 slice_axis: int | None = None, invert: Callable[[dict], dict] | None = None,
                 main_component_opening_mm: float | None = None, refine_intensities: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["network", "invert"])
        self.network = network
        self.invert = invert
        self.loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
        self.masked_dice = MaskedDiceLoss(softmax=True)
        self.class_names = list(class_names) if class_names else [f"class{i}" for i in range(num_classes)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch."""
        return self.network(x)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """One DiceCE step (labels equal to :data:`IGNORE_LABEL` add nothing to it)."""
        logits, label = self.network(batch["image"]), batch["label"]
        known = label != IGNORE_LABEL
        if bool(known.all()):
            loss = self.loss_fn(logits, label)
        else:
            loss = self._masked_loss(logits, label, known)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True,
                 batch_size=batch["image"].shape[0], sync_dist=True)
        return loss

    def _masked_loss(self, logits: torch.Tensor, label: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
        """DiceCE over the known voxels only (MONAI ``MaskedDiceLoss`` + cross-entropy ignoring the rest)."""
        if not bool(known.any()):
            return logits.sum() * 0.0
        # one-hot before masking: MONAI masks the target first, and an index 0 would count as background
        target = one_hot(torch.where(known, label, torch.zeros_like(label)), logits.shape[1])
        dice = self.masked_dice(logits, target, known.to(logits.dtype))
        ce = F.cross_entropy(logits, label[:, 0].long(), ignore_index=IGNORE_LABEL)
        return dice + ce

    def predict_volume(self, image: torch.Tensor) -> torch.Tensor:
        """Sliding-window logits for whole volumes (slice by slice for a 2D network)."""
        if self.hparams.slice_axis is not None:
            inferer = SliceInferer(roi_size=list(self.hparams.roi_size), sw_batch_size=self.hparams.sw_batch_size,
                                   spatial_dim=int(self.hparams.slice_axis), overlap=self.hparams.overlap,
                                   mode="gaussian", progress=False)
            return inferer(image, self.network)
        return sliding_window_inference(image, list(self.hparams.roi_size), self.hparams.sw_batch_size,
                                        self.network, overlap=self.hparams.overlap, mode="gaussian")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Per-class Dice, HD95 (mm) and surface Dice (mm tolerance) on one volume."""
        # plain tensors from here: MetaTensors would leak into logged metrics and checkpoints
        image, label = _plain(batch["image"]), _plain(batch["label"])
        logits = self.predict_volume(image)
        nc = self.hparams.num_classes
        pred = logits.argmax(1, keepdim=True)
        overlay = (image[0, 0], label[0, 0] * (label[0, 0] != IGNORE_LABEL), pred[0, 0])
        native = self.invert is not None and "native_label" in batch
        probs = torch.softmax(logits.float(), dim=1)
        if native:
            spacing = spacing_of(batch["native_label"], batch["native_label"].ndim - 2)
            label = _plain(batch["native_label"])
            pred = self._native_prediction(batch["image"], probs)
        else:
            spacing = spacing_of(batch["image"], batch["image"].ndim - 2)
        known = label != IGNORE_LABEL  # a region split's other region: no metric there
        label_oh = one_hot((label * known).long(), nc)

        def log_variant(name: str, variant: torch.Tensor) -> None:  # the mean Dice of a post-processed prediction
            variant_dice = compute_dice(one_hot(variant * known.to(variant.device), nc), label_oh,
                                        include_background=False, ignore_empty=False)[0]
            self.log(name, torch.nanmean(variant_dice.float()), batch_size=1, sync_dist=True)

        if self.hparams.refine_intensities:  # in the model's space, before the inversion, as a bundle does it
            refined = torch.as_tensor(refine_with_intensities(probs[0].cpu().numpy(),
                                                              image[0, 0].float().cpu().numpy()))[None].to(probs.device)
            log_variant("val/dice_refined", self._native_prediction(batch["image"], refined) if native
                        else refined.argmax(1, keepdim=True))
        if self.hparams.main_component_opening_mm is not None:  # on the whole prediction, as a bundle would
            kept = keep_main_component(pred[0, 0].cpu().numpy(), spacing, float(self.hparams.main_component_opening_mm))
            log_variant("val/dice_main_component", torch.as_tensor(kept, device=pred.device)[None, None])
        pred = pred * known.to(pred.device)
        pred_oh = one_hot(pred, nc)
        dice = compute_dice(pred_oh, label_oh, include_background=False, ignore_empty=False)[0]
        hd95 = compute_hausdorff_distance(pred_oh, label_oh, include_background=False, percentile=95,
                                          spacing=spacing)[0]
        nsd = compute_surface_dice(pred_oh, label_oh, [self.hparams.surface_tolerance_mm] * (nc - 1),
                                   include_background=False, spacing=spacing)[0]
        worst = float(np.linalg.norm(np.asarray(image.shape[2:]) * np.asarray(spacing)))
        for c, name in enumerate(self.class_names[1:]):
            h = float(hd95[c])
            self.log(f"val/dice_{name}", dice[c].float(), batch_size=1, sync_dist=True)
            # an empty prediction or label has no distance: count it as the worst case
            self.log(f"val/hd95_{name}", h if math.isfinite(h) else worst, batch_size=1, sync_dist=True)
            self.log(f"val/nsd_{name}", torch.nan_to_num(nsd[c].float(), nan=0.0), batch_size=1, sync_dist=True)
        self.log("val/dice", torch.nanmean(dice.float()), prog_bar=True, batch_size=1, sync_dist=True)
        if batch_idx == 0 and self.hparams.overlay_dir and self.trainer.is_global_zero:
            save_overlay(overlay[0].float().cpu().numpy(), overlay[1].cpu().numpy(), overlay[2].cpu().numpy(),
                         Path(self.hparams.overlay_dir) / f"epoch_{self.current_epoch:03d}.png",
                         title=f"epoch {self.current_epoch}  Dice {float(torch.nanmean(dice.float())):.3f}")

    def _native_prediction(self, image: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """Probabilities inverted onto the input's grid (bilinear), argmax: the bundle's postprocessing."""
        from monai.data import MetaTensor, decollate_batch

        item = decollate_batch({"image": image.cpu() if hasattr(image, "cpu") else image,
                                "pred": MetaTensor(probs.float().cpu())})[0]
        pred = _plain(self.invert(item)["pred"])
        return pred.argmax(0, keepdim=True)[None].to(probs.device)

    def configure_optimizers(self) -> dict:
        """AdamW (or SGD) with linear warm-up then cosine decay over ``max_epochs``."""
        params = [p for p in self.network.parameters() if p.requires_grad]
        if self.hparams.optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=self.hparams.lr, momentum=0.9, nesterov=True,
                                  weight_decay=self.hparams.weight_decay)
        elif self.hparams.optimizer == "adamw":
            opt = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        else:
            raise ConfigError("task.optimizer", f"unknown optimizer {self.hparams.optimizer!r}; choose adamw or sgd")
        return {"optimizer": opt,
                "lr_scheduler": epoch_schedule(opt, int(self.trainer.max_epochs or 1), int(self.hparams.warmup_epochs))}


def _plain(x: torch.Tensor) -> torch.Tensor:
    """A MetaTensor's data as a plain tensor."""
    return x.as_tensor() if hasattr(x, "as_tensor") else x
