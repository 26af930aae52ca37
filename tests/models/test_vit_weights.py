"""Official ViT weight layouts (MAE, DINOv2 hub, timm) load with zero missing backbone keys.

The official layouts are written out by hand here (key names and shapes of the released files),
not derived from timm, so a renamed or mis-shaped key fails the test.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from medimg.errors import WeightsError
from medimg.models.vit.backbone import BackboneSpec, create_backbone, load_backbone_weights


def _block(prefix: str, d: int, mlp: int, layerscale: bool) -> dict[str, torch.Tensor]:
    out = {f"{prefix}.norm1.weight": torch.rand(d), f"{prefix}.norm1.bias": torch.randn(d),
           f"{prefix}.attn.qkv.weight": torch.randn(3 * d, d) * 0.02, f"{prefix}.attn.qkv.bias": torch.randn(3 * d),
           f"{prefix}.attn.proj.weight": torch.randn(d, d) * 0.02, f"{prefix}.attn.proj.bias": torch.randn(d),
           f"{prefix}.norm2.weight": torch.rand(d), f"{prefix}.norm2.bias": torch.randn(d),
           f"{prefix}.mlp.fc1.weight": torch.randn(mlp, d) * 0.02, f"{prefix}.mlp.fc1.bias": torch.randn(mlp),
           f"{prefix}.mlp.fc2.weight": torch.randn(d, mlp) * 0.02, f"{prefix}.mlp.fc2.bias": torch.randn(d)}
    if layerscale:
        out[f"{prefix}.ls1.gamma"] = torch.rand(d)
        out[f"{prefix}.ls2.gamma"] = torch.rand(d)
    return out


def mae_official(d: int = 768, depth: int = 12, dd: int = 512, ddepth: int = 2) -> dict:
    """``mae_pretrain_vit_base.pth`` layout (with the decoder of the visualisation checkpoints)."""
    enc = {"cls_token": torch.randn(1, 1, d), "pos_embed": torch.randn(1, 197, d),
           "patch_embed.proj.weight": torch.randn(d, 3, 16, 16) * 0.02, "patch_embed.proj.bias": torch.randn(d),
           "norm.weight": torch.rand(d), "norm.bias": torch.randn(d)}
    for i in range(depth):
        enc.update(_block(f"blocks.{i}", d, 4 * d, False))
    dec = {"mask_token": torch.randn(1, 1, dd), "decoder_embed.weight": torch.randn(dd, d),
           "decoder_embed.bias": torch.randn(dd), "decoder_pos_embed": torch.randn(1, 197, dd),
           "decoder_norm.weight": torch.rand(dd), "decoder_norm.bias": torch.randn(dd),
           "decoder_pred.weight": torch.randn(768, dd), "decoder_pred.bias": torch.randn(768)}
    for i in range(ddepth):
        dec.update(_block(f"decoder_blocks.{i}", dd, 4 * dd, False))
    return {"model": {**enc, **dec}}


def dinov2_hub(d: int = 384, depth: int = 12, registers: int = 0) -> dict:
    """``dinov2_vits14[_reg4]_pretrain.pth`` layout (518 px: a 37 x 37 grid plus the class position)."""
    out = {"cls_token": torch.randn(1, 1, d), "pos_embed": torch.randn(1, 1 + 37 * 37, d),
           "mask_token": torch.zeros(1, d), "patch_embed.proj.weight": torch.randn(d, 3, 14, 14) * 0.02,
           "patch_embed.proj.bias": torch.randn(d), "norm.weight": torch.rand(d), "norm.bias": torch.randn(d)}
    if registers:
        out["register_tokens"] = torch.randn(1, registers, d)
    for i in range(depth):
        out.update(_block(f"blocks.{i}", d, 4 * d, True))
    return out


def test_mae_official_checkpoint_loads_completely(tmp_path):
    state = mae_official()
    torch.save(state, tmp_path / "mae_pretrain_vit_base.pth")
    model = create_backbone(BackboneSpec("mae", "vit_b", img_size=224, in_chans=3))
    report = load_backbone_weights(model, tmp_path / "mae_pretrain_vit_base.pth", "mae")
    assert report.missing == [] and not report.mismatched
    assert sorted(report.unexpected) == sorted(k for k in state["model"] if k.startswith(("decoder_", "mask_token")))
    assert torch.equal(model.blocks[7].attn.qkv.weight, state["model"]["blocks.7.attn.qkv.weight"])
    assert torch.equal(model.pos_embed, state["model"]["pos_embed"])  # 224 -> no resampling


def test_mae_one_channel_and_new_size(tmp_path):
    """in_chans=1 sums the RGB filters (same response to a grey image); pos-embed resampled to 14x14."""
    state = mae_official(depth=12)
    torch.save(state, tmp_path / "mae.pth")
    model = create_backbone(BackboneSpec("mae", "vit_b", img_size=224, in_chans=1, pool="avg"))
    report = load_backbone_weights(model, tmp_path / "mae.pth", "mae")
    assert report.missing == ["fc_norm.weight", "fc_norm.bias"]  # avg pooling's fresh norm (MAE fine-tuning)
    w = state["model"]["patch_embed.proj.weight"]
    assert torch.allclose(model.patch_embed.proj.weight, w.sum(1, keepdim=True), atol=1e-6)
    small = create_backbone(BackboneSpec("mae", "vit_b", img_size=112, in_chans=3))
    load_backbone_weights(small, tmp_path / "mae.pth", "mae")
    want = resample_abs_pos_embed(state["model"]["pos_embed"], new_size=[7, 7], num_prefix_tokens=1)
    assert small.pos_embed.shape == (1, 50, 768) and torch.allclose(small.pos_embed, want)
    assert torch.equal(small.pos_embed[:, :1], state["model"]["pos_embed"][:, :1])  # class position kept


def test_pos_embed_resampling_preserves_a_smooth_field(tmp_path):
    """A position embedding linear in the grid coordinate stays linear after resizing 37 -> 16."""
    state = dinov2_hub(depth=12)
    g = torch.linspace(-1, 1, 37)
    field = (g[:, None] + 2 * g[None, :]).reshape(1, 37 * 37, 1).expand(1, -1, 384)
    state["pos_embed"] = torch.cat([torch.full((1, 1, 384), 5.0), field], 1).contiguous()
    torch.save(state, tmp_path / "dinov2_vits14_pretrain.pth")
    model = create_backbone(BackboneSpec("dinov2", "vit_s", img_size=224, in_chans=3))
    report = load_backbone_weights(model, tmp_path / "dinov2_vits14_pretrain.pth", "dinov2")
    assert report.missing == [] and report.unexpected == []
    pos = model.pos_embed[0, 1:, 0].reshape(16, 16)
    assert pos.shape == (16, 16) and float(pos[0, 0]) < float(pos[15, 15])
    assert torch.allclose(pos[:, 1:] - pos[:, :-1], (pos[:, 1:] - pos[:, :-1]).mean(), atol=0.02)
    assert float(model.pos_embed[0, 0, 0]) == 5.0


def test_dinov2_registers_fold_the_class_position(tmp_path):
    state = dinov2_hub(registers=4)
    torch.save(state, tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    model = create_backbone(BackboneSpec("dinov2", "vit_s", img_size=518, in_chans=3, registers=True))
    report = load_backbone_weights(model, tmp_path / "dinov2_vits14_reg4_pretrain.pth", "dinov2")
    assert report.missing == [] and report.unexpected == []
    assert torch.equal(model.reg_token, state["register_tokens"])
    assert torch.allclose(model.cls_token, state["cls_token"] + state["pos_embed"][:, :1])
    assert torch.equal(model.pos_embed, state["pos_embed"][:, 1:])
    assert torch.equal(model.blocks[3].ls1.gamma, state["blocks.3.ls1.gamma"])


def test_timm_safetensors_checkpoint(tmp_path):
    src = create_backbone(BackboneSpec("dinov2", "tiny", img_size=64, in_chans=3))
    state = {f"module.{k}": v for k, v in src.state_dict().items()}
    state["module.head.weight"], state["module.head.bias"] = torch.randn(10, 64), torch.zeros(10)
    save_file(state, str(tmp_path / "model.safetensors"))
    model = create_backbone(BackboneSpec("dinov2", "tiny", img_size=64, in_chans=3))
    report = load_backbone_weights(model, tmp_path / "model.safetensors", "timm")
    assert report.missing == [] and sorted(report.unexpected) == ["head.bias", "head.weight"]
    x = torch.randn(2, 3, 64, 64)
    assert torch.allclose(model.eval()(x), src.eval()(x), atol=1e-6)


def test_wrong_size_checkpoint_is_a_clear_error(tmp_path):
    torch.save(dinov2_hub(d=384, depth=12), tmp_path / "s.pth")
    model = create_backbone(BackboneSpec("dinov2", "vit_b", img_size=224, in_chans=3))
    with pytest.raises(WeightsError, match="wrong shape"):
        load_backbone_weights(model, tmp_path / "s.pth", "dinov2")
    torch.save({"model": {"foo": torch.zeros(1)}}, tmp_path / "x.pth")
    with pytest.raises(WeightsError, match="missing"):
        load_backbone_weights(create_backbone(BackboneSpec("mae", "tiny", 64)), tmp_path / "x.pth", "mae")
