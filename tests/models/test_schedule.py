from __future__ import annotations

import math

import pytest
import torch

from medimg.tasks.schedule import epoch_schedule


@pytest.mark.parametrize(("total", "warm"), [(10, 3), (5, 0), (2, 5)])
def test_warmup_then_cosine_per_epoch(total, warm):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    entry = epoch_schedule(opt, total, warm)
    assert entry["interval"] == "epoch"
    w = min(warm, total - 1)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        entry["scheduler"].step()
    expected = [(e + 1) / (w + 1) if e < w else 0.5 * (1 + math.cos(math.pi * (e - w) / (total - w)))
                for e in range(total)]
    assert lrs == pytest.approx(expected, abs=1e-9)
    assert lrs[0] > 0  # the first epoch trains
