"""The 2D promptable preprocessing contract: anatomical slicing plane and volume intensity window.

Training (:class:`~medimg.data.promptable.slices.PromptSliceDataset`), validation and every predictor
(:class:`~medimg.predictors.promptable.PromptablePredictor`, ``medimg.infer``, ``monai.bundle
run``) prepare a volume with the functions here, and a bundle records the two choices they take
(``plane`` and ``intensity``), so inference sees exactly what training and validation saw.

- **Plane.** ``sagittal``, ``coronal`` or ``axial`` is resolved through the affine: the volume is
  reoriented to the closest RAS+ axes (flips and permutations only, no resampling), and the plane's
  normal becomes the last axis of a *working frame* ``(I, J, K)``. An LPS-stored or permuted copy of
  a volume gives the very same working volume, so the network sees the same anatomy the same way
  up. A slice ``working[:, :, k]`` is shown to the network transposed (rows = J, columns = I).
- **Intensity.** One window for the whole volume (a CT preset, or the MR 0.5-99.5 percentiles),
  mapped to 0..255 and rounded, as the official MedSAM / LiteMedSAM data preparation stores its
  images (uint8); each family's per-slice preprocessing follows in the network.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from nibabel.orientations import io_orientation

from medimg.errors import ConfigError

PLANES = {"sagittal": 0, "coronal": 1, "axial": 2}  # the RAS axis normal to each plane
CT_WINDOWS = {  # (level, width) in HU
    "ct_abdomen": (40.0, 400.0),
    "ct_lung": (-600.0, 1500.0),
    "ct_bone": (400.0, 1800.0),
    "ct_brain": (40.0, 80.0),
}
INTENSITY_PRESETS = (*CT_WINDOWS, "mr", "none")


def check_plane(plane: str) -> str:
    """Validate a plane name."""
    if plane not in PLANES:
        raise ConfigError("plane", f"unknown slicing plane {plane!r}; choose from {', '.join(PLANES)}")
    return plane


def axis_plane(affine: np.ndarray, axis: int) -> str:
    """The anatomical plane whose slices are normal to stored ``axis`` (``[:, :, k]`` for axis 2)."""
    ras = int(io_orientation(np.asarray(affine, dtype=np.float64))[axis, 0])
    return {v: k for k, v in PLANES.items()}[ras]


def check_intensity(preset: str) -> str:
    """Validate an intensity preset name."""
    if preset not in INTENSITY_PRESETS:
        raise ConfigError("intensity", f"unknown intensity preset {preset!r}; choose from "
                                       f"{', '.join(INTENSITY_PRESETS)}")
    return preset


def intensity_window(array: np.ndarray, preset: str) -> tuple[float, float]:
    """The ``(low, high)`` intensity window of a preset for this image.

    Args:
        array: the image (any shape).
        preset: a CT window name, ``mr`` (0.5-99.5 percentiles of the whole image) or ``none``
            (the image's own minimum and maximum).
    """
    check_intensity(preset)
    if preset in CT_WINDOWS:
        level, width = CT_WINDOWS[preset]
        return level - width / 2, level + width / 2
    if preset == "mr":
        lo, hi = np.percentile(array, [0.5, 99.5])
    else:
        lo, hi = float(np.min(array)), float(np.max(array))
    return float(lo), float(hi)


def window_to_uint8(array: np.ndarray, preset: str) -> np.ndarray:
    """Clip the image to its preset window and map it to 0..255 (``uint8``, rounded)."""
    lo, hi = intensity_window(array, preset)
    scaled = (np.asarray(array, dtype=np.float32) - lo) / max(hi - lo, 1e-8)
    return np.round(np.clip(scaled, 0.0, 1.0) * 255.0).astype(np.uint8)


@dataclass(frozen=True)
class SliceFrame:
    """The map between a volume as stored on disk and the working frame of a slicing plane.

    Attributes:
        ornt: nibabel orientation ``(n, 2)``: the RAS axis and the flip of each stored axis.
        shape: the stored shape.
        plane: the slicing plane.
    """

    ornt: np.ndarray
    shape: tuple[int, int, int]
    plane: str

    @classmethod
    def from_affine(cls, affine: np.ndarray, shape: Sequence[int], plane: str) -> SliceFrame:
        """The frame of a stored volume of ``shape`` with this RAS+ ``affine``."""
        check_plane(plane)
        shape = tuple(int(s) for s in shape)
        if len(shape) != 3:
            raise ValueError(f"a slicing frame needs a 3D volume, got shape {shape}")
        ornt = io_orientation(np.asarray(affine, dtype=np.float64))
        return cls(ornt, shape, plane)

    @property
    def _order(self) -> list[int]:
        """Stored axes in working order: the two in-plane RAS axes (ascending), then the normal."""
        ras = [int(a) for a in self.ornt[:, 0]]
        normal = PLANES[self.plane]
        in_plane = [r for r in range(3) if r != normal]
        return [ras.index(in_plane[0]), ras.index(in_plane[1]), ras.index(normal)]

    @property
    def slice_axis(self) -> int:
        """The stored array axis that the plane slices along."""
        return self._order[2]

    def to_working(self, array: np.ndarray) -> np.ndarray:
        """Stored volume -> working volume (a view where possible)."""
        if tuple(array.shape) != self.shape:
            raise ValueError(f"volume shape {array.shape} differs from the frame's {self.shape}")
        flips = tuple(a for a in range(3) if self.ornt[a, 1] < 0)
        flipped = np.flip(array, axis=flips) if flips else array
        return np.transpose(flipped, self._order)

    def from_working(self, array: np.ndarray) -> np.ndarray:
        """Working volume -> stored index order (exact inverse of :meth:`to_working`)."""
        back = np.transpose(array, np.argsort(self._order))
        flips = tuple(a for a in range(3) if self.ornt[a, 1] < 0)
        return np.ascontiguousarray(np.flip(back, axis=flips) if flips else back)

    def points_to_working(self, points: np.ndarray) -> np.ndarray:
        """Stored voxel coordinates ``(N, 3)`` -> working coordinates ``(N, 3)``."""
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 3).copy()
        for a in range(3):
            if self.ornt[a, 1] < 0:
                pts[:, a] = self.shape[a] - 1 - pts[:, a]
        return pts[:, self._order]

    def points_from_working(self, points: np.ndarray) -> np.ndarray:
        """Working coordinates ``(N, 3)`` -> stored voxel coordinates (inverse of :meth:`points_to_working`)."""
        work = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        pts = np.empty_like(work)
        pts[:, self._order] = work
        for a in range(3):
            if self.ornt[a, 1] < 0:
                pts[:, a] = self.shape[a] - 1 - pts[:, a]
        return pts

    def boxes_to_working(self, boxes: np.ndarray) -> np.ndarray:
        """Stored boxes ``(N, 6)`` ``[lo..., hi...]`` -> working boxes, corners re-sorted."""
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 6)
        a, b = self.points_to_working(boxes[:, :3]), self.points_to_working(boxes[:, 3:])
        return np.concatenate([np.minimum(a, b), np.maximum(a, b)], axis=1)


def prepare_volume(array: np.ndarray, affine: np.ndarray, plane: str, intensity: str) -> tuple[np.ndarray, SliceFrame]:
    """A stored volume -> its uint8 working volume (slices along the last axis) and the frame.

    This is the one preparation shared by training, validation and every 2D promptable predictor.
    """
    frame = SliceFrame.from_affine(affine, array.shape, plane)
    return frame.to_working(window_to_uint8(array, intensity)), frame
