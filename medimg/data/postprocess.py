"""Label-map post-processing chosen on validation, nnU-Net style: keep the main connected component.

A tissue network that has never seen a head can label scalp, muscle or neck as tissue. Most of
it is either disconnected from the organ or hangs on by a thin bridge. :func:`keep_main_component`
merges every foreground label into one mask, cuts bridges thinner than ``2 * opening_mm`` with a
morphological opening in millimetres (so it means the same at any voxel size), keeps the largest
connected part (MONAI's ``get_largest_connected_component_mask``, face connectivity) and restores
the original voxels within ``opening_mm`` plus one voxel of it. Labels inside keep their values;
everything else becomes 0.

Whether a bundle applies it is decided on its validation data (``task.keep_main_component:
auto``): like nnU-Net's post-processing search, it is kept only when it does not lower the
validation Dice beyond noise (:func:`choose_main_component`). A dataset of several separate
organs is never silently cut down to one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform
from monai.transforms.utils import get_largest_connected_component_mask
from scipy import ndimage

from medimg.errors import ConfigError

MAIN_COMPONENT_TOLERANCE = 5e-3  # mean validation Dice the step may cost and still be chosen
MODES = ("auto", True, False)


def ellipsoid(radius_mm: float, spacing: Sequence[float]) -> np.ndarray | None:
    """A boolean ellipsoid of ``radius_mm`` on a grid of ``spacing`` (mm), or ``None`` when under a voxel."""
    radii = [int(np.floor(radius_mm / max(float(s), 1e-6))) for s in spacing]
    if max(radii) < 1:
        return None
    grid = np.ogrid[tuple(slice(-r, r + 1) for r in radii)]
    dist = sum((g / r) ** 2 for g, r in zip(grid, radii) if r > 0)  # ogrid axes broadcast
    return dist <= 1.0


def keep_main_component(labels: np.ndarray, spacing: Sequence[float] | None = None,
                        opening_mm: float = 0.0) -> np.ndarray:
    """Zero every foreground voxel outside the main connected component.

    Args:
        labels: integer label map (spatial dims only); 0 is background.
        spacing: voxel size in mm along each axis (1 mm when ``None``).
        opening_mm: radius of the opening that cuts thin bridges before the largest component is
            taken; 0 keeps the plain largest component.

    Returns:
        A label map of the same shape and dtype.
    """
    labels = np.asarray(labels)
    fg = labels > 0
    if not fg.any():
        return labels.copy()
    spacing = [1.0] * labels.ndim if spacing is None else list(spacing)
    if len(spacing) != labels.ndim:
        raise ValueError(f"spacing {spacing} does not match a {labels.ndim}-D label map")
    keep = np.asarray(get_largest_connected_component_mask(fg, connectivity=1))
    ball = ellipsoid(float(opening_mm), spacing) if opening_mm > 0 else None
    if ball is not None:
        core = ndimage.binary_erosion(keep, ball)
        if core.any():  # a structure thinner than the opening is left to the plain largest component
            core = np.asarray(get_largest_connected_component_mask(core, connectivity=1))
            # one voxel beyond the opening: the staircase corners of a voxelised surface come back
            grown = ndimage.binary_dilation(core, ellipsoid(float(opening_mm) + min(spacing), spacing))
            keep = np.asarray(get_largest_connected_component_mask(fg & grown, connectivity=1))
    return np.where(keep, labels, 0).astype(labels.dtype)


def spacing_of(img: Any, ndim: int) -> list[float]:
    """Voxel size (mm) from a MetaTensor's affine; 1 mm per axis without one."""
    affine = getattr(img, "affine", None)
    if affine is None:
        return [1.0] * ndim
    aff = np.asarray(affine.cpu() if hasattr(affine, "cpu") else affine, dtype=float)
    aff = aff[0] if aff.ndim == 3 else aff
    return [float(v) for v in np.linalg.norm(aff[:ndim, :ndim], axis=0)]


class KeepMainComponent(Transform):
    """:func:`keep_main_component` on a channel-first label map (MetaTensor: spacing from its affine).

    Args:
        enabled: apply it (a bundle writes the validation's choice here); ``False`` passes through.
        opening_mm: see :func:`keep_main_component`.
    """

    def __init__(self, enabled: bool = True, opening_mm: float = 3.0) -> None:
        self.enabled, self.opening_mm = bool(enabled), float(opening_mm)

    def __call__(self, img: Any) -> Any:
        """The label map with only its main component kept, same type, shape and meta data."""
        if not self.enabled:
            return img
        arr = as_numpy(img)
        spacing = spacing_of(img, arr.ndim - 1)
        return like(img, np.stack([keep_main_component(ch, spacing, self.opening_mm) for ch in arr]))


class KeepMainComponentd(MapTransform):
    """Dictionary version of :class:`KeepMainComponent` (for a bundle's ``postprocessing``)."""

    def __init__(self, keys: KeysCollection, enabled: bool = True, opening_mm: float = 3.0,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.op = KeepMainComponent(enabled, opening_mm)

    def __call__(self, data: dict) -> dict:
        """Apply to each key."""
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.op(d[key])
        return d


def check_choice(value: Any, setting: str = "task.keep_main_component") -> Any:
    """A validation-chosen post-processing setting checked: ``auto``, ``true`` or ``false``."""
    if value in MODES:
        return value
    raise ConfigError(setting, f"{value!r} is not one of auto, true, false")


def check_mode(value: Any) -> Any:
    """``task.keep_main_component`` checked: ``auto``, ``true`` or ``false``."""
    return check_choice(value, "task.keep_main_component")


def choose_on_validation(mode: Any, metrics: dict[str, Any], setting: str, with_step: str,
                         tolerance: float) -> bool:
    """Whether a bundle applies a post-processing step, nnU-Net style.

    Args:
        mode: ``True`` / ``False`` as configured, or ``"auto"``: decide on validation.
        metrics: the best checkpoint's validation metrics: ``val/dice`` (without the step) and
            ``with_step`` (with it).
        setting: the config key, for the error message.
        with_step: the metric measured with the step.
        tolerance: mean validation Dice the step may cost and still be chosen.

    Returns:
        ``auto``: ``True`` when the step costs at most ``tolerance``; ``False`` when nothing was
        measured (outputs are never changed unseen).
    """
    mode = check_choice(mode, setting)
    if mode != "auto":
        return bool(mode)
    before, after = metrics.get("val/dice"), metrics.get(with_step)
    if not isinstance(before, (int, float)) or not isinstance(after, (int, float)):
        return False
    return bool(after >= before - tolerance)


def choose_main_component(mode: Any, metrics: dict[str, Any]) -> bool:
    """Whether the bundle applies :func:`keep_main_component`.

    ``auto``: when it costs at most :data:`MAIN_COMPONENT_TOLERANCE` mean validation Dice
    (:func:`choose_on_validation`). A validation set without heads (a skull-stripped template)
    cannot show the gain, only a cost; that cost must stay within run-to-run noise.
    """
    return choose_on_validation(mode, metrics, "task.keep_main_component", "val/dice_main_component",
                                MAIN_COMPONENT_TOLERANCE)


def as_numpy(values: Any) -> np.ndarray:
    """A tensor's (or array's) values as a NumPy array on the CPU; :func:`like` turns them back."""
    return values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)


def like(template: Any, values: np.ndarray) -> Any:
    """``values`` in the type of ``template``: a tensor (MetaTensor: its metadata kept) or an array."""
    if isinstance(template, torch.Tensor):
        res = template.clone()
        res.copy_(torch.as_tensor(values, dtype=template.dtype))
        return res
    return values
