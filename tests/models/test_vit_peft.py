"""DVPT, LoRA, linear probe and layer-wise LR decay on the ViT classifier / segmenter."""

from __future__ import annotations

import pytest
import torch

from medimg.models import build_network
from medimg.models.peft import trainable_share
from medimg.models.vit import DVPT, layer_decay_groups

TINY = dict(backbone="mae", size="tiny", img_size=64, in_chans=1, num_classes=3)


def test_dvpt_on_vit_b_trains_under_one_percent(capsys):
    net = build_network("vit_cls", backbone="mae", size="vit_b", img_size=224, num_classes=4, peft="dvpt")
    trainable, total = trainable_share(net)
    share = 100.0 * trainable / total
    print(f"DVPT on ViT-B/16: {trainable:,} of {total:,} parameters trainable ({share:.2f}%)")
    assert share <= 1.0 and trainable > 0
    assert "DVPT on ViT-B/16" in capsys.readouterr().out
    shared = build_network("vit_cls", backbone="mae", size="vit_b", img_size=224, num_classes=4, peft="dvpt",
                           dvpt_shared=True)
    assert len(shared.backbone.dvpt) == 1 and len(net.backbone.dvpt) == 12
    assert trainable_share(shared)[0] < trainable


@pytest.mark.parametrize("shared", [False, True])
def test_untrained_dvpt_leaves_the_frozen_features_unchanged(shared):
    """An untrained DVPT is the identity: ``up`` starts at zero, so the pretrained function is kept exactly."""
    torch.manual_seed(0)
    plain = build_network("vit_cls", **TINY, peft="full").eval()
    dvpt = build_network("vit_cls", **TINY, peft="dvpt", dvpt_shared=shared).eval()
    dvpt.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(2, 1, 64, 64)
    assert torch.equal(dvpt.features(x), plain.features(x))
    # ... and it is not a no-op module: with a non-zero up projection the features move
    with torch.no_grad():
        for m in dvpt.backbone.dvpt:
            m.up.weight.normal_()
    assert not torch.allclose(dvpt.features(x), plain.features(x), atol=1e-3)


def test_dvpt_gradients_reach_only_dvpt_and_head():
    torch.manual_seed(0)
    net = build_network("vit_cls", **TINY, peft="dvpt")
    frozen = {n: p.detach().clone() for n, p in net.named_parameters() if not p.requires_grad}
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("backbone.dvpt.", "head.")) for n in trainable)
    assert any(n.startswith("backbone.blocks.") for n in frozen) and "backbone.patch_embed.proj.weight" in frozen
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    x, y = torch.randn(4, 1, 64, 64), torch.tensor([0, 1, 2, 1])
    seen: set[str] = set()
    for _ in range(2):  # step 1 moves `up` off zero; step 2 then reaches down / prompts / attention
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        for n, p in net.named_parameters():
            if p.requires_grad:
                if p.grad is not None and p.grad.abs().sum() > 0:
                    seen.add(n)
            else:
                assert p.grad is None, n
        opt.step()
    assert seen == trainable
    for n, p in net.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_dvpt_module_uses_prompts_as_queries():
    """Each sample's dynamic prompts depend on its own tokens: different images, different updates."""
    torch.manual_seed(0)
    m = DVPT(32, bottleneck=8, num_prompts=4)
    torch.nn.init.normal_(m.up.weight)
    x = torch.randn(2, 10, 32)
    out = m(x)
    alone = m(x[1:])
    assert torch.allclose(out[1:], alone, atol=1e-6)  # no mixing across the batch
    assert not torch.allclose(out[0] - x[0], out[1] - x[1], atol=1e-3)


def test_linear_lora_and_full_shares():
    shares = {p: trainable_share(build_network("vit_cls", **TINY, peft=p)) for p in ("linear", "lora", "full")}
    head = 64 * 3 + 3
    assert shares["linear"][0] == head
    lora = build_network("vit_cls", **TINY, peft="lora", lora_r=4)
    names = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in names) and all("lora_" in n or n.startswith("head.") for n in names)
    assert shares["linear"][0] < shares["lora"][0] < shares["full"][0] == shares["full"][1]
    seg = build_network("vit_seg", backbone="mae", size="tiny", img_size=64, out_channels=3, peft="linear")
    assert not any(p.requires_grad for p in seg.backbone.parameters())
    assert all(p.requires_grad for n, p in seg.named_parameters() if not n.startswith("backbone."))


def test_layer_decay_groups_scale_with_depth():
    net = build_network("vit_cls", backbone="mae", size="vit_b", img_size=224, num_classes=2, peft="full")
    groups = layer_decay_groups(net, lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    by_param = {id(p): g["lr"] for g in groups for p in g["params"]}
    lr = {n: by_param[id(p)] for n, p in net.named_parameters()}
    assert lr["head.weight"] == pytest.approx(1e-3)
    assert lr["backbone.blocks.11.mlp.fc1.weight"] == pytest.approx(1e-3)
    assert lr["backbone.blocks.10.mlp.fc1.weight"] == pytest.approx(1e-3 * 0.75)
    assert lr["backbone.blocks.0.mlp.fc1.weight"] == pytest.approx(1e-3 * 0.75 ** 11)
    assert lr["backbone.patch_embed.proj.weight"] == pytest.approx(1e-3 * 0.75 ** 12)
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(net.backbone.blocks[0].norm1.weight) in no_decay and id(net.backbone.blocks[0].attn.qkv.weight) \
        not in no_decay
