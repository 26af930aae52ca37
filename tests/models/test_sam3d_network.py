from __future__ import annotations

import pytest
import torch

from medimg.models import build_network
from medimg.models.peft import apply_freeze_policy, trainable_summary
from medimg.models.sam.network import IMAGENET_MEAN, IMAGENET_STD
from medimg.models.sam3d import VolumetricSAMEncoder
from medimg.models.sam3d.heads import prompt_guide


def _jitter(net: torch.nn.Module, scale: float = 0.02) -> torch.nn.Module:
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * scale)
    return net


def test_sam_normalisation_is_folded_into_the_inflated_patch_embedding():
    """family=sam: a [0, 1] grey volume embeds exactly like SAM's (255 g - mean_c) / std_c RGB input."""
    torch.manual_seed(0)
    sam = _jitter(build_network("sam", size="tiny", img_size=256)).eval()
    enc = VolumetricSAMEncoder(sam.image_encoder, depth_patch=2, normalization=(IMAGENET_MEAN, IMAGENET_STD)).eval()
    grey = torch.rand(1, 1, 256, 256)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = sam.image_encoder((grey.repeat(1, 3, 1, 1) * 255 - mean) / std)
        out = enc(grey[:, :, None].repeat(1, 1, 2, 1, 1))
    for k in range(out.shape[2]):
        torch.testing.assert_close(out[:, :, k], ref, atol=2e-4, rtol=2e-4)


@pytest.fixture(scope="module")
def net3d():
    torch.manual_seed(0)
    return _jitter(build_network("medsam3d", size="tiny")).eval()


def test_full_resolution_output_for_points_boxes_and_no_prompt(net3d):
    x = torch.rand(2, 1, 32, 32, 48)
    feats = net3d.encode(x)
    assert feats.embedding.shape == (2, 256, 2, 2, 3) and len(feats.layers) == 1
    pts = (torch.tensor([[[10.0, 12.0, 20.0]], [[3.0, 4.0, 5.0]]]), torch.tensor([[1], [0]]))
    with torch.no_grad():
        for kw in (dict(points=pts), dict(boxes=torch.tensor([[2.0, 2, 2, 20, 20, 30]] * 2)), {}):
            logits, iou = net3d.decode(feats, **kw)
            assert logits.shape == (2, 1, 32, 32, 48) and iou.shape == (2, 1)
            assert torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="multiple of the patch"):
        net3d.encode(torch.rand(1, 1, 30, 32, 32))


def test_padding_points_are_position_free(net3d):
    """A padding point (label -1) is SAM's not-a-point token: where it sits changes nothing."""
    x = torch.rand(1, 1, 32, 32, 32)
    outs = []
    with torch.no_grad():
        feats = net3d.encode(x)
        for pad in ([0.0, 0.0, 0.0], [30.0, 2.0, 17.0]):
            pts = (torch.tensor([[[8.0, 9.0, 10.0], pad]]), torch.tensor([[1, -1]]))
            outs.append(net3d.decode(feats, points=pts)[0])
    torch.testing.assert_close(outs[0], outs[1])


def test_prompt_guide_marks_clicks_boxes_and_masks():
    image = torch.zeros(1, 1, 16, 16, 16)
    pts = (torch.tensor([[[3.0, 4.0, 5.0], [12.0, 12.0, 12.0]]]), torch.tensor([[1, 0]]))
    g = prompt_guide(image, pts, torch.tensor([[2.0, 2, 2, 5, 6, 7]]), torch.full((1, 1, 16, 16, 16), 10.0))
    assert g.shape == (1, 5, 16, 16, 16)
    assert g[0, 1, 3, 4, 5] == 1 and g[0, 1, 12, 12, 12] < 0.01  # positive map peaks at the positive click
    assert g[0, 2, 12, 12, 12] == 1 and g[0, 2, 3, 4, 5] < 0.01
    assert g[0, 3].sum() == 4 * 5 * 6 and g[0, 3, 5, 6, 7] == 1 and g[0, 3, 6, 6, 7] == 0
    assert torch.allclose(g[0, 4], torch.sigmoid(torch.tensor(10.0)).expand(16, 16, 16))


def test_vit_b_official_layout_loads_the_encoder_completely_and_trains_a_small_share(tmp_path):
    """A random state dict in segment-anything's sam_vit_b layout; the 3D model reuses it key for key."""
    torch.manual_seed(0)
    src = build_network("sam", size="vit_b")
    state = {k: v + 0.01 * torch.randn_like(v) if k.endswith("qkv.weight") else v for k, v in src.state_dict().items()}
    torch.save(state, tmp_path / "sam_vit_b_01ec64.pth")
    del src
    net = build_network("medsam3d", size="vit_b", family="sam", checkpoint=str(tmp_path / "sam_vit_b_01ec64.pth"))
    report = net.pretrained_report
    assert report.missing_under("image_encoder.") == [] and not report.unexpected and not report.mismatched
    qkv = state["image_encoder.blocks.7.attn.qkv.weight"]
    torch.testing.assert_close(net.image_encoder.blocks[7].attn.qkv.weight, qkv)
    assert net.image_encoder.pos_embed.shape == (1, 64, 64, 768)  # the real ViT-B geometry
    apply_freeze_policy(net, "spatial_adapters")
    total = sum(p.numel() for p in net.parameters())
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    print("medsam3d vit_b:", trainable_summary(net))
    assert 90e6 < total < 110e6 and trainable / total < 0.10
    frozen = {n for n, p in net.named_parameters() if not p.requires_grad}
    assert "image_encoder.blocks.0.attn.qkv.weight" in frozen and "image_encoder.patch_embed.weight" in frozen
    assert "image_encoder.blocks.0.norm1.weight" not in frozen and "image_encoder.depth_embed" not in frozen


def test_medsam_checkpoint_format_loads(tmp_path):
    src = build_network("medsam", size="tiny", img_size=256)
    torch.save({"model": src.state_dict()}, tmp_path / "medsam_tiny.pth")  # training-checkpoint wrapper
    net = build_network("medsam3d", size="tiny", family="medsam", checkpoint=str(tmp_path / "medsam_tiny.pth"))
    assert net.pretrained_report.missing_under("image_encoder.") == []
    torch.testing.assert_close(net.image_encoder.neck[0].weight, src.image_encoder.neck[0].weight)


def test_gradients_reach_only_adapters_norms_depth_embedding_and_heads():
    torch.manual_seed(0)
    net = build_network("medsam3d", size="tiny")
    apply_freeze_policy(net, "spatial_adapters")
    x = torch.rand(1, 1, 32, 32, 32)
    logits = net(x, points=(torch.tensor([[[16.0, 16.0, 16.0]]]), torch.tensor([[1]])))
    logits.pow(2).mean().backward()
    for name, p in net.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, name
    assert net.mask_decoder.hyper[0].weight.grad.abs().sum() > 0
    assert net.image_encoder.adapters[1].up.weight.grad.abs().sum() > 0


def test_unknown_family_is_a_config_error():
    from medimg.errors import ConfigError

    with pytest.raises(ConfigError, match="model.family"):
        build_network("medsam3d", family="litemedsam")
