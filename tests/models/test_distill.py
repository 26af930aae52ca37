"""Distillation toward the decoder as training started, and SAM's best-of-three training of a lone click."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medimg.models import build_network
from medimg.models.peft import apply_freeze_policy
from medimg.tasks.distill import DecoderTeacher, distillation_loss, random_boxes
from medimg.tasks.promptable import PromptableTask


def _tiny_sam(seed: int = 0):
    torch.manual_seed(seed)
    return build_network("sam", size="tiny", img_size=256)


def test_teacher_is_a_frozen_snapshot_that_decodes_like_the_network():
    net = _tiny_sam()
    teacher = DecoderTeacher(net)
    teacher.snapshot(net)
    emb = net.encode(torch.randn(2, 3, 256, 256)).detach()
    boxes = torch.tensor([[20.0, 30.0, 120.0, 140.0], [5.0, 5.0, 60.0, 90.0]])
    torch.testing.assert_close(teacher.decode(emb, boxes), net.decode(emb, boxes=boxes)[0])
    assert not any(p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        for p in net.mask_decoder.parameters():
            p.add_(0.05)
    assert not torch.allclose(teacher.decode(emb, boxes), net.decode(emb, boxes=boxes)[0])  # the teacher stays


def test_random_boxes_lie_on_the_content_inside_the_frame():
    images = torch.zeros(2, 3, 64, 64)
    images[0, :, 40:60, 5:20] = 1.0  # content only there
    boxes = random_boxes(images, 5, np.random.default_rng(0))
    assert len(boxes) == 10
    for x0, y0, x1, y1 in boxes:
        assert 0 <= x0 < x1 <= 63 and 0 <= y0 < y1 <= 63
    for x0, y0, x1, y1 in boxes[:5]:  # centred on the content of image 0
        assert 5 <= (x0 + x1) / 2 <= 20 or x0 == 0
        assert 40 <= (y0 + y1) / 2 <= 60 or y1 == 63


def test_distillation_pulls_the_student_back_toward_the_teacher():
    teacher_logits = torch.randn(3, 1, 16, 16) * 4
    near = distillation_loss(teacher_logits.clone(), teacher_logits)
    far = distillation_loss(-teacher_logits, teacher_logits)
    assert float(far) > float(near) + 1.0


def test_a_training_step_with_distillation_and_a_lone_click():
    net = _tiny_sam()
    net.image_encoder.requires_grad_(False)
    task = PromptableTask(net, click_rounds=2, box_prob=0.0, distill_weight=1.0, distill_boxes=2)
    task.teacher.snapshot(net)
    target = torch.zeros(2, 1, 256, 256)
    target[0, :, 60:140, 80:180] = 1
    target[1, :, 100:200, 30:90] = 1
    batch = {"image": torch.rand(2, 3, 256, 256), "target": target, "volume": torch.tensor([0, 0]),
             "slice": torch.tensor([0, 1])}
    task.log = lambda *a, **k: None
    loss = task.training_step(batch, 0)
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    grads = [p.grad for p in net.mask_decoder.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)
    # the multimask tokens were trained: the lone first click decodes three candidates
    assert any(float(p.grad.abs().sum()) > 0 for n, p in net.mask_decoder.named_parameters()
               if n.startswith("mask_tokens") and p.grad is not None)
    assert all(p.grad is None for p in task.teacher.parameters())


def test_ritm_rounds_decode_without_gradients_and_train_one(monkeypatch):
    """``rounds="last"``: 0 to click_rounds - 1 rounds under no_grad, then one trained round after the first prompt."""
    net = _tiny_sam()
    net.image_encoder.requires_grad_(False)
    task = PromptableTask(net, click_rounds=4, box_prob=1.0, rounds="last")
    task.log = lambda *a, **k: None
    calls = []
    decode = task._decode

    def spy(*args, **kwargs):
        out = decode(*args, **kwargs)
        calls.append(out[0].requires_grad)
        return out

    monkeypatch.setattr(task, "_decode", spy)
    target = torch.zeros(2, 1, 256, 256)
    target[:, :, 60:140, 80:180] = 1
    batch = {"image": torch.rand(2, 3, 256, 256), "target": target, "volume": torch.tensor([0, 0]),
             "slice": torch.tensor([0, 1])}
    lengths = set()
    for _ in range(12):
        calls.clear()
        task.training_step(batch, 0).backward()
        assert calls[0] and calls[-1] and not any(calls[1:-1])  # first prompt and last round train
        lengths.add(len(calls))
    assert lengths <= {2, 3, 4, 5} and len(lengths) >= 3  # a random depth each step


@pytest.mark.parametrize("name, kwargs", [("sam", {"size": "tiny", "img_size": 256}), ("litemedsam", {})])
def test_the_encoder_splits_into_a_stem_and_a_tail_that_together_are_the_encoder(name, kwargs):
    torch.manual_seed(0)
    net = build_network(name, **kwargs).eval()
    x = torch.rand(1, 3, net.img_size, net.img_size)
    with torch.no_grad():
        whole, split = net.encode(x), net.encode_tail(net.encode_stem(x))
    torch.testing.assert_close(split, whole, rtol=0, atol=0)
    apply_freeze_policy(net, "encoder_tail")
    encoder = {n for n, p in net.image_encoder.named_parameters() if p.requires_grad}
    last = "blocks.1." if name == "sam" else f"layers.{len(net.image_encoder.layers) - 1}."
    assert encoder and all(n.startswith((last, "neck.")) for n in encoder)
    assert any(n.startswith("neck.") for n in encoder) and any(n.startswith(last) for n in encoder)
    assert all(p.requires_grad for p in net.mask_decoder.parameters())


def test_a_tail_training_step_caches_the_stem_and_distils_from_the_teachers_own_embeddings(monkeypatch):
    net = _tiny_sam()
    apply_freeze_policy(net, "encoder_tail")
    task = PromptableTask(net, click_rounds=2, box_prob=0.5, distill_weight=1.0, distill_boxes=1, rounds="last")
    task.teacher.snapshot(net)
    task.log = lambda *a, **k: None
    assert task.features.part == "stem" and task.teacher.encoder is not None
    stem_calls = []
    stem = net.encode_stem
    monkeypatch.setattr(net, "encode_stem", lambda x: stem_calls.append(len(x)) or stem(x))
    target = torch.zeros(2, 1, 256, 256)
    target[:, :, 60:140, 80:180] = 1
    batch = {"image": torch.rand(2, 3, 256, 256), "target": target, "volume": torch.tensor([0, 0]),
             "slice": torch.tensor([0, 1])}
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=1.0)
    for _ in range(2):
        opt.zero_grad()
        task.training_step(batch, 0).backward()
        tail_grads = [p.grad for m in net.encoder_tail_modules() for p in m.parameters()]
        assert any(g is not None and float(g.abs().sum()) > 0 for g in tail_grads)
        assert all(p.grad is None for n, p in net.image_encoder.named_parameters() if n.startswith("patch_embed"))
        opt.step()
    assert stem_calls == [2]  # the frozen stem ran once per slice, then came from the cache
    features = task.features.stem(batch, "train")
    with torch.no_grad():  # the tail moved; the teacher still embeds as the encoder was
        assert not torch.allclose(net.encode_tail(features), task.teacher.embed(features))
        torch.testing.assert_close(task.teacher.embed(features), _tiny_sam().encode(batch["image"]))
