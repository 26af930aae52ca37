"""Float32-under-autocast layers: the plain layer's keys and results, float32 arithmetic under bf16 autocast."""

from __future__ import annotations

import torch
from torch import nn

from medimg.models.precision import Conv3dFP32, InstanceNorm3dFP32


def test_same_keys_and_results_as_the_plain_layers():
    torch.manual_seed(0)
    x = torch.randn(1, 4, 6, 6, 6)
    for fast, plain in ((InstanceNorm3dFP32(4, affine=True), nn.InstanceNorm3d(4, affine=True)),
                        (Conv3dFP32(4, 4, 3, padding=1, groups=4), nn.Conv3d(4, 4, 3, padding=1, groups=4))):
        assert list(fast.state_dict()) == list(plain.state_dict())
        plain.load_state_dict(fast.state_dict())  # checkpoints of either load into the other
        torch.testing.assert_close(fast(x), plain(x))


def test_bf16_autocast_computes_in_float32_and_returns_bf16():
    torch.manual_seed(0)
    conv = Conv3dFP32(4, 4, 3, padding=1, groups=4)
    x = torch.randn(1, 4, 6, 6, 6).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, conv(x.float()).bfloat16())  # the float32 result, rounded once


def test_auto_speed_options_resolve_for_the_machine(monkeypatch):
    """``auto`` precision / compile: bf16 + CUDA graphs on a GPU, fp32 and no compiling on a CPU."""
    import pytest

    from medimg.errors import ConfigError
    from medimg.models import compiling

    monkeypatch.setattr(compiling.torch.cuda, "is_available", lambda: False)
    assert compiling.resolve_speed("auto", "auto", "auto") == ("32-true", None)
    monkeypatch.setattr(compiling.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(compiling.torch.cuda, "is_bf16_supported", lambda: True)
    assert compiling.resolve_speed("auto", "auto", "auto") == ("bf16-mixed", "reduce-overhead")
    assert compiling.resolve_speed("auto", "auto", "cpu") == ("32-true", None)  # asked for the CPU
    assert compiling.resolve_speed("32-true", None, "gpu") == ("32-true", None)  # explicit settings stay
    with pytest.raises(ConfigError, match="unknown mode"):
        compiling.resolve_speed("32-true", "fastest", "gpu")
