"""Promptable segmentation as a LightningModule: iterative click training, per-prompt validation.

One task for 2D (:class:`~medimg.models.sam.network.PromptableSAM`, slices) and 3D
(:class:`~medimg.models.sam3d.network.PromptableSAM3D`, click-centred patches): the network's
``spatial_dims`` decides the prompt coordinate order and the mask size, nothing else differs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceFocalLoss, DiceLoss
from monai.metrics import compute_dice, compute_surface_dice
from torch import nn

from medimg.data.promptable.simulation import box_from_mask, sample_clicks
from medimg.errors import ConfigError
from medimg.predictors.protocols import PromptableNetwork3D
from medimg.tasks.slice_features import SliceFeatures, cached_part, encoder_frozen


class PromptableTask(L.LightningModule):
    """Fine-tune a promptable SAM-family network (2D or 3D) with simulated prompts.

    Each training step prompts every target with a jittered box (probability ``box_prob``) or a
    click, then runs ``click_rounds`` correction rounds: new clicks from the error region plus the
    previous mask logits as a mask prompt, as in SAM/SAM-Med2D interactive training (8 or more
    rounds there). In 2D a lone first click is ambiguous: it is trained with SAM's three candidate
    masks, only the best counting (:meth:`_first_click_multimask`), and decoded at validation and
    inference as the candidate with the highest predicted IoU. The loss (Dice + BCE, or Dice +
    focal, plus the IoU head's MSE) is half the first prompt's, half the mean of the correction
    rounds'. When the batch carries a ``click`` (3D patches are centred on one), that is the first click.

    Coordinates: a 2D network takes SAM's ``(x, y)`` = (column, row); a 3D network takes voxel
    indices ``(i, j, k)`` of its ``(X, Y, Z)`` input. Validation reports Dice and NSD for a box and
    for 1, 3 and 5 clicks.

    Args:
        network: the promptable network (its freeze policy already applied).
        click_rounds: correction rounds per step.
        box_prob: probability that the first prompt is a box (else one click).
        box_jitter_frac: box jitter, as a fraction of the box size.
        loss: ``dice_bce`` or ``dice_focal``.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        nsd_tolerance_px: normalised surface Dice tolerance, in pixels of the model frame.
        click_loss_weight: weight of the 3D click-neighbourhood BCE (0: off).
        seed: seed of the prompt simulation.
        distill_weight: 2D: weight of the distillation toward the decoder as it was when training
            started, on ``distill_boxes`` random boxes per slice (:mod:`medimg.tasks.distill`): what
            the run does not tune on is not forgotten. 0: off.
        distill_boxes: random boxes per slice and step.
        rounds: ``all`` (every correction round trains) or ``last`` (RITM, Sofiiuk et al. 2022: 0 to
            ``click_rounds - 1`` rounds without gradients, then one that trains; a CPU step costs 1/4).
    """

    def __init__(self, network: nn.Module, click_rounds: int = 2, box_prob: float = 0.7,
                 box_jitter_frac: float = 0.1, loss: str = "dice_bce", lr: float = 1e-4, weight_decay: float = 1e-4,
                 nsd_tolerance_px: float = 2.0, click_loss_weight: float = 1.0, seed: int = 0,
                 distill_weight: float = 0.0, distill_boxes: int = 2, rounds: str = "all") -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["network"])
        self.network = network
        self.spatial_dims = 3 if isinstance(network, PromptableNetwork3D) else 2
        self.teacher = None
        if distill_weight > 0 and not isinstance(network, PromptableNetwork3D):
            from medimg.tasks.distill import DecoderTeacher

            self.teacher = DecoderTeacher(network, with_encoder=cached_part(network) == "stem")
        if loss == "dice_bce":
            self.dice = DiceLoss(sigmoid=True)
            self.loss_fn = lambda logits, t: self.dice(logits, t) + F.binary_cross_entropy_with_logits(logits, t)
        elif loss == "dice_focal":
            self.loss_fn = DiceFocalLoss(sigmoid=True)
        else:
            raise ConfigError("task.loss", f"unknown loss {loss!r}; choose dice_bce or dice_focal")
        self.rng = np.random.default_rng(seed)
        # 3D, final validation: the bundle's predictor class, set by the run, also measured on whole volumes
        self.volume_predictor: Callable[..., Any] | None = None
        self.features = SliceFeatures(network) if self.spatial_dims == 2 else None

    def on_fit_start(self) -> None:
        """The distillation teacher is the network as training starts (a resumed run keeps its checkpoint's)."""
        if self.teacher is not None and self.trainer.ckpt_path is None:
            self.teacher.snapshot(self.network)

    def _distillation(self, emb: torch.Tensor, batch: dict) -> torch.Tensor:
        """The tuned model against the teacher on random boxes over each slice's content.

        When the encoder's tail trains, the teacher decodes its own (as-started) embeddings.
        """
        from medimg.tasks.distill import distillation_loss, random_boxes

        k = int(self.hparams.distill_boxes)
        boxes = random_boxes(batch["image"], k, self.rng)
        student = self._decode(emb.repeat_interleave(k, 0), boxes, None, None)[0]
        teacher_emb = self.features.teacher(batch, "train", self.teacher.embed) if self.teacher.encoder else emb
        teacher = self.teacher.decode(teacher_emb.repeat_interleave(k, 0),
                                      torch.tensor(boxes, device=self.device, dtype=torch.float32))
        return distillation_loss(student, teacher)

    def on_train_epoch_start(self) -> None:
        """A frozen 2D image encoder stays in eval mode: its BatchNorm statistics must not drift.

        Otherwise the exported encoder would differ from the one whose (cached) embeddings were
        validated, and the bundle would not reproduce the validation metrics. The same holds when
        only its adapters / LoRA (``encoder_adapters``) or its tail (``encoder_tail``) train: the
        pretrained layers' statistics stay as released.
        """
        if self.features is not None and (encoder_frozen(self.network, except_peft=True) or self.features.part):
            self.network.image_encoder.eval()

    def embed(self, batch: dict, split: str) -> Any:
        """Image features; in 2D the frozen encoder part is computed once per slice (``slice_features``)."""
        return self.network.encode(batch["image"]) if self.features is None else self.features.embed(batch, split)

    # ------------------------------------------------------------- prompt helpers
    def _low_res(self, target: torch.Tensor) -> torch.Tensor:
        """The target at the decoder's mask size (2D: 4x the embedding grid; 3D: full resolution)."""
        size = tuple(self.network.mask_size(target))
        return target if size == tuple(target.shape[2:]) else F.interpolate(target, size=size, mode="nearest")

    def _box(self, mask: np.ndarray, jitter: bool) -> list[float]:
        mask = mask.T if self.spatial_dims == 2 else mask  # 2D: (x=col, y=row) order, SAM's box convention
        b = box_from_mask(mask, jitter_frac=self.hparams.box_jitter_frac if jitter else 0.0, rng=self.rng)
        return [float(v) for v in b]

    def _clicks(self, target: np.ndarray, pred: np.ndarray | None, n: int) -> tuple[np.ndarray, np.ndarray]:
        pts, labels = sample_clicks(target, pred, num=n, rng=self.rng)
        if self.spatial_dims == 2:
            pts = pts[:, ::-1]  # (row, col) -> (x, y)
        return pts.astype(np.float32), labels

    def _first_clicks(self, batch: dict, masks_np: np.ndarray) -> list:
        if "click" in batch:  # the sample's own click (3D patches are centred on it)
            return [(c.cpu().numpy()[None].astype(np.float32), np.ones(1, dtype=np.int64)) for c in batch["click"]]
        return [self._clicks(m, None, 1) for m in masks_np]

    def _correction_clicks(self, masks_np: np.ndarray, low: torch.Tensor, clicks: list | None) -> list:
        """One more click per target from its current error region, appended to the clicks so far."""
        pred = (low.detach()[:, 0] > 0).cpu().numpy()
        new = [self._clicks(m, p, 1) for m, p in zip(masks_np, pred)]
        if clicks is None:
            return new
        return [(np.concatenate([c[0], n[0]]), np.concatenate([c[1], n[1]])) for c, n in zip(clicks, new)]

    def _decode(self, emb: Any, boxes: list | None, points: list | None, masks: torch.Tensor | None,
                multimask: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode prompts; 2D: a lone click takes the best of SAM's three masks (``decode_best``), as users get.

        ``multimask``: return all three candidates instead (2D training of the first click).
        """
        dev = self.device
        box_t = torch.tensor(boxes, device=dev, dtype=torch.float32) if boxes is not None else None
        pts_t = self._points_tensor(points) if points is not None else None
        if multimask:
            return self.network.decode(emb, points=pts_t, boxes=box_t, masks=masks, multimask_output=True)
        if self.spatial_dims == 2:
            return self.network.decode_best(emb, points=pts_t, boxes=box_t, masks=masks)
        return self.network.decode(emb, points=pts_t, boxes=box_t, masks=masks)

    def _first_click_multimask(self, emb: Any, clicks: list, target: torch.Tensor,
                               region: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM's training of an ambiguous single click: three candidates, the loss of the best one only.

        The mask loss is each target's smallest over the candidates; the IoU head learns all three
        candidates' actual IoUs. The candidate with the highest *predicted* IoU goes on to the next
        round, as at inference. Returns ``(loss, that candidate's logits)``.
        """
        low3, iou3 = self._decode(emb, None, clicks, None, multimask=True)
        low3 = self._masked(low3, region)
        per = torch.stack([torch.stack([self.loss_fn(low3[b:b + 1, m:m + 1], target[b:b + 1])
                                        for m in range(low3.shape[1])]) for b in range(low3.shape[0])])
        loss = per.min(1).values.mean() + F.mse_loss(iou3.float(), _actual_iou(low3, target).float())
        rows = torch.arange(low3.shape[0], device=low3.device)
        return loss, low3[rows, iou3.argmax(1)][:, None]

    def _points_tensor(self, points: list) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-target click lists -> padded ``(coords (B, N, d), labels (B, N))`` (-1: padding)."""
        n = max(len(p[0]) for p in points)
        coords = torch.zeros(len(points), n, self.spatial_dims, device=self.device)
        labels = torch.full((len(points), n), -1, device=self.device, dtype=torch.int32)
        for i, (c, lab) in enumerate(points):
            coords[i, : len(c)] = torch.as_tensor(c.copy(), device=self.device)
            labels[i, : len(lab)] = torch.as_tensor(lab, device=self.device, dtype=torch.int32)
        return coords, labels

    def _loss(self, low: torch.Tensor, iou: torch.Tensor, target: torch.Tensor,
              clicks: list | None = None) -> torch.Tensor:
        """Mask loss + the IoU head's MSE against the mask's actual IoU (as SAM trains it).

        In 3D, plus a click-neighbourhood BCE: voxels near a click (Gaussian weight, 2 voxels) are
        weighted on their own, so the model gets the clicked structure right where the user
        pointed. Without it a tissue-class model can be right on average and wrong at the click.
        """
        loss = self.loss_fn(low, target) + F.mse_loss(iou[:, 0].float(), _actual_iou(low, target)[:, 0].float())
        if clicks and self.spatial_dims == 3 and self.hparams.click_loss_weight:
            from medimg.models.sam3d.heads import prompt_guide

            pts = self._points_tensor(clicks)
            near = prompt_guide(torch.zeros_like(target), pts, None, None, sigma=2.0)[:, 1:3].amax(1, keepdim=True)
            bce = F.binary_cross_entropy_with_logits(low, target, weight=near, reduction="sum")
            bce = bce / near.sum().clamp(min=1)
            loss = loss + self.hparams.click_loss_weight * bce
        return loss

    # ------------------------------------------------------------- training
    def _region(self, batch: dict) -> torch.Tensor | None:
        """The sample's supervision region (``weight``, 3D patches with a region split), if any."""
        w = batch.get("weight")
        return None if w is None else self._low_res(w)

    @staticmethod
    def _masked(logits: torch.Tensor, region: torch.Tensor | None) -> torch.Tensor:
        """Logits outside the region pushed to certain background: they add nothing to any loss or metric."""
        return logits if region is None else logits.masked_fill(region == 0, -1e4)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """First prompt, then ``click_rounds`` correction rounds (the loss weighting is in the class docstring)."""
        x, target = batch["image"], batch["target"]
        emb = self.embed(batch, "train")
        region = self._region(batch)
        low_t = self._low_res(target) if region is None else self._low_res(target) * region
        masks_np = (low_t[:, 0] > 0.5).cpu().numpy()
        use_box = self.rng.random() < self.hparams.box_prob
        boxes = [self._box(m, jitter=True) for m in masks_np] if use_box else None
        clicks = None if use_box else self._first_clicks(batch, masks_np)
        if clicks is not None and self.spatial_dims == 2:
            first, low = self._first_click_multimask(emb, clicks, low_t, region)
            losses = [first]
        else:
            low, iou = self._decode(emb, boxes, clicks, None)
            losses = [self._loss(self._masked(low, region), iou, low_t, clicks)]
        rounds = int(self.hparams.click_rounds)
        if self.hparams.rounds == "last" and rounds:  # RITM: every round depth, a fraction of the cost
            with torch.no_grad():
                for _ in range(int(self.rng.integers(0, rounds))):
                    clicks = self._correction_clicks(masks_np, self._masked(low, region), clicks)
                    low = self._decode(emb, boxes, clicks, low.detach())[0]
            rounds = 1
        for _ in range(rounds):
            clicks = self._correction_clicks(masks_np, self._masked(low, region), clicks)
            low, iou = self._decode(emb, boxes, clicks, low.detach())
            losses.append(self._loss(self._masked(low, region), iou, low_t, clicks))
        # the first prompt weighs as much as all correction rounds together: with 8 rounds a plain mean
        # would leave a lone click, the prompt users try first, 1/9 of the signal
        loss = losses[0] if len(losses) == 1 else 0.5 * (losses[0] + torch.stack(losses[1:]).mean())
        if self.teacher is not None:
            distill = self._distillation(emb, batch)
            self.log("train/distill", distill, on_step=False, on_epoch=True, batch_size=x.shape[0])
            loss = loss + self.hparams.distill_weight * distill
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=x.shape[0])
        return loss

    # ------------------------------------------------------------- validation
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Dice and NSD for a tight box, 1, 3 and 5 clicks (deterministic prompts).

        2D slices are measured at their own resolution, with prompts in their own pixels, exactly
        as a predictor answers a user (``medimg.infer`` reproduces these numbers); 3D patches in the
        network's frame, as the 3D predictor's windows are.
        """
        x, target = batch["image"], batch["target"]
        emb = self.embed(batch, "val")
        if self.spatial_dims == 2 and "mask" in batch:
            self._validate_native(batch, emb, batch_idx)
            return
        if self.volume_predictor is not None and "volume_click" in batch:
            self._validate_volume(batch, batch_idx)
        region = self._region(batch)
        low_t = self._low_res(target) if region is None else self._low_res(target) * region
        masks_np = (low_t[:, 0] > 0.5).cpu().numpy()
        rng_state = self.rng
        self.rng = np.random.default_rng(batch_idx)  # same clicks every epoch
        results: dict[str, torch.Tensor] = {}
        box_logits = self._decode(emb, [self._box(m, jitter=False) for m in masks_np], None, None)[0]
        results["box"] = self._masked(box_logits, region)
        clicks = self._first_clicks(batch, masks_np)
        low = self._decode(emb, None, clicks, None)[0]
        results["point1"] = self._masked(low, region)
        for n in range(2, 6):
            clicks = self._correction_clicks(masks_np, self._masked(low, region), clicks)
            low = self._decode(emb, None, clicks, low)[0]
            if n in (3, 5):
                results[f"point{n}"] = self._masked(low, region)
        self.rng = rng_state
        for name, logits in results.items():
            pred = (logits > 0).float()
            dice = compute_dice(pred, low_t, include_background=True, ignore_empty=False)
            nsd = compute_surface_dice(_two_class(pred), _two_class(low_t), [self.hparams.nsd_tolerance_px])
            self.log(f"val/dice_{name}", dice.nanmean(), batch_size=x.shape[0], prog_bar=name == "box")
            self.log(f"val/nsd_{name}", torch.nan_to_num(nsd).mean(), batch_size=x.shape[0])

    def _validate_native(self, batch: dict, emb: torch.Tensor, batch_idx: int) -> None:
        """2D validation at each slice's own resolution (box tight on the slice's mask; error-region clicks)."""
        net = self.network
        scores: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for i in range(emb.shape[0]):
            rows, cols = (int(v) for v in batch["size"][i])
            truth = batch["mask"][i : i + 1, :, :rows, :cols]
            truth_np = truth[0, 0].cpu().numpy() > 0.5
            rng = np.random.default_rng((batch_idx, i))

            def decode(box=None, clicks=None, mask_in=None, e=emb[i : i + 1], size=(rows, cols)):
                b = p = None
                if box is not None:
                    b = net.scale_coords(torch.tensor(box, device=self.device).view(2, 2), size).view(1, 4)
                if clicks is not None:
                    coords = net.scale_coords(torch.as_tensor(clicks[0], device=self.device), size)
                    p = (coords[None], torch.as_tensor(clicks[1], device=self.device)[None].int())
                low = net.decode_best(e, points=p, boxes=b, masks=mask_in)[0]
                return low, net.postprocess(low, net.resized_size(*size), size)

            def clicks_from(pred, so_far, truth_np=truth_np, rng=rng):
                pts, labels = sample_clicks(truth_np, pred, num=1, rng=rng)
                new = (pts[:, ::-1].astype(np.float32), labels)  # (row, col) -> (x, y)
                return new if so_far is None else (np.concatenate([so_far[0], new[0]]),
                                                   np.concatenate([so_far[1], new[1]]))

            box = [float(v) for v in box_from_mask(truth_np.T)]
            scores.setdefault("box", []).append((decode(box=box)[1] > 0, truth))
            clicks = clicks_from(None, None)
            low, full = decode(clicks=clicks)
            scores.setdefault("point1", []).append((full > 0, truth))
            for n in range(2, 6):
                clicks = clicks_from((full[0, 0] > 0).cpu().numpy(), clicks)
                low, full = decode(clicks=clicks, mask_in=low)
                if n in (3, 5):
                    scores.setdefault(f"point{n}", []).append((full > 0, truth))
        for name, pairs in scores.items():
            dice = torch.stack([compute_dice(p.float(), t, include_background=True, ignore_empty=False)[0, 0]
                                for p, t in pairs])
            nsd = torch.stack([torch.nan_to_num(compute_surface_dice(
                _two_class(p.float()), _two_class(t), [self.hparams.nsd_tolerance_px]))[0, 0] for p, t in pairs])
            self.log(f"val/dice_{name}", dice.mean(), batch_size=len(pairs), prog_bar=name == "box")
            self.log(f"val/nsd_{name}", nsd.mean(), batch_size=len(pairs))

    def _validate_volume(self, batch: dict, batch_idx: int) -> None:
        """3D: the bundle's own predictor on the whole validation volume, from each fixed validation click.

        Grows windows from the click (or inside the target's tight box) exactly as ``medimg.infer``
        does; Dice is measured inside the validation region against the target part connected to the
        click. Logged as ``val/volume_dice_box`` and ``val/volume_dice_point1``: the numbers users get.
        (Correction clicks stay with the per-epoch patch metrics: each whole-volume prediction costs
        a full window sweep.) The predictor class is :attr:`volume_predictor`, given by the run: a task
        does not import the predictors.
        """
        dataset = self.trainer.datamodule.val_set
        predictor = self.volume_predictor(self.network, device=self.device, roi_size=batch["image"].shape[2:],
                                           pixdim=None, intensity="none", amp=False)
        scores: dict[str, list[float]] = {}
        for i in range(batch["image"].shape[0]):
            vi, t = int(batch["volume"][i]), int(batch["target_index"][i])
            click = batch["volume_click"][i].cpu().numpy()
            truth, region = dataset.volume_target(t, click.astype(int))
            predictor.volume = dataset.images[vi]

            def dice(prob: np.ndarray, truth: np.ndarray = truth, region: np.ndarray | None = region) -> float:
                pred = prob > 0.5 if region is None else (prob > 0.5) & region
                return float(2 * (pred & truth).sum() / max(pred.sum() + truth.sum(), 1))

            scores.setdefault("box", []).append(dice(predictor.predict_probability(box=box_from_mask(truth))))
            prob = predictor.predict_probability(points=click[None].astype(np.float64),
                                                 point_labels=np.ones(1, dtype=np.int64))
            scores.setdefault("point1", []).append(dice(prob))
        for name, values in scores.items():
            self.log(f"val/volume_dice_{name}", float(np.mean(values)), batch_size=len(values))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW over the trainable parameters only."""
        params = [p for p in self.network.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


@torch.no_grad()
def _actual_iou(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of each mask channel (logits > 0) with the target: ``(B, M)``, what the IoU head learns."""
    pred, truth = logits > 0, target > 0.5
    return (pred & truth).flatten(2).sum(2) / (pred | truth).flatten(2).sum(2).clamp(min=1)


def _two_class(mask: torch.Tensor) -> torch.Tensor:
    """(B, 1, *spatial) binary -> (B, 2, *spatial) one-hot, as MONAI's surface metrics expect."""
    return torch.cat([1 - mask, mask], dim=1)
