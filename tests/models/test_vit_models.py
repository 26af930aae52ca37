"""ViT segmenter and MAE pre-training model."""

from __future__ import annotations

import pytest
import torch

from medimg.models import build_network
from medimg.models.vit.backbone import feature_indices


@pytest.mark.parametrize(("backbone", "size", "img", "chans"), [("mae", "tiny", 64, 1), ("dinov2", "tiny", 32, 3)])
def test_segmenter_outputs_full_resolution(backbone, size, img, chans):
    net = build_network("vit_seg", backbone=backbone, size=size, img_size=img, in_chans=chans, out_channels=3)
    out = net(torch.randn(2, chans, img, img))
    assert out.shape == (2, 3, img, img)
    assert net.indices == feature_indices(2, 3) == [0, 0, 1]


def test_segmenter_bridges_patch_14_and_learns():
    """DINOv2's patch 14: 16x16 tokens at 224 px are resized onto the decoder's 14x14 bottom grid."""
    torch.manual_seed(0)
    net = build_network("vit_seg", backbone="dinov2", size="vit_s", img_size=224, out_channels=2, peft="linear")
    assert net.levels == 4 and net.indices == [2, 5, 8, 11]
    x = torch.randn(1, 1, 224, 224)
    assert net(x).shape == (1, 2, 224, 224)
    small = build_network("vit_seg", backbone="mae", size="tiny", img_size=32, out_channels=2)
    target = (torch.arange(32)[None, :] < 16).long().expand(32, 32)[None]  # left half
    image = target[:, None].float() + 0.1 * torch.randn(1, 1, 32, 32)
    opt = torch.optim.Adam(small.parameters(), lr=3e-3)
    for _ in range(60):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(small(image), target)
        loss.backward()
        opt.step()
    assert (small(image).argmax(1) == target).float().mean() > 0.95


def test_mae_masks_ninety_percent_and_patchify_inverts():
    torch.manual_seed(0)
    mae = build_network("mae_vit", size="tiny", img_size=64, in_chans=3)
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(mae.unpatchify(mae.patchify(x)), x)
    loss, pred, mask = mae(x)
    assert pred.shape == (2, 64, 8 * 8 * 3) and mask.shape == (2, 64)
    assert mask.sum(1).tolist() == [58.0, 58.0]  # 90% of 64 patches hidden (6 visible)
    gen = torch.Generator().manual_seed(3)
    _, _, m1 = mae(x, generator=gen)
    _, _, m2 = mae(x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(m1, m2) and float(loss) > 0
    ramp = torch.linspace(0, 1, 64)
    x = torch.stack([ramp[None, :].expand(64, 64), ramp[:, None].expand(64, 64), (ramp[None, :] * ramp[:, None])])
    x = x[None].repeat(2, 1, 1, 1)  # smooth images: masked patches are predictable from the visible ones
    opt = torch.optim.AdamW(mae.parameters(), lr=2e-3)
    first = None
    for _ in range(30):
        opt.zero_grad()
        loss, _, _ = mae(x, generator=torch.Generator().manual_seed(0))
        first = first if first is not None else float(loss)
        loss.backward()
        opt.step()
    assert float(loss) < 0.5 * first


def test_mae_encoder_state_loads_into_the_classifier(tmp_path):
    mae = build_network("mae_vit", size="tiny", img_size=64, in_chans=3)
    torch.save(mae.encoder_state(), tmp_path / "encoder.pt")
    cls = build_network("vit_cls", backbone="mae", size="tiny", img_size=64, in_chans=3, num_classes=4,
                        backbone_checkpoint=str(tmp_path / "encoder.pt"))
    for k, v in mae.encoder.state_dict().items():
        assert torch.equal(cls.backbone.state_dict()[k], v), k
    seg = build_network("vit_seg", backbone="mae", size="tiny", img_size=64, in_chans=3, out_channels=2,
                        backbone_checkpoint=str(tmp_path / "encoder.pt"))
    assert torch.equal(seg.backbone.blocks[1].attn.qkv.weight, mae.encoder.blocks[1].attn.qkv.weight)
