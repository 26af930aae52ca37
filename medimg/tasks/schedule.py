"""The learning-rate schedule the tasks share: MONAI's ``WarmupCosineSchedule``, stepped per epoch."""

from __future__ import annotations

import torch
from monai.optimizers import WarmupCosineSchedule


def epoch_schedule(optimizer: torch.optim.Optimizer, total_epochs: int, warmup_epochs: int) -> dict:
    """Linear warm-up over ``warmup_epochs``, then cosine decay to zero at ``total_epochs``.

    The first epoch already trains at ``1 / (warmup_epochs + 1)`` of the base rate (MONAI's
    ``warmup_multiplier``), so epoch ``e`` of the warm-up runs at ``(e + 1) / (warmup_epochs + 1)``.

    Returns:
        The Lightning ``lr_scheduler`` entry.
    """
    total = max(int(total_epochs), 1)
    warm = max(min(int(warmup_epochs), total - 1), 0)
    scheduler = WarmupCosineSchedule(optimizer, warmup_steps=warm, t_total=total, warmup_multiplier=1.0 / (warm + 1))
    return {"scheduler": scheduler, "interval": "epoch"}
