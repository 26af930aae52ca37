"""Learning-rate schedules shared by the tasks."""

from __future__ import annotations

import math

import torch


def warmup_cosine(optimizer: torch.optim.Optimizer, total_epochs: int, warmup_epochs: int) -> dict:
    """Linear warm-up over ``warmup_epochs`` then cosine decay to zero at ``total_epochs`` (per epoch).

    Returns:
        The Lightning ``lr_scheduler`` entry.
    """
    total = max(int(total_epochs), 1)
    warm = min(int(warmup_epochs), total - 1)

    def factor(epoch: int) -> float:
        if epoch < warm:
            return (epoch + 1) / (warm + 1)
        return 0.5 * (1 + math.cos(math.pi * (epoch - warm) / max(total - warm, 1)))

    return {"scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, factor), "interval": "epoch"}
