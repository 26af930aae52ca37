"""Fine-tuning that does not forget: distillation toward the promptable model as it was before tuning.

Fine-tuning LiteMedSAM's decoder on one structure (white matter) teaches it that every box holds
white matter. :class:`DecoderTeacher` keeps a frozen copy of the prompt encoder and mask decoder
taken when training starts; each step also prompts random boxes anywhere on the slice and pulls
the tuned decoder's masks toward the teacher's there (:func:`distillation_loss`), so behaviour on
everything the run does not tune on is kept while the target improves.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medimg.models.sam.network import decode_prompts, encode_tail


class DecoderTeacher(nn.Module):
    """A frozen copy of a 2D promptable network's prompt encoder and mask decoder.

    Args:
        network: a :class:`~medimg.models.sam.network.PromptableSAM`; call :meth:`snapshot` when
            training starts (after any ``init_weights``), so the teacher is the model being tuned.
        with_encoder: also keep the image encoder as it started (when its tail trains), so the
            teacher decodes its own embeddings (:meth:`embed`).
    """

    def __init__(self, network: nn.Module, with_encoder: bool = False) -> None:
        super().__init__()
        self.prompt_encoder = copy.deepcopy(network.prompt_encoder).requires_grad_(False)
        self.mask_decoder = copy.deepcopy(network.mask_decoder).requires_grad_(False)
        self.encoder = copy.deepcopy(network.image_encoder).requires_grad_(False) if with_encoder else None

    def snapshot(self, network: nn.Module) -> None:
        """Copy the network's current prompt encoder and mask decoder (and image encoder, if kept)."""
        self.prompt_encoder.load_state_dict(network.prompt_encoder.state_dict())
        self.mask_decoder.load_state_dict(network.mask_decoder.state_dict())
        if self.encoder is not None:
            self.encoder.load_state_dict(network.image_encoder.state_dict())

    @torch.no_grad()
    def embed(self, stem_features: torch.Tensor) -> torch.Tensor:
        """The teacher's embeddings from the frozen stem's features (:func:`~medimg.models.sam.network.encode_tail`)."""
        self.eval()
        return encode_tail(self.encoder, stem_features)

    @torch.no_grad()
    def decode(self, embeddings: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """The teacher's low-resolution mask logits for one box per embedding."""
        self.eval()
        return decode_prompts(self.prompt_encoder, self.mask_decoder, embeddings, boxes=boxes)[0]


def random_boxes(images: torch.Tensor, per_image: int, rng: np.random.Generator,
                 min_half: float = 0.03, max_half: float = 0.25) -> list[list[float]]:
    """Random ``(x0, y0, x1, y1)`` boxes centred on image content, in the network's input frame.

    Args:
        images: ``(B, C, S, S)`` network inputs (content is where any channel is non-zero).
        per_image: boxes per image (image ``b``'s boxes come at ``b * per_image ...``).
        rng: random generator.
        min_half: smallest half-side, as a fraction of ``S``.
        max_half: largest half-side, as a fraction of ``S``.
    """
    size = images.shape[-1]
    content = (images.abs().sum(1) > 0).cpu().numpy()
    boxes = []
    for mask in content:
        rows, cols = np.nonzero(mask)
        for _ in range(per_image):
            if len(rows):
                i = rng.integers(len(rows))
                cy, cx = float(rows[i]), float(cols[i])
            else:
                cy = cx = size / 2
            hy, hx = rng.uniform(min_half, max_half, 2) * size
            boxes.append([max(cx - hx, 0.0), max(cy - hy, 0.0), min(cx + hx, size - 1.0), min(cy + hy, size - 1.0)])
    return boxes


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of the student's mask logits against the teacher's probabilities."""
    return F.binary_cross_entropy_with_logits(student, torch.sigmoid(teacher.float()))
