from __future__ import annotations

import pytest
import torch

from medimg.models import build_network
from medimg.models.sam3d import VolumetricSAMEncoder
from medimg.models.weights import load_pretrained


@pytest.fixture(scope="module")
def sam2d():
    torch.manual_seed(0)
    net = build_network("sam", size="tiny", img_size=256).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # non-trivial weights (rel-pos tables start at zero)
    return net


@pytest.mark.parametrize("depth_patch", [1, 2])
def test_identical_slices_reproduce_the_2d_encoder(sam2d, depth_patch):
    """Reuse property: a stack of identical slices gives the 2D encoder's features on every slice."""
    enc3d = VolumetricSAMEncoder(sam2d.image_encoder, depth_patch=depth_patch).eval()
    grey = torch.rand(1, 1, 256, 256)
    with torch.no_grad():
        ref = sam2d.image_encoder(grey.repeat(1, 3, 1, 1))  # 2D: grey replicated to RGB
        vol = grey[:, :, None].repeat(1, 1, 4, 1, 1)  # (B, 1, D=4, H, W)
        out = enc3d(vol)
    assert out.shape == (1, 256, 4 // depth_patch, 16, 16)
    for k in range(out.shape[2]):
        torch.testing.assert_close(out[:, :, k], ref, atol=1e-4, rtol=1e-4)


def test_the_blocks_are_the_2d_weights_not_copies(sam2d):
    enc3d = VolumetricSAMEncoder(sam2d.image_encoder)
    assert enc3d.blocks[0].attn.qkv.weight is sam2d.image_encoder.blocks[0].attn.qkv.weight


def test_sam_checkpoint_loads_the_frozen_encoder_completely(tmp_path):
    src = build_network("sam", size="tiny", img_size=256)
    torch.save(src.state_dict(), tmp_path / "sam_tiny.pth")
    dst = build_network("sam", size="tiny", img_size=256)
    report = load_pretrained(dst, tmp_path / "sam_tiny.pth", "sam")
    assert report.missing_under("image_encoder.") == [] and not report.unexpected
    enc3d = VolumetricSAMEncoder(dst.image_encoder)
    torch.testing.assert_close(enc3d.blocks[1].mlp.lin1.weight, src.image_encoder.blocks[1].mlp.lin1.weight)


def test_only_adapters_norms_and_embeddings_train(sam2d):
    enc3d = VolumetricSAMEncoder(build_network("sam", size="tiny", img_size=256).image_encoder)
    enc3d.freeze_pretrained()
    trainable = {n for n, p in enc3d.named_parameters() if p.requires_grad}
    assert any(n.startswith("adapters.") for n in trainable) and "depth_embed" in trainable
    assert not any(".attn." in n or ".mlp." in n for n in trainable)
    out = enc3d(torch.rand(1, 1, 2, 64, 64))  # in-plane position embedding interpolated 16x16 -> 4x4
    out.mean().backward()
    assert all(p.grad is None for n, p in enc3d.named_parameters() if n not in trainable)
    assert enc3d.adapters[0].up.weight.grad is not None


def test_gradient_checkpointing_gives_the_same_gradients(sam2d):
    torch.manual_seed(1)
    vol = torch.rand(1, 1, 2, 64, 64)
    state = VolumetricSAMEncoder(sam2d.image_encoder).state_dict()  # one set of adapter weights for both runs
    grads = []
    for ckpt in (False, True):
        enc3d = VolumetricSAMEncoder(build_network("sam", size="tiny", img_size=256).image_encoder,
                                     use_checkpoint=ckpt)
        enc3d.load_state_dict(state)
        enc3d.train()
        enc3d(vol).pow(2).mean().backward()
        # (the adapters' down projections get zero gradient while up is still zero: compare non-zero ones)
        grads.append(torch.cat([enc3d.adapters[0].up.weight.grad.flatten(), enc3d.patch_embed.weight.grad.flatten()]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1])
