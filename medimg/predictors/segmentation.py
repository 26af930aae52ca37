"""Automatic segmentation with a bundle's own MONAI components (the ``predictor`` of ``swin_unetr``, ``vit_seg``).

The bundle's ``preprocessing``, ``inferer`` and ``postprocessing`` (writer excluded, as MONAI Label
does) run exactly as ``monai.bundle run`` runs them. In-memory inputs enter the very same chain:
the bundle's ``LoadImaged`` reads them through :func:`medimg.io.memory.memory_key`.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch
from monai.transforms import Compose, SaveImaged
from monai.utils import MetaKeys
from torch import nn

from medimg.errors import DataError
from medimg.io.memory import as_image, memory_key
from medimg.models.openvino_ir import OpenVINONetwork, use_openvino


class SegmentationPredictor:
    """Load once, segment many images.

    Args:
        network: the segmentation network, weights loaded.
        preprocessing: the bundle's preprocessing ``Compose`` (starts with ``LoadImaged``).
        inferer: the bundle's inferer (sliding window over volumes or slices).
        postprocessing: the bundle's postprocessing (``Invertd`` back to the input grid); a
            ``SaveImaged`` in it is dropped: results are returned, not written.
        device: ``cpu``/``cuda`` (default: the network's device).
        amp: float16 autocast (CUDA only).
        backend: what the inferer calls: ``torch`` (the network), ``openvino`` (its IR, CPU) or
            ``auto`` (OpenVINO on a CPU, PyTorch on a GPU; what exported ``swin_unetr`` bundles ask for).
        runtime_dir: the bundle's OpenVINO IR (``models/openvino``), made from these weights.
        precision: OpenVINO inference precision (``f32``: the eager arithmetic).
    """

    def __init__(self, network: nn.Module, preprocessing: Compose, inferer: Any, postprocessing: Compose,
                 device: str | torch.device | None = None, amp: bool = True, backend: str = "torch",
                 runtime_dir: str | None = None, precision: str = "f32") -> None:
        self.device = torch.device(device) if device else next(network.parameters()).device
        self.network = network.to(self.device).eval()
        self.backend = backend
        self.runner: nn.Module = self.network
        if use_openvino(backend, self.device):
            self.runner = OpenVINONetwork(self.network, runtime_dir, precision=precision)
        self.preprocessing, self.inferer = preprocessing, inferer
        self.postprocessing = Compose([t for t in postprocessing.transforms if not isinstance(t, SaveImaged)])
        self.amp = bool(amp) and self.device.type == "cuda"

    @torch.inference_mode()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The bundle's inferer on a preprocessed batch ``(1, C, *spatial)``: logits in the model's space.

        MONAI's own sliding window, under ``torch.inference_mode``, over the network or its OpenVINO
        IR (``backend``).
        """
        autocast = (torch.autocast(device_type="cuda", dtype=torch.float16) if self.amp
                    else contextlib.nullcontext())
        with autocast:
            return self.inferer(x.to(self.device), self.runner)

    @torch.inference_mode()
    def labels(self, image: Any, affine: np.ndarray | None = None) -> tuple[np.ndarray, Any]:
        """``(label array in the input's index order, restore)``; see :meth:`predict`."""
        inp = as_image(image, affine)
        with memory_key(inp.image) as key:
            data = self.preprocessing({"image": key})
        x = data["image"]
        logits = self.logits(x[None])
        data["pred"] = logits[0].float().cpu()
        pred = self.postprocessing(data)["pred"]
        pred = np.asarray(pred.as_tensor() if hasattr(pred, "as_tensor") else pred)
        pred = pred[0] if pred.ndim == x.ndim else pred
        shape = tuple(int(s) for s in np.asarray(x.meta[MetaKeys.SPATIAL_SHAPE]).ravel())
        if pred.shape != shape:
            raise DataError(inp.image.path, f"inverted prediction has shape {pred.shape}, input has {shape}")
        return pred.reshape(inp.image.array.shape).astype(np.uint8), inp.restore

    def predict(self, image: Any, affine: np.ndarray | None = None) -> Any:
        """Segment one image.

        Args:
            image: a file path or DICOM folder, a nibabel or SimpleITK image, a ``MetaTensor``, or
                an array (with ``affine``; see :func:`medimg.io.memory.as_image`).
            affine: the RAS+ affine of an array input.

        Returns:
            The label map in the input's own type, shape and geometry (a path gives an
            :class:`~medimg.io.image.Image`; ``.save(path)`` writes it).
        """
        labels, restore = self.labels(image, affine)
        return restore(labels)
