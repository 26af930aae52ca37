"""Half-precision storage of a bundle's weights: half the size on disk, the same masks.

Shipped bundles share a size budget. :func:`store_fp16` rounds every floating-point weight to
fp16 and stores ``models/model.pt`` in fp16; the network still loads and computes in fp32 (the
rounded values are exact in both). A 2D promptable bundle's OpenVINO IR is converted again from
the rounded network and stored with fp16 weights, which is lossless for them, so the IR still
matches ``model.pt``'s weights digest. Whether the masks stay those of the fp32 weights is for the
caller to measure (``benchmarks/ship_promptable.py`` does, and records it in the metadata).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from medimg.bundle.loader import load_bundle_network
from medimg.errors import atomic_output


def store_fp16(bundle: str | Path) -> int:
    """Round a bundle's weights to fp16 and store them so, in place; returns the bytes saved."""
    bundle = Path(bundle)
    weights = bundle / "models" / "model.pt"
    before = sum(f.stat().st_size for f in (bundle / "models").rglob("*") if f.is_file())
    network = load_bundle_network(bundle, "cpu")
    with torch.no_grad():
        for value in network.state_dict().values():
            if value.is_floating_point():
                value.copy_(value.half().float())
    state = {k: v.half() if v.is_floating_point() else v for k, v in network.state_dict().items()}
    with atomic_output(weights) as tmp:
        torch.save(state, tmp)
    ir = bundle / "models" / "openvino"
    if (ir / "sam_encoder.xml").is_file():
        from medimg.models.sam.runtime import save_openvino_ir

        shutil.rmtree(ir)
        save_openvino_ir(network, ir, fp16=True)
    after = sum(f.stat().st_size for f in (bundle / "models").rglob("*") if f.is_file())
    return before - after
