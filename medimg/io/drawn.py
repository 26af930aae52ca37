"""Drawn prompts: scribbles and lassos, as 3D Slicer and OHIF users draw them.

- A **scribble** is a polyline of foreground (label 1) or background (label 0) voxels. It is
  rasterised voxel by voxel and becomes clicks spaced evenly along its length (one per ``step``
  voxels, at most ``max_points``): SAM-family decoders take points, and a stroke is many points
  of the same meaning.
- A **lasso** is a closed contour on the slice the user is viewing; it bounds its object there.
  Its bounding box is the object's box prompt (flat along the slice's normal: a 2D slice model
  follows it through the volume as it does any one-slice box), and on its own slice the mask is
  cut to the filled contour.

Coordinates are voxel indices of the image as stored (:mod:`medimg.io.prompts` converts world
coordinates first).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SCRIBBLE_STEP = 8.0
SCRIBBLE_MAX_POINTS = 12


def rasterize_polyline(vertices: np.ndarray) -> np.ndarray:
    """Every voxel along a polyline ``(V, d)``, in drawing order, without consecutive repeats: ``(M, d)`` int."""
    vertices = np.asarray(vertices, dtype=np.float64)
    pts = [np.round(vertices[0])]
    for a, b in zip(vertices[:-1], vertices[1:]):
        n = int(np.ceil(np.abs(b - a).max()))
        if n:
            t = np.linspace(0.0, 1.0, n + 1)[1:, None]
            pts.extend(np.round(a + t * (b - a)))
    arr = np.asarray(pts).astype(np.int64)
    keep = np.ones(len(arr), dtype=bool)
    keep[1:] = (arr[1:] != arr[:-1]).any(axis=1)
    return arr[keep]


def scribble_clicks(vertices: np.ndarray, step: float = SCRIBBLE_STEP,
                    max_points: int = SCRIBBLE_MAX_POINTS) -> np.ndarray:
    """Clicks along a scribble: ``ceil(length / step)`` voxels (1 to ``max_points``), evenly spaced, ``(n, d)``."""
    voxels = rasterize_polyline(vertices)
    n = int(np.clip(np.ceil(len(voxels) / step), 1, max_points))
    idx = np.floor((np.arange(n) + 0.5) * len(voxels) / n).astype(np.int64)
    return voxels[idx].astype(np.float64)


@dataclass
class Lasso:
    """A closed contour on one slice, in voxel indices.

    Attributes:
        vertices: ``(V, d)`` contour vertices (``d`` = the image's dimensions).
        axis: the stored axis its slice is normal to (``None`` on a 2D image).
        index: that slice's index along ``axis``.
    """

    vertices: np.ndarray
    axis: int | None = None
    index: int = 0

    def box(self) -> np.ndarray:
        """The contour's bounding box ``[lo..., hi...]``, flat (``index``) along ``axis``."""
        lo, hi = self.vertices.min(0), self.vertices.max(0)
        if self.axis is not None:
            lo[self.axis] = hi[self.axis] = self.index
        return np.concatenate([lo, hi])

    def _filled(self, shape: tuple[int, ...]) -> np.ndarray:
        """The filled contour (outline included) on its slice's own 2D grid."""
        from matplotlib.path import Path as PolygonPath  # only when a lasso is drawn: keeps imports light

        plane_axes = [a for a in range(len(shape)) if a != self.axis]
        poly = np.vstack([self.vertices[:, plane_axes], self.vertices[:1, plane_axes]])
        size = tuple(shape[a] for a in plane_axes)
        grid = np.stack(np.meshgrid(*[np.arange(s) for s in size], indexing="ij"), axis=-1).reshape(-1, 2)
        filled = PolygonPath(poly).contains_points(grid).reshape(size)
        outline = rasterize_polyline(poly)
        outline = outline[((outline >= 0) & (outline < np.asarray(size))).all(axis=1)]
        filled[outline[:, 0], outline[:, 1]] = True
        return filled

    def _slice(self, ndim: int) -> tuple:
        index: list = [slice(None)] * ndim
        index[self.axis] = self.index
        return tuple(index)

    def cut(self, mask: np.ndarray) -> np.ndarray:
        """``mask`` cut to the contour on the lasso's slice (in place for a 3D mask; returned)."""
        if self.axis is None:
            return mask & self._filled(mask.shape)
        here = self._slice(mask.ndim)
        mask[here] &= self._filled(mask.shape)
        return mask

    def inside(self, shape: tuple[int, ...]) -> np.ndarray:
        """The filled contour (its outline included) on its slice: a bool array of ``shape``."""
        if self.axis is None:
            return self._filled(shape)
        out = np.zeros(shape, dtype=bool)
        out[self._slice(len(shape))] = self._filled(shape)
        return out

    def keep(self, shape: tuple[int, ...]) -> np.ndarray:
        """Where a mask may stay: everywhere off the lasso's slice, and inside the contour on it."""
        return self.cut(np.ones(shape, dtype=bool))


def make_lasso(vertices: np.ndarray, shape: tuple[int, ...]) -> Lasso:
    """A :class:`Lasso` from voxel vertices, its slice found as the axis along which they do not vary.

    Raises:
        ValueError: fewer than 3 vertices, or (3D) vertices that do not lie on one slice.
    """
    vertices = np.asarray(vertices, dtype=np.float64).reshape(-1, len(shape))
    if len(vertices) < 3:
        raise ValueError("a lasso needs at least 3 vertices")
    if len(shape) == 2:
        return Lasso(vertices)
    spread = vertices.max(0) - vertices.min(0)
    flat = [a for a in range(3) if spread[a] <= 0.5]
    if not flat:
        raise ValueError(f"a lasso must lie on one slice: its vertices span {np.round(spread, 2).tolist()} voxels")
    axis = flat[int(np.argmin(spread[flat]))]
    index = int(np.clip(np.round(vertices[:, axis].mean()), 0, shape[axis] - 1))
    return Lasso(vertices, axis, index)
