"""Promptable segmentation as a LightningModule: iterative click training, per-prompt validation."""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceFocalLoss, DiceLoss
from monai.metrics import compute_dice, compute_surface_dice

from medimg.data.prompts import box_from_mask, sample_clicks
from medimg.errors import ConfigError
from medimg.models.sam.network import PromptableSAM


class PromptableTask(L.LightningModule):
    """Fine-tune a :class:`PromptableSAM` (2D) with simulated prompts.

    Each training step prompts every target with a jittered box (probability ``box_prob``) or a
    click, then runs ``click_rounds`` correction rounds: new clicks from the error region plus the
    previous low-res mask as a mask prompt, as in SAM/SAM-Med2D interactive training. The loss
    (Dice + BCE, or Dice + focal) is averaged over all rounds.

    Args:
        network: the promptable network (its freeze policy already applied).
        click_rounds: correction rounds per step.
        box_prob: probability that the first prompt is a box (else one click).
        box_jitter_frac: box jitter, as a fraction of the box size.
        loss: ``dice_bce`` or ``dice_focal``.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        nsd_tolerance_px: normalised surface Dice tolerance, in pixels of the model frame.
        seed: seed of the prompt simulation.
    """

    def __init__(self, network: PromptableSAM, click_rounds: int = 2, box_prob: float = 0.7,
                 box_jitter_frac: float = 0.1, loss: str = "dice_bce", lr: float = 1e-4, weight_decay: float = 1e-4,
                 nsd_tolerance_px: float = 2.0, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["network"])
        self.network = network
        if loss == "dice_bce":
            self.dice = DiceLoss(sigmoid=True)
            self.loss_fn = lambda logits, t: self.dice(logits, t) + F.binary_cross_entropy_with_logits(logits, t)
        elif loss == "dice_focal":
            self.loss_fn = DiceFocalLoss(sigmoid=True)
        else:
            raise ConfigError("task.loss", f"unknown loss {loss!r}; choose dice_bce or dice_focal")
        self.rng = np.random.default_rng(seed)
        self._emb_cache: dict[tuple, torch.Tensor] = {}

    def embed(self, batch: dict, split: str) -> torch.Tensor:
        """Image embeddings; cached per slice while the image encoder is frozen (its output cannot change)."""
        x = batch["image"]
        if any(p.requires_grad for p in self.network.image_encoder.parameters()):
            return self.network.encode(x)
        keys = [(split, int(v), int(k)) for v, k in zip(batch["volume"], batch["slice"])]
        missing = [i for i, key in enumerate(keys) if key not in self._emb_cache]
        if missing:
            with torch.no_grad():
                emb = self.network.encode(x[missing])
            for j, i in enumerate(missing):
                self._emb_cache[keys[i]] = emb[j].cpu()
        return torch.stack([self._emb_cache[key] for key in keys]).to(x.device)

    # ------------------------------------------------------------- prompt helpers
    def _low_res(self, target: torch.Tensor) -> torch.Tensor:
        """The target at the decoder's low-res mask size (4x the embedding grid: 256 for SAM-1024/LiteMedSAM)."""
        return F.interpolate(target, size=tuple(self.network.prompt_encoder.mask_input_size), mode="nearest")

    def _box(self, mask: np.ndarray, jitter: bool) -> list[float]:
        b = box_from_mask(mask.T, jitter_frac=self.hparams.box_jitter_frac if jitter else 0.0, rng=self.rng)
        return [float(v) for v in b]  # mask.T: (x=col, y=row) order, SAM's box convention

    def _clicks(self, target: np.ndarray, pred: np.ndarray | None, n: int) -> tuple[np.ndarray, np.ndarray]:
        pts, labels = sample_clicks(target, pred, num=n, rng=self.rng)
        return pts[:, ::-1].astype(np.float32), labels  # (row, col) -> (x, y)

    def _correction_clicks(self, masks_np: np.ndarray, low: torch.Tensor, clicks: list | None) -> list:
        """One more click per target from its current error region, appended to the clicks so far."""
        pred = (low.detach()[:, 0] > 0).cpu().numpy()
        new = [self._clicks(m, p, 1) for m, p in zip(masks_np, pred)]
        if clicks is None:
            return new
        return [(np.concatenate([c[0], n[0]]), np.concatenate([c[1], n[1]])) for c, n in zip(clicks, new)]

    def _decode(self, emb: torch.Tensor, boxes: list | None, points: list | None,
                masks: torch.Tensor | None) -> torch.Tensor:
        dev = emb.device
        box_t = torch.tensor(boxes, device=dev, dtype=torch.float32) if boxes is not None else None
        pts_t = None
        if points is not None:
            n = max(len(p[0]) for p in points)
            coords = torch.zeros(len(points), n, 2, device=dev)
            labels = torch.full((len(points), n), -1, device=dev, dtype=torch.int32)  # -1: padding point
            for i, (c, lab) in enumerate(points):
                coords[i, : len(c)] = torch.as_tensor(c.copy(), device=dev)
                labels[i, : len(lab)] = torch.as_tensor(lab, device=dev, dtype=torch.int32)
            pts_t = (coords, labels)
        low, _ = self.network.decode(emb, points=pts_t, boxes=box_t, masks=masks)
        return low

    # ------------------------------------------------------------- training
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """First prompt, then ``click_rounds`` correction rounds; loss averaged over rounds."""
        x, target = batch["image"], batch["target"]
        emb = self.embed(batch, "train")
        low_t = self._low_res(target)
        masks_np = (low_t[:, 0] > 0.5).cpu().numpy()
        use_box = self.rng.random() < self.hparams.box_prob
        boxes = [self._box(m, jitter=True) for m in masks_np] if use_box else None
        clicks = None if use_box else [self._clicks(m, None, 1) for m in masks_np]
        low = self._decode(emb, boxes, clicks, None)
        losses = [self.loss_fn(low, low_t)]
        for _ in range(int(self.hparams.click_rounds)):
            clicks = self._correction_clicks(masks_np, low, clicks)
            low = self._decode(emb, boxes, clicks, low.detach())
            losses.append(self.loss_fn(low, low_t))
        loss = torch.stack(losses).mean()
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=x.shape[0])
        return loss

    # ------------------------------------------------------------- validation
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Dice and NSD for a tight box, 1 click and 5 clicks (deterministic prompts)."""
        x, target = batch["image"], batch["target"]
        emb = self.embed(batch, "val")
        low_t = self._low_res(target)
        masks_np = (low_t[:, 0] > 0.5).cpu().numpy()
        rng_state = self.rng
        self.rng = np.random.default_rng(batch_idx)  # same clicks every epoch
        results: dict[str, torch.Tensor] = {}
        results["box"] = self._decode(emb, [self._box(m, jitter=False) for m in masks_np], None, None)
        clicks = [self._clicks(m, None, 1) for m in masks_np]
        low = self._decode(emb, None, clicks, None)
        results["point1"] = low
        for _ in range(4):
            clicks = self._correction_clicks(masks_np, low, clicks)
            low = self._decode(emb, None, clicks, low)
        results["point5"] = low
        self.rng = rng_state
        for name, logits in results.items():
            pred = (logits > 0).float()
            dice = compute_dice(pred, low_t, include_background=True, ignore_empty=False)
            nsd = compute_surface_dice(_two_class(pred), _two_class(low_t), [self.hparams.nsd_tolerance_px])
            self.log(f"val/dice_{name}", dice.nanmean(), batch_size=x.shape[0], prog_bar=name == "box")
            self.log(f"val/nsd_{name}", torch.nan_to_num(nsd).mean(), batch_size=x.shape[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW over the trainable parameters only."""
        params = [p for p in self.network.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


def _two_class(mask: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) binary -> (B, 2, H, W) one-hot, as MONAI's surface metrics expect."""
    return torch.cat([1 - mask, mask], dim=1)
