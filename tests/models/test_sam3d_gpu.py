from __future__ import annotations

import pytest
import torch

from medimg.models import build_network
from medimg.models.peft import apply_freeze_policy


def _net(**kw):
    torch.manual_seed(0)
    net = build_network("medsam3d", size="tiny", **kw)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # zero-initialised adapters would hide precision effects
    return net


@pytest.mark.gpu
def test_bf16_autocast_on_cuda_tracks_fp32():
    net = _net().cuda().eval()
    x = torch.rand(1, 1, 64, 64, 64, device="cuda")
    pts = (torch.tensor([[[32.0, 30.0, 28.0]]], device="cuda"), torch.ones(1, 1, dtype=torch.int64, device="cuda"))
    with torch.no_grad():
        ref = net(x, points=pts)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = net(x, points=pts).float()
    cpu = net.cpu()(x.cpu(), points=(pts[0].cpu(), pts[1].cpu()))
    torch.testing.assert_close(ref.cpu(), cpu, atol=2e-3, rtol=2e-3)  # CUDA fp32 == CPU fp32
    assert ((low > 0) == (ref > 0)).float().mean() > 0.98
    assert torch.corrcoef(torch.stack([low.flatten(), ref.flatten()]))[0, 1] > 0.99


@pytest.mark.gpu
def test_gradient_checkpointing_on_cuda_same_gradients_less_memory():
    x = torch.rand(1, 1, 128, 128, 128, device="cuda")
    pts = (torch.tensor([[[64.0, 64.0, 64.0]]], device="cuda"), torch.ones(1, 1, dtype=torch.int64, device="cuda"))
    grads, peaks = [], []
    for ckpt in (False, True):
        net = _net(use_checkpoint=ckpt).cuda().train()
        apply_freeze_policy(net, "spatial_adapters")
        torch.cuda.reset_peak_memory_stats()
        net(x, points=pts).pow(2).mean().backward()
        peaks.append(torch.cuda.max_memory_allocated())
        grads.append(net.image_encoder.adapters[0].up.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)
    assert peaks[1] <= peaks[0]
