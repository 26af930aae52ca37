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
# ranges of the numeric settings medimg's bundles share: (lowest, lowest allowed?, highest, highest allowed?)
_RANGES = {"overlap": (0.0, True, 1.0, False), "intensity_fit_power": (0.0, False, None, False),
           "main_component_opening_mm": (0.0, True, None, False), "sw_batch_size": (1, True, None, False)}


def check_override(key: str, value: Any, current: Any) -> str | None:
    """Why ``value`` cannot replace the bundle's ``current`` value of ``key`` (``None``: it can).

    A value keeps the kind of the one it replaces (a switch stays ``true``/``false``, a number a
    number, a size a list of as many numbers), and the shared numeric settings stay in range.
    """
    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if isinstance(current, bool) and not isinstance(value, bool):
        return f"must be true or false, got {value!r}"
    if number(current) and not number(value):
        return f"must be a number, got {value!r}"
    if isinstance(current, list) and current and all(number(v) for v in current):
        if not (isinstance(value, list) and len(value) == len(current) and all(number(v) for v in value)):
            return f"must be a list of {len(current)} numbers, got {value!r}"
    elif isinstance(current, list) and not isinstance(value, list):
        return f"must be a list, got {value!r}"
    if key == "sw_batch_size" and number(value) and not float(value).is_integer():
        return f"must be a whole number, got {value!r}"
    if key in _RANGES and number(value):
        low, low_ok, high, high_ok = _RANGES[key]
        if value < low or (value == low and not low_ok):
            return f"must be {'>=' if low_ok else '>'} {low:g}, got {value!r}"
        if high is not None and (value > high or (value == high and not high_ok)):
            return f"must be {'<=' if high_ok else '<'} {high:g}, got {value!r}"
    return None


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
        card = json.loads(meta.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(meta, f"is not valid JSON ({exc})") from exc
    if not isinstance(card, dict):
        raise BundleError(meta, f"is not a JSON object (a {type(card).__name__}): not a bundle's metadata")
    return str(card.get("medimg_task", "segmentation"))


def segment_names(bundle: str | Path, promptable: bool) -> tuple[dict[int, str], str, str]:
    """``({label value: segment name}, algorithm name, version)`` from the bundle's metadata.

    Args:
        bundle: the bundle folder.
        promptable: label ``n`` is the ``n``-th prompted object of the bundle's target (names for 1..255).
    """
    meta = json.loads((Path(bundle) / "configs" / "metadata.json").read_text())
    channels = meta.get("network_data_format", {}).get("outputs", {}).get("pred", {}).get("channel_def", {})
    names = {int(k): str(v) for k, v in channels.items() if int(k) > 0}
    if promptable:
        target = names.get(1, "object")
        names = {v: f"{target} {v}" for v in range(1, 256)}
    return names, str(meta.get("name") or f"medimg {Path(bundle).name}"), str(meta.get("version", "0"))


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
            already has, each keeping its kind and range (:func:`check_override`); the
            folder is not changed.

    Returns:
        A :class:`~medimg.predictors.segmentation.SegmentationPredictor`
        (:class:`~medimg.predictors.protocols.Segmenter`), a 2D or 3D promptable predictor
        (:class:`~medimg.predictors.protocols.PromptSegmenter`) or a
        :class:`~medimg.predictors.classification.ClassificationPredictor`
        (:class:`~medimg.predictors.protocols.Classifier`).

    Raises:
        BundleError: a missing file, weights that do not fit, no ``predictor`` component, or an
            override the bundle lacks or whose value cannot stand in for the bundle's.
    """
    from medimg.bundles import resolve_bundle

    bundle_dir = resolve_bundle(path)
    if not bundle_dir.is_dir():
        raise BundleError(bundle_dir, "no such bundle folder")
    parser = _parser(bundle_dir)
    config = bundle_dir / "configs" / "inference.json"
    for key, value in (overrides or {}).items():
        fixed = key in ("network", "network_def", "predictor", "bundle_root", "device")
        current = parser.get(key, _MISSING)
        if fixed or current is _MISSING:
            raise BundleError(config, f"has no setting {key!r} that can be overridden")
        problem = check_override(key, value, current)
        if problem is not None:
            raise BundleError(config, f"setting {key!r} {problem}")
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
