"""The OpenVINO fast path against the eager network: same logits (f32), same masks (default precision)."""

from __future__ import annotations

import copy
import logging
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from medimg.errors import BundleError, ConfigError
from medimg.models import build_network
from medimg.models.sam.runtime import (
    OpenVINOSAMRuntime,
    PromptDecoderGraph,
    TorchSAMRuntime,
    make_runtime,
    prompt_arrays,
    read_openvino_ir,
    save_openvino_ir,
)
from medimg.predictors import PromptablePredictor


@pytest.fixture(scope="module")
def lite():
    return build_network("litemedsam", pretrained=True).eval()


@pytest.fixture(scope="module")
def ir_dir(lite, tmp_path_factory):
    out = tmp_path_factory.mktemp("ir")
    save_openvino_ir(lite, out)
    return out


def _prompt_sets(size: int = 256):
    box = torch.tensor([[60.0, 50.0, 190.0, 210.0]])
    click = (torch.tensor([[[120.0, 130.0]]]), torch.tensor([[1]]))
    clicks = (torch.tensor([[[120.0, 130.0], [80.0, 90.0], [150.0, 60.0]]]), torch.tensor([[1, 0, 1]]))
    many = (torch.rand(1, 12, 2, generator=torch.Generator().manual_seed(0)) * size,
            torch.tensor([[1, 0] * 6]))  # more tokens than the reassociated decoder saves on: still equal
    return [dict(boxes=box), dict(points=click, multimask_output=True), dict(points=clicks),
            dict(points=click, boxes=box), dict(points=many, boxes=box)]


def test_decoder_graph_equals_prompt_encoder_and_decoder(lite):
    """The exportable graph (reassociated attention, per-token upscaling) is SAM's prompt encoder + decoder.

    For clicks, boxes, both, many clicks, with and without a mask input.
    """
    graphs = {with_mask: PromptDecoderGraph(lite.prompt_encoder, lite.mask_decoder, with_mask).eval()
              for with_mask in (False, True)}
    emb = torch.randn(1, 256, 64, 64)
    prev = torch.randn(1, 1, 256, 256)
    with torch.no_grad():
        for kw in _prompt_sets():
            multi = kw.pop("multimask_output", False)
            for masks in (None, prev):
                ref_low, ref_iou = lite.decode(emb, masks=masks, multimask_output=multi, **kw)
                coords, labels = prompt_arrays(kw.get("points"), kw.get("boxes"))
                inputs = (emb, torch.from_numpy(coords), torch.from_numpy(labels))
                low, iou = graphs[masks is not None](*inputs, *(() if masks is None else (masks,)))
                sel = slice(1, 4) if multi else slice(0, 1)
                torch.testing.assert_close(low[:, sel], ref_low, atol=1e-4, rtol=1e-4)
                torch.testing.assert_close(iou[:, sel], ref_iou, atol=1e-5, rtol=1e-5)


