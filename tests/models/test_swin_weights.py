from __future__ import annotations

import pytest
import torch

from medimg.errors import WeightsError
from medimg.models import build_network
from medimg.models.weights import load_pretrained, read_checkpoint
from medimg.models.weights.swin_ssl import remap_swin_ssl


def _official_layout(net) -> dict[str, torch.Tensor]:
    """A random state dict in the released model_swinvit.pt layout (DataParallel SSL model)."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for key, value in net.state_dict().items():
        if not key.startswith("swinViT."):
            continue
        name = key[len("swinViT."):].replace(".mlp.linear1.", ".mlp.fc1.").replace(".mlp.linear2.", ".mlp.fc2.")
        name = "module." + name
        out[name] = torch.randn(value.shape, generator=g) if value.is_floating_point() else value.clone()
    dim = net.swinViT.num_features if hasattr(net.swinViT, "num_features") else 192
    out["module.rotation_head.weight"] = torch.randn(4, dim, generator=g)
    out["module.contrastive_head.weight"] = torch.randn(512, dim, generator=g)
    out["module.convTrans3d.weight"] = torch.randn(dim, 1, 1, 1, 1, generator=g)
    return {"state_dict": out}


def test_ssl_checkpoint_loads_the_whole_encoder(tmp_path):
    net = build_network("swin_unetr", feature_size=12, depths=(1, 1, 1, 1))
    ckpt = _official_layout(net)
    torch.save(ckpt, tmp_path / "model_swinvit.pt")
    fresh = build_network("swin_unetr", feature_size=12, depths=(1, 1, 1, 1),
                          pretrained=str(tmp_path / "model_swinvit.pt"))
    report = fresh.pretrained_report
    assert report.missing_under("swinViT.") == []
    assert sorted(report.unexpected) == ["contrastive_head.weight", "convTrans3d.weight", "rotation_head.weight"]
    assert report.missing and all(not k.startswith("swinViT.") for k in report.missing)  # decoder stays random
    src = ckpt["state_dict"]
    torch.testing.assert_close(fresh.state_dict()["swinViT.layers1.0.blocks.0.mlp.linear1.weight"],
                               src["module.layers1.0.blocks.0.mlp.fc1.weight"])
    torch.testing.assert_close(fresh.state_dict()["swinViT.patch_embed.proj.weight"],
                               src["module.patch_embed.proj.weight"])


def test_remap_matches_monai_load_from():
    """Our remap agrees with MONAI's own hand-written SwinUNETR.load_from on the same file."""
    net = build_network("swin_unetr", feature_size=12, depths=(1, 1, 1, 1))
    ckpt = _official_layout(net)
    ours = build_network("swin_unetr", feature_size=12, depths=(1, 1, 1, 1))
    from medimg.models.weights import load_with_report

    load_with_report(ours, remap_swin_ssl(ckpt))
    theirs = build_network("swin_unetr", feature_size=12, depths=(1, 1, 1, 1))
    theirs.load_from(ckpt)
    for key, value in theirs.state_dict().items():
        if key.startswith("swinViT.") and "relative_position_index" not in key:
            torch.testing.assert_close(ours.state_dict()[key], value, msg=key)


def test_shape_mismatch_and_unsafe_files_are_weights_errors(tmp_path):
    net = build_network("swin_unetr", feature_size=12, depths=(1, 1, 1, 1))
    ckpt = _official_layout(build_network("swin_unetr", feature_size=24, depths=(1, 1, 1, 1)))
    torch.save(ckpt, tmp_path / "wide.pt")
    with pytest.raises(WeightsError, match="wrong shape"):
        load_pretrained(net, tmp_path / "wide.pt", "swin_ssl")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(WeightsError, match="cannot read weights"):
        read_checkpoint(tmp_path / "evil.pt")
    with pytest.raises(WeightsError, match="not found"):
        read_checkpoint(tmp_path / "missing.pt")
