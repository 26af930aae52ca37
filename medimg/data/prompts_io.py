"""Prompts JSON (the DESIGN contract) -> voxel-space boxes and points, validated against the image.

``{"space": "voxel"|"world", "boxes": [[x0,y0,z0,x1,y1,z1], ...], "points": [[x,y,z], ...],
"point_labels": [1|0, ...]}``; 2D images omit z. Voxel coordinates are array indices of the file
as stored; world coordinates are RAS+ mm (DICOM's LPS is already converted by the reader).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medimg.data.manifest import read_json_object
from medimg.errors import DataError


@dataclass
class Prompts:
    """Voxel-space prompts.

    Attributes:
        boxes: ``(N, 2*d)`` boxes ``[lo..., hi...]`` (sorted so lo <= hi).
        points: ``(M, d)`` points.
        point_labels: ``(M,)`` 1 positive / 0 negative.
    """

    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    point_labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), dtype=np.int64))


def _to_voxel(coords: np.ndarray, affine: np.ndarray, nd: int) -> np.ndarray:
    inv = np.linalg.inv(affine[:nd, :nd])
    return (coords - affine[:nd, 3]) @ inv.T


def load_prompts(path: str | Path, shape: tuple[int, ...], affine: np.ndarray) -> Prompts:
    """Read and validate a prompts file for an image of ``shape`` (2 or 3 dims) and ``affine``.

    Raises:
        DataError: naming the prompts file: bad JSON, wrong lengths, labels that do not match the
            points, or prompts outside the image.
    """
    path = Path(path)
    doc = read_json_object(path, "prompts")
    space = doc.get("space", "voxel")
    if space not in ("voxel", "world"):
        raise DataError(path, f"space must be 'voxel' or 'world', not {space!r}")
    nd = len(shape)
    raw_boxes = doc.get("boxes") or []
    if not isinstance(raw_boxes, list) or any(not isinstance(b, list) or len(b) != 2 * nd for b in raw_boxes):
        raise DataError(path, f"each box needs {2 * nd} numbers for a {nd}D image")
    try:
        boxes = np.asarray(raw_boxes, dtype=np.float64).reshape(-1, 2 * nd)
    except (TypeError, ValueError) as exc:
        raise DataError(path, f"boxes must be numbers ({exc})") from exc
    raw_points = doc.get("points") or []
    if not isinstance(raw_points, list) or any(not isinstance(p, list) or len(p) != nd for p in raw_points):
        raise DataError(path, f"each point needs {nd} numbers for a {nd}D image")
    try:
        points = np.asarray(raw_points, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DataError(path, f"points must be numbers ({exc})") from exc
    points = points.reshape(-1, nd)
    labels = np.asarray(doc.get("point_labels", [1] * len(points)), dtype=np.int64)
    if len(labels) != len(points) or not np.isin(labels, (0, 1)).all():
        raise DataError(path, "point_labels needs one 1 or 0 per point")
    if not len(boxes) and not len(points):
        raise DataError(path, "no boxes and no points")
    if space == "world":
        boxes = np.concatenate([_to_voxel(boxes[:, :nd], affine, nd), _to_voxel(boxes[:, nd:], affine, nd)], axis=1)
        points = _to_voxel(points, affine, nd)
    # corners in either order (a flipped axis swaps them in voxel space)
    lo, hi = np.minimum(boxes[:, :nd], boxes[:, nd:]), np.maximum(boxes[:, :nd], boxes[:, nd:])
    upper = np.asarray(shape) - 1
    tol = 0.5
    for b_lo, b_hi in zip(lo, hi):
        if (b_hi < -tol).any() or (b_lo > upper + tol).any():
            box_text = np.round(np.concatenate([b_lo, b_hi]), 2).tolist()
            raise DataError(path, f"box {box_text} lies outside the image (shape {tuple(shape)})")
    for p in points:
        if (p < -tol).any() or (p > upper + tol).any():
            raise DataError(path, f"point {np.round(p, 2).tolist()} lies outside the image (shape {tuple(shape)})")
    boxes = np.concatenate([np.clip(lo, 0, upper), np.clip(hi, 0, upper)], axis=1)
    return Prompts(boxes, np.clip(points, 0, upper), labels)