def test_openvino_f32_reproduces_eager_logits(lite, ir_dir, mni_dir):
    """Real LiteMedSAM weights on a real MNI152 slice: f32 OpenVINO gives eager logits within 1e-3."""
    t1 = np.asarray(nib.load(str(mni_dir / "t1.nii.gz")).dataobj, dtype=np.float32)
    x, _ = lite.preprocess(t1[:, :, 80].T)
    eager, fast = TorchSAMRuntime(lite), OpenVINOSAMRuntime(lite, ir_dir=ir_dir, precision="f32")
    emb = eager.encode(x)
    torch.testing.assert_close(fast.encode(x), emb, atol=1e-3, rtol=1e-3)
    for kw in _prompt_sets():
        ref_low, ref_iou = eager.decode(emb, **kw)
        low, iou = fast.decode(emb, **kw)
        assert low.shape == ref_low.shape
        torch.testing.assert_close(low, ref_low, atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(iou, ref_iou, atol=1e-4, rtol=1e-4)
        if "boxes" in kw and "points" not in kw:  # a correction round: the previous mask fed back
            ref_low2, _ = eager.decode(emb, masks=ref_low, **kw)
            torch.testing.assert_close(fast.decode(emb, masks=ref_low, **kw)[0], ref_low2, atol=1e-3, rtol=1e-3)


def test_default_fast_path_masks_match_eager_on_real_slices(lite, ir_dir, mni_dir):
    """What bundles use on the CPU (``auto`` backend: OpenVINO, f32): Dice >= 0.99 against eager.

    Boxes and clicks around real MNI152 structures (white matter, grey matter, brain), on axial
    slices through the whole brain, in the predictor users call.
    """
    img = nib.load(str(mni_dir / "t1.nii.gz"))
    labels = np.asarray(nib.load(str(mni_dir / "labels.nii.gz")).dataobj)
    vol = np.asarray(img.dataobj, dtype=np.float32)
    eager = PromptablePredictor(lite, device="cpu", backend="torch")
    fast = PromptablePredictor(lite, device="cpu", backend="auto", runtime_dir=str(ir_dir))
    assert fast.runtime.name == "openvino"
    eager.set_volume(vol, img.affine)
    fast.set_volume(vol, img.affine)
    work = eager.frame.to_working(labels)
    dices, nonempty = [], []
    for k in (50, 80, 110):
        for target in (work[:, :, k] == 1, work[:, :, k] == 2, work[:, :, k] > 0):
            idx = np.argwhere(target)
            box = [*idx.min(0), *idx.max(0)]
            centre = idx[len(idx) // 2].tolist()
            for prompt in (dict(box=box), dict(points=[centre], point_labels=[1]),
                           dict(box=box, points=[centre], point_labels=[1])):
                a, _ = eager.predict_slice(k, **prompt)
                b, _ = fast.predict_slice(k, **prompt)
                nonempty.append(bool(a.any()))
                dices.append(2 * (a & b).sum() / (a.sum() + b.sum()) if a.any() or b.any() else 1.0)
    assert min(dices) >= 0.99, dices
    assert sum(nonempty) >= 20, nonempty  # zero-shot clicks may miss; most prompts give masks
    assert eager.encoder_calls == fast.encoder_calls == 3


def test_stored_ir_is_tied_to_its_weights(lite, ir_dir, tmp_path):
    """An IR from other weights, or a missing file, is refused with the file named; never silently used."""
    other = build_network("litemedsam", pretrained=True).eval()
    with torch.no_grad():
        other.mask_decoder.iou_token.weight.add_(0.1)
    with pytest.raises(BundleError, match="sam_encoder.xml: was not made from"):
        read_openvino_ir(other, ir_dir)
    partial = tmp_path / "partial"
    shutil.copytree(ir_dir, partial)
    (partial / "sam_decoder.bin").unlink()
    with pytest.raises(BundleError, match="sam_decoder.xml: missing"):
        read_openvino_ir(lite, partial)


def test_backend_choice(lite):
    assert make_runtime(lite, "torch").name == "torch"
    with pytest.raises(ConfigError, match="unknown inference backend"):
        make_runtime(lite, "onnx")
    with pytest.raises(ConfigError, match="runs on the CPU"):
        make_runtime(lite, "openvino", device=torch.device("cuda"))
    assert make_runtime(lite, "auto", device=torch.device("cuda")).name == "torch"  # GPUs run eager


def test_export_check_refuses_a_conversion_that_disagrees(tmp_path):
    """The shared export check: relative to the eager range, and a disagreement names the IR folder."""
    from medimg.models.openvino_ir import check_outputs

    ref = torch.linspace(-10, 10, 100)
    assert check_outputs([(ref.numpy() + 5e-3, ref)], tmp_path, 1e-3) == pytest.approx(5e-4, rel=1e-3)
    with pytest.raises(BundleError, match="disagrees") as err:
        check_outputs([(ref.numpy(), ref), (np.zeros(3, np.float32), torch.ones(3))], tmp_path, 1e-3)
    assert str(tmp_path) in str(err.value)


def test_the_sam_check_compares_every_mask_and_iou(lite, ir_dir, tmp_path):
    """The export check compared one box and mask 0 only: an IR whose masks 1-3 and IoU are wrong passed it."""
    import openvino as ov

    from medimg.models.sam.runtime import IR_FILES, check_conversion, convert_decoders

    other = copy.deepcopy(lite)
    with torch.no_grad():
        other.mask_decoder.output_hypernetworks_mlps[2].layers[-1].bias.add_(0.5)
        other.mask_decoder.iou_prediction_head.layers[-1].bias.add_(0.5)
    enc = ov.Core().read_model(str(ir_dir / f"{IR_FILES['encoder']}.xml"))  # lite's own, checked encoder
    dec, dec_mask = convert_decoders(other)
    with pytest.raises(BundleError, match="disagrees"):
        check_conversion(lite, (enc, dec, dec_mask), tmp_path)


def test_a_stale_stored_ir_gives_a_working_runtime_and_one_warning(lite, ir_dir, tmp_path, monkeypatch, caplog):
    """A bundle's IR from other weights is replaced by a checked conversion in the cache, never a traceback."""
    monkeypatch.setenv("MEDIMG_IR_CACHE", str(tmp_path / "cache"))
    other = copy.deepcopy(lite)
    with torch.no_grad():
        other.mask_decoder.iou_token.weight.add_(0.1)
    stored = tmp_path / "mybundle" / "models" / "openvino"
    shutil.copytree(ir_dir, stored)
    with caplog.at_level(logging.WARNING):
        runtime = make_runtime(other, "openvino", stored)
    assert runtime.name == "openvino"
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "mybundle" in warnings[0] and "was not made from" in warnings[0], warnings
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    box = torch.tensor([[60.0, 50.0, 190.0, 210.0]])
    ref = TorchSAMRuntime(other)
    emb = ref.encode(x)
    torch.testing.assert_close(runtime.encode(x), emb, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(runtime.decode(emb, boxes=box)[0], ref.decode(emb, boxes=box)[0], atol=1e-3, rtol=1e-3)
