"""Run an exported bundle's own ``inference.json`` on images (the path ``medimg.infer`` uses).

The bundle's preprocessing, network, inferer and postprocessing are parsed exactly as
``monai.bundle run`` parses them (writer excluded, as MONAI Label does); the prediction is then
written by :func:`medimg.data.io.write_like` with the input's own affine and header.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.transforms import Compose, SaveImaged
from monai.utils import MetaKeys

from medimg.data.io import NIFTI_SUFFIXES, Image, has_suffix
from medimg.errors import BundleError, DataError
from medimg.models.weights import read_checkpoint

log = logging.getLogger(__name__)


def _parser(bundle_dir: Path) -> ConfigParser:
    config = bundle_dir / "configs" / "inference.json"
    meta = bundle_dir / "configs" / "metadata.json"
    for required in (config, meta, bundle_dir / "models" / "model.pt"):
        if not required.is_file():
            raise BundleError(required, "missing from the bundle")
    parser = ConfigParser()
    parser.read_config(str(config))
    parser.read_meta(str(meta))
    parser["bundle_root"] = str(bundle_dir)
    return parser


def bundle_task(bundle_dir: str | Path) -> str:
    """The bundle's ``medimg_task`` (``segmentation`` when the metadata does not say)."""
    meta = Path(bundle_dir) / "configs" / "metadata.json"
    if not meta.is_file():
        raise BundleError(meta, "missing from the bundle")
    return str(_parser(Path(bundle_dir)).get("_meta_", {}).get("medimg_task", "segmentation"))


def is_promptable(bundle_dir: str | Path) -> bool:
    """True for bundles whose metadata says ``"medimg_task": "promptable"``."""
    return bundle_task(bundle_dir) == "promptable"


def load_bundle_network(bundle_dir: str | Path, device: str | None = None) -> torch.nn.Module:
    """The bundle's ``network_def`` with ``models/model.pt`` loaded (``weights_only``)."""
    bundle_dir = Path(bundle_dir)
    parser = _parser(bundle_dir)
    try:
        network = parser.get_parsed_content("network_def")
    except Exception as exc:  # noqa: BLE001
        raise BundleError(bundle_dir / "configs" / "inference.json",
                          f"cannot build network_def ({str(exc).splitlines()[0][:200]})") from exc
    weights = bundle_dir / "models" / "model.pt"
    try:
        network.load_state_dict(read_checkpoint(weights), strict=True)
    except RuntimeError as exc:
        raise BundleError(weights, f"weights do not fit network_def ({str(exc).splitlines()[0]})") from exc
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return network.to(dev).eval()


def load_bundle_predictor(bundle_dir: str | Path, device: str | None = None) -> Any:
    """A promptable or classification bundle's ``predictor`` component, with its network and weights.

    The component's other arguments (``roi_size``, ``pixdim``, ...) come from ``inference.json``.
    """
    from pydoc import locate

    bundle_dir = Path(bundle_dir)
    parser = _parser(bundle_dir)
    config = bundle_dir / "configs" / "inference.json"
    spec = parser.get("predictor")
    if not isinstance(spec, dict) or "_target_" not in spec:
        raise BundleError(config, "this bundle needs a 'predictor' component with a _target_")
    network = load_bundle_network(bundle_dir, device)
    try:
        kwargs = {k: parser.get_parsed_content(f"predictor::{k}") for k in spec
                  if k not in ("_target_", "network", "device")}
        return locate(spec["_target_"])(network, device=str(next(network.parameters()).device), **kwargs)
    except Exception as exc:  # noqa: BLE001
        raise BundleError(config, f"cannot build the predictor ({str(exc).splitlines()[0][:200]})") from exc


class BundlePredictor:
    """Load a bundle once, predict many images.

    Args:
        bundle_dir: the bundle folder.
        device: ``cpu``, ``cuda`` or ``None`` for CUDA when available.
        amp: mixed precision (default: on for CUDA).
    """

    def __init__(self, bundle_dir: str | Path, device: str | None = None, amp: bool | None = None) -> None:
        self.bundle_dir = Path(bundle_dir)
        config = self.bundle_dir / "configs" / "inference.json"
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.amp = self.device.type == "cuda" if amp is None else amp
        parser = _parser(self.bundle_dir)
        self.network = load_bundle_network(self.bundle_dir, str(self.device))
        try:
            self.preprocessing: Compose = parser.get_parsed_content("preprocessing")
            self.inferer = parser.get_parsed_content("inferer")
            post = parser.get_parsed_content("postprocessing")
        except Exception as exc:  # noqa: BLE001 - a malformed config fails in many ways
            first = str(exc).splitlines()[0][:200]
            raise BundleError(config, f"cannot build the bundle's components ({first})") from exc
        self.postprocessing = Compose([t for t in post.transforms if not isinstance(t, SaveImaged)])

    @torch.no_grad()
    def predict(self, path: str | Path) -> tuple[np.ndarray, Image]:
        """Segment one image file or DICOM series folder.

        Returns:
            ``(labels, reference)``: the label array in the input's own index order and shape, and
            an :class:`Image` carrying the input's geometry (for :func:`write_like`).
        """
        data = self.preprocessing({"image": str(path)})
        image = data["image"]
        autocast = (torch.autocast(device_type=self.device.type, dtype=torch.float16) if self.amp
                    else contextlib.nullcontext())
        with autocast:
            logits = self.inferer(image[None].to(self.device), self.network)
        data["pred"] = logits[0].float().cpu()
        data = self.postprocessing(data)
        pred = data["pred"]
        pred = (pred.as_tensor() if hasattr(pred, "as_tensor") else pred).numpy()
        pred = pred[0] if pred.ndim == image.ndim else pred
        meta = image.meta
        shape = tuple(int(s) for s in np.asarray(meta[MetaKeys.SPATIAL_SHAPE]).ravel())
        if pred.shape != shape:
            raise DataError(path, f"inverted prediction has shape {pred.shape}, input has {shape}")
        affine = np.asarray(meta[MetaKeys.ORIGINAL_AFFINE], dtype=np.float64)
        header = nib.load(str(path)).header if has_suffix(path, NIFTI_SUFFIXES) else None
        reference = Image(np.empty(shape, dtype=np.uint8), affine, Path(path), meta.get("source_kind", ""), header)
        return pred.astype(np.uint8), reference
