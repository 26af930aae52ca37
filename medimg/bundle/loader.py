"""Load an exported bundle: its network with weights, and its ``predictor`` component.

The bundle's ``inference.json`` is parsed exactly as ``monai.bundle run`` parses it. The
``predictor`` component is instantiated by MONAI's ``ConfigParser`` with the loaded network put in
place of ``@network``, so every argument (plane, intensity, sliding-window settings, transforms)
comes from the bundle itself.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medimg.errors import BundleError, find_medimg_error

if TYPE_CHECKING:  # MONAI and PyTorch load only when a bundle is built, not to read its metadata
    import torch
    from monai.bundle import ConfigParser

log = logging.getLogger(__name__)
_MISSING = object()


def _parser(bundle_dir: Path) -> ConfigParser:
    from monai.bundle import ConfigParser

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
    """The bundle's ``medimg_task``: ``segmentation``, ``promptable`` or ``classification``."""
    from medimg.bundles import resolve_bundle

    bundle_dir = resolve_bundle(bundle_dir)
    meta = Path(bundle_dir) / "configs" / "metadata.json"
    if not meta.is_file():
        raise BundleError(meta, "missing from the bundle")
    for required in (Path(bundle_dir) / "configs" / "inference.json", Path(bundle_dir) / "models" / "model.pt"):
        if not required.is_file():
            raise BundleError(required, "missing from the bundle")
    try:  # plain JSON: MONAI's parser is not needed (nor imported) to read one field
        return str(json.loads(meta.read_text()).get("medimg_task", "segmentation"))
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise BundleError(meta, f"is not valid JSON ({exc})") from exc


def _device(device: str | torch.device | None) -> torch.device:
    import torch

    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def load_bundle_network(bundle_dir: str | Path, device: str | torch.device | None = None) -> torch.nn.Module:
    """The bundle's ``network_def`` with ``models/model.pt`` loaded (``weights_only``), in eval mode."""
    from medimg.models.weights import read_checkpoint

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
    return network.to(_device(device)).eval()


def load_bundle(path: str | Path, device: str | torch.device | None = None,
                overrides: Mapping[str, Any] | None = None) -> Any:
    """The predictor of an exported medimg bundle, whatever its kind.

    Args:
        path: the bundle folder, or the short name of a bundle shipped with medimg
            (``"tissue_t1"``; ``python -m medimg.bundles`` lists them).
        device: ``cpu``, ``cuda`` or ``cuda:N`` (default: CUDA when available).
        overrides: top-level ``configs/inference.json`` values to replace for this load, as
            ``monai.bundle run --key value`` does: ``{"intensity_refinement": False}``,
            ``{"overlap": 0.5}``, ``{"keep_main_component": False}``. Only keys the bundle
            already has; the folder is not changed.

    Returns:
        A :class:`~medimg.predictors.segmentation.SegmentationPredictor`
        (:class:`~medimg.predictors.protocols.Segmenter`), a 2D or 3D promptable predictor
        (:class:`~medimg.predictors.protocols.PromptSegmenter`) or a
        :class:`~medimg.predictors.classification.ClassificationPredictor`
        (:class:`~medimg.predictors.protocols.Classifier`).

    Raises:
        BundleError: a missing file, weights that do not fit, or no ``predictor`` component.
    """
    from medimg.bundles import resolve_bundle

    bundle_dir = resolve_bundle(path)
    if not bundle_dir.is_dir():
        raise BundleError(bundle_dir, "no such bundle folder")
    parser = _parser(bundle_dir)
    config = bundle_dir / "configs" / "inference.json"
    for key, value in (overrides or {}).items():
        fixed = key in ("network", "network_def", "predictor", "bundle_root", "device")
        if fixed or parser.get(key, _MISSING) is _MISSING:
            raise BundleError(config, f"has no setting {key!r} that can be overridden")
        parser[key] = value
    if not isinstance(parser.get("predictor"), dict) or "_target_" not in parser.get("predictor"):
        raise BundleError(config, "has no 'predictor' component; export the run again with this medimg")
    dev = _device(device)
    parser["network"] = load_bundle_network(bundle_dir, dev)
    parser["device"] = f"$torch.device('{dev}')"
    try:
        return parser.get_parsed_content("predictor")
    except Exception as exc:  # noqa: BLE001 - a malformed config fails in many ways
        inner = find_medimg_error(exc)
        if inner is not None:  # the predictor's own, precise error (a stale OpenVINO IR, ...)
            raise inner from exc
        raise BundleError(config, f"cannot build the predictor ({str(exc).splitlines()[0][:200]})") from exc
