"""DVPT: dynamic visual prompt tuning (a PEFT module for frozen ViTs).

For the frozen tokens ``x`` (B, N, D) leaving a transformer block:

1. a lightweight bottleneck transforms them: ``t = GELU(down(LN(x)))`` (B, N, r);
2. K learnable prompts act as queries in cross-attention over ``t``, giving K *dynamic*,
   sample-specific prompts ``p`` (B, K, r);
3. every token reads back from the dynamic prompts (cross-attention, ``t`` as queries);
4. the result is projected to D by ``up`` and added to the frozen features.

``up`` starts at zero, so an untrained DVPT leaves the frozen features exactly unchanged (the
network computes precisely the pretrained function); training moves away from it. One module can
be shared by all layers (``shared=True``) or each layer gets its own.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class DVPT(nn.Module):
    """One dynamic visual prompt tuning module.

    Args:
        dim: token width D.
        bottleneck: width r of the transformed features.
        num_prompts: learnable prompts K (queries).
    """

    def __init__(self, dim: int, bottleneck: int = 16, num_prompts: int = 8) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.down = nn.Linear(dim, bottleneck)
        self.prompts = nn.Parameter(torch.randn(num_prompts, bottleneck) * bottleneck ** -0.5)
        self.q = nn.Linear(bottleneck, bottleneck, bias=False)
        self.kv = nn.Linear(bottleneck, 2 * bottleneck, bias=False)
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x + up(read(t, prompts(t)))`` for tokens ``x`` (B, N, D)."""
        t = F.gelu(self.down(self.norm(x)))                       # (B, N, r)
        k, v = self.kv(t).chunk(2, dim=-1)
        queries = self.q(self.prompts).expand(x.shape[0], -1, -1)  # (B, K, r)
        dynamic = F.scaled_dot_product_attention(queries, k, v)    # (B, K, r): sample-specific prompts
        read = F.scaled_dot_product_attention(t, dynamic, dynamic)  # (B, N, r): tokens gather from them
        return x + self.up(read)


class _Hook:
    def __init__(self, module: DVPT) -> None:
        self.module = module

    def __call__(self, block: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return self.module(output)


def attach_dvpt(owner: nn.Module, blocks: Sequence[nn.Module], dim: int, shared: bool = False,
                bottleneck: int = 16, num_prompts: int = 8) -> list[DVPT]:
    """Add DVPT after each of ``blocks`` through forward hooks (official keys stay untouched).

    Args:
        owner: module that holds the modules (``owner.dvpt`` list), so they are saved and trained.
        blocks: the transformer blocks.
        dim: token width.
        shared: one module for all blocks.
        bottleneck: DVPT width r.
        num_prompts: prompts K.

    Returns:
        The DVPT modules (one when shared).
    """
    modules = [DVPT(dim, bottleneck, num_prompts)] if shared else [DVPT(dim, bottleneck, num_prompts)
                                                                    for _ in blocks]
    owner.dvpt = nn.ModuleList(modules)
    for i, block in enumerate(blocks):
        block.register_forward_hook(_Hook(modules[0 if shared else i]))
    return modules
