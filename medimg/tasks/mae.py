"""MAE self-supervised pre-training as a LightningModule that receives an ``MAEPretrainer``."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch import nn

from medimg.tasks.schedule import epoch_schedule


def save_reconstruction(image: torch.Tensor, masked: torch.Tensor, recon: torch.Tensor, path: Path,
                        title: str) -> None:
    """Original | visible patches (hidden ones blue) | reconstruction, first channel, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(7.5, 2.8))
    first = np.asarray(image[0].float().cpu())
    lo, hi = float(first.min()), float(first.max())
    cmap = matplotlib.colormaps["gray"].with_extremes(bad="tab:blue")  # hidden patches in blue
    for ax, img, name in zip(axes, (image, masked, recon), ("image", "visible", "reconstruction"), strict=True):
        ax.imshow(np.asarray(img[0].float().cpu()).T, cmap=cmap, origin="lower", vmin=lo, vmax=hi)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


class MAETask(L.LightningModule):
    """Masked-autoencoder pre-training on unlabelled images.

    Validation masks with a fixed seed, so ``val/loss`` is comparable across epochs; ``val/score``
    (its negative) is what checkpointing maximises.

    Args:
        network: the ``MAEPretrainer``.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_epochs: linear warm-up before cosine decay.
        out_dir: run folder (reconstructions go to ``out_dir/reconstructions``).
    """

    def __init__(self, network: nn.Module, lr: float = 1.5e-4, weight_decay: float = 0.05, warmup_epochs: int = 1,
                 out_dir: str | Path | None = None) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["network"])
        self.network = network

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """One masked-reconstruction step."""
        loss, _, _ = self.network(batch["image"])
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=batch["image"].shape[0])
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Reconstruction loss under a fixed mask; a PNG of the first image."""
        gen = torch.Generator(device=batch["image"].device).manual_seed(1000 + batch_idx)
        loss, pred, mask = self.network(batch["image"], generator=gen)
        n = batch["image"].shape[0]
        self.log("val/loss", loss, prog_bar=True, batch_size=n, sync_dist=True)
        self.log("val/score", -loss, batch_size=n, sync_dist=True)
        if batch_idx == 0 and self.hparams.out_dir and self.trainer.is_global_zero and not self.trainer.sanity_checking:
            best = int(batch["image"].flatten(1).std(1).argmax())  # the most structured image of the batch
            net, x = self.network, batch["image"][best:best + 1]
            pred, mask = pred[best:best + 1], mask[best:best + 1]
            target = net.patchify(x)
            if net.norm_pix_loss:  # show the prediction in the image's intensities
                mean, std = net.patch_stats(target)
                pred = pred * std + mean
            keep = (1 - mask[:1])[..., None]
            recon = net.unpatchify(pred * (1 - keep) + target * keep)
            visible = net.unpatchify(torch.where(keep.bool(), target, torch.nan))
            save_reconstruction(x[0], visible[0], recon[0],
                                Path(self.hparams.out_dir) / "reconstructions" / f"epoch_{self.current_epoch:03d}.png",
                                f"epoch {self.current_epoch}  masked-patch MSE {float(loss):.3f}")

    def configure_optimizers(self) -> dict:
        """AdamW (betas 0.9, 0.95 as in MAE), warm-up + cosine."""
        params = [p for p in self.network.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay, betas=(0.9, 0.95))
        return {"optimizer": opt, "lr_scheduler": epoch_schedule(opt, int(self.trainer.max_epochs or 1),
                                                                self.hparams.warmup_epochs)}
