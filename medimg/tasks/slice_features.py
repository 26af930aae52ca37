"""What 2D promptable training computes once per slice and keeps: the frozen part of the image encoder.

With the image encoder frozen (``encoder_frozen``) each slice's embedding is computed once; with
only its last stage and neck training (``encoder_tail``) the frozen stem's features are
(:meth:`~medimg.models.sam.network.PromptableSAM.encode_stem`) and the tail runs every step. Either
way the cost of the encoder's early, high-resolution stages is paid once per slice, which is what
makes click training fit on a CPU. Under ``encoder_tail`` the distillation teacher's embeddings
(its frozen copy of the tail over the same stem features) are kept per slice as well.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from medimg.models.peft import PEFT_MARKERS, tail_parameter_ids


def encoder_frozen(network: nn.Module, except_peft: bool = False) -> bool:
    """No image-encoder parameter trains (``except_peft``: none but its adapters / LoRA)."""
    return not any(p.requires_grad for n, p in network.image_encoder.named_parameters()
                   if not (except_peft and any(m in n for m in PEFT_MARKERS)))


def cached_part(network: nn.Module) -> str | None:
    """``embedding`` (the encoder is frozen), ``stem`` (only its tail trains) or ``None`` (nothing is cached)."""
    if encoder_frozen(network):
        return "embedding"
    tail = tail_parameter_ids(network)
    stem_frozen = not any(p.requires_grad for p in network.image_encoder.parameters() if id(p) not in tail)
    return "stem" if stem_frozen else None


class SliceFeatures:
    """The per-slice cache of a 2D promptable network's frozen encoder part, keyed by (split, volume, slice).

    Args:
        network: a 2D :class:`~medimg.models.sam.network.PromptableSAM` with its freeze policy applied.
    """

    def __init__(self, network: nn.Module) -> None:
        self.network = network
        self.cache: dict[tuple, torch.Tensor] = {}

    @property
    def part(self) -> str | None:
        """What is cached now (:func:`cached_part`)."""
        return cached_part(self.network)

    def _cached(self, batch: dict, split: str, compute: Callable[[list[int]], torch.Tensor]) -> torch.Tensor:
        """``compute(indices)`` for the batch's slices not seen before (no gradient); each slice's result is kept."""
        keys = [(split, int(v), int(k)) for v, k in zip(batch["volume"], batch["slice"])]
        missing = [i for i, key in enumerate(keys) if key not in self.cache]
        if missing:
            self.network.image_encoder.eval()
            with torch.no_grad():
                out = compute(missing)
            for j, i in enumerate(missing):
                self.cache[keys[i]] = out[j].cpu()
        return torch.stack([self.cache[key] for key in keys]).to(batch["image"].device)

    def stem(self, batch: dict, split: str) -> torch.Tensor:
        """The frozen encoder stem's features of the batch's slices."""
        return self._cached(batch, split, lambda idx: self.network.encode_stem(batch["image"][idx]))

    def teacher(self, batch: dict, split: str, embed: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """A frozen teacher's embeddings of the batch's slices, ``embed(stem features)``, computed once per slice."""
        return self._cached(batch, f"{split}/teacher", lambda idx: embed(self.stem(batch, split)[idx]))

    def embed(self, batch: dict, split: str) -> torch.Tensor:
        """The batch's image embeddings: cached, the tail over cached stem features, or the whole encoder."""
        part = self.part
        if part == "embedding":
            return self._cached(batch, split, lambda idx: self.network.encode(batch["image"][idx]))
        if part == "stem":
            self.network.image_encoder.eval()  # the tail's normalisation statistics stay as released
            return self.network.encode_tail(self.stem(batch, split))
        return self.network.encode(batch["image"])
