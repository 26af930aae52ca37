"""3D Slicer's prompts in a MONAI Label request, read into checked voxel prompts for medimg's predictors.

``foreground`` / ``background`` clicks are voxel indices ``[i, j, k]`` of the image file as
stored, ``scribbles`` (``[{"points": [[i, j, k], ...], "label": 1 | 0}]``) add clicks along their
strokes, ``lasso`` (a closed contour on one slice) bounds its object there, ``roi`` is ``[i0, i1,
j0, j1, k0, k1]`` (each pair in either order: Slicer converts RAS corners, which flips them on
non-RAS images), and 2D models get ``slice``, the ``k`` the user is looking at. A one-slice image
(``(X, Y, 1)`` or 2D) takes Slicer's 3D indices with ``k`` at its slice. Anything that does not
fit the image is a ``ValueError`` naming the image (HTTP 400).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from medimg.data.slicing import axis_plane
from medimg.errors import MedimgError
from medimg.io.drawn import Lasso
from medimg.io.image import Image
from medimg.io.prompts import parse_prompts
from medimg.predictors.prompting import lasso_box, prompt_shape, slicer_shape


def request_clicks(request: dict[str, Any], image: Image) -> tuple[np.ndarray, np.ndarray]:
    """``(points (N, D), labels (N,))`` from ``foreground`` / ``background``, checked against the image.

    On a one-slice image (``(X, Y, 1)`` or 2D) Slicer's ``[i, j, k]`` clicks are taken with ``k`` at 0.
    """
    shape, full = prompt_shape(image.array), slicer_shape(image.array)
    pts, labels = [], []
    for key, value in (("foreground", 1), ("background", 0)):
        for p in request.get(key) or []:
            if not isinstance(p, (list, tuple)) or len(p) < len(shape):
                raise ValueError(f"{image.path}: {key} click {p!r} needs {len(shape)} voxel indices")
            q = [float(c) for c in p[:len(full)]]
            if any(not 0 <= c <= n - 1 for c, n in zip(q, full)):
                raise ValueError(f"{image.path}: {key} click {p!r} lies outside the image of shape {full}")
            pts.append(q[:len(shape)])
            labels.append(value)
    return np.asarray(pts, dtype=np.float64).reshape(-1, len(shape)), np.asarray(labels, dtype=np.int64)


def on_the_slice(points: Any, image: Image, what: str) -> Any:
    """A one-slice image's ``[i, j, k]`` vertices (Slicer's) as ``[i, j]``, ``k`` checked; others as given."""
    if len(slicer_shape(image.array)) == len(prompt_shape(image.array)) or not isinstance(points, list):
        return points
    out = []
    for p in points:
        if isinstance(p, list) and len(p) == 3 and isinstance(p[2], (int, float)):
            if not -0.5 <= p[2] <= 0.5:  # the tolerance of prompts JSON (parse_prompts)
                raise ValueError(f"{image.path}: {what} point {p!r} lies outside the image of shape "
                                 f"{slicer_shape(image.array)}")
            p = p[:2]
        out.append(p)
    return out


def request_drawn(request: dict[str, Any], image: Image) -> tuple[np.ndarray, np.ndarray, Lasso | None]:
    """Scribbles (as clicks) and a lasso from the request, in voxel indices, read as the prompts JSON reads them.

    ``scribbles``: ``[{"points": [[i, j, k], ...], "label": 1 | 0}, ...]``; ``lasso``: one closed
    contour ``[[i, j, k], ...]`` on the viewed slice.
    """
    shape = prompt_shape(image.array)
    scribbles = [{**s, "points": on_the_slice(s.get("points"), image, "scribble")} if isinstance(s, dict) else s
                 for s in request.get("scribbles") or []]
    doc = {"scribbles": scribbles,
           "lassos": [on_the_slice(request["lasso"], image, "lasso")] if request.get("lasso") else []}
    if not doc["scribbles"] and not doc["lassos"]:
        return np.zeros((0, len(shape))), np.zeros(0, dtype=np.int64), None
    try:
        prompts = parse_prompts(doc, shape, image.affine, "request")
    except MedimgError as exc:
        raise ValueError(f"{image.path}: {exc.problem}") from exc
    return prompts.points, prompts.point_labels, (prompts.lassos[0] if prompts.lassos else None)


def request_roi(request: dict[str, Any], image: Image) -> np.ndarray | None:
    """Slicer's ``roi`` ``[i0, i1, j0, j1(, k0, k1)]`` -> box ``[i0, j0, (k0,) i1, j1, (k1)]``, clipped to the image.

    A one-slice image (``(X, Y, 1)`` or 2D) takes 4 numbers, or Slicer's 6 with ``k0..k1`` around
    its slice; the box is 2D.
    """
    roi = request.get("roi") or []
    if not roi:
        return None
    shape, full = prompt_shape(image.array), slicer_shape(image.array)
    if len(roi) not in (2 * len(shape), 2 * len(full)):
        extra = " (or 6 with k0..k1 around the one slice)" if len(full) > len(shape) else ""
        raise ValueError(f"{image.path}: roi {roi!r} needs {2 * len(shape)} numbers [i0, i1, j0, j1, ...]{extra}")
    pairs = np.asarray(roi, dtype=np.float64).reshape(-1, 2)
    upper = np.asarray(full[:len(pairs)]) - 1
    if (pairs.max(axis=1) < 0).any() or (pairs.min(axis=1) > upper).any():
        raise ValueError(f"{image.path}: roi {roi!r} lies outside the image of shape {full[:len(pairs)]}")
    lo = np.clip(pairs.min(axis=1), 0, upper)[:len(shape)]
    hi = np.clip(pairs.max(axis=1), 0, upper)[:len(shape)]
    return np.concatenate([lo, hi])


def request_prompts(request: dict[str, Any], image: Image,
             flat_boxes: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, Lasso | None]:
    """Clicks (scribbles' included), the box (``roi``, or a lasso's) and the lasso of a request.

    ``flat_boxes``: a lasso's box stays flat on its slice (2D slice models), else it grows along
    the slice's normal (:func:`~medimg.predictors.prompting.lasso_box`).
    """
    pts, labels = request_clicks(request, image)
    spts, slabels, lasso = request_drawn(request, image)
    pts, labels = np.concatenate([pts, spts]), np.concatenate([labels, slabels]).astype(np.int64)
    box = request_roi(request, image)
    if lasso is not None:
        if box is not None:
            raise ValueError(f"{image.path}: give an roi or a lasso, not both")
        box = lasso_box(lasso, prompt_shape(image.array), flat_boxes)
    return pts, labels, box, lasso


def viewed_plane(affine: np.ndarray) -> str:
    """The anatomical plane of the file's slices ``[:, :, k]`` (what 3D Slicer's ``slice`` indexes)."""
    return axis_plane(affine, 2)


def request_propagate(request: dict[str, Any]) -> bool:
    """The request's ``propagate`` (default true; ``false``: only the slice the user is on)."""
    value = request.get("propagate", True)
    if isinstance(value, str):  # a form field
        return value.strip().lower() not in ("false", "0", "no", "off")
    return True if value is None else bool(value)


def viewed_slice(request: dict[str, Any], image: Image, pts: np.ndarray, labels: np.ndarray,
                  box: np.ndarray | None) -> int:
    """The ``k`` the user is on: ``slice``, else the first foreground click's, else the ROI's middle, else a click's."""
    k = request.get("slice")
    if k is None:
        if (labels == 1).any():
            k = pts[labels == 1][0, 2]
        elif box is not None:
            k = (box[2] + box[5]) // 2
        elif len(pts):
            k = pts[0, 2]
        else:
            raise ValueError(f"{image.path}: give foreground clicks or an roi")
    try:
        k = int(round(float(k)))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{image.path}: slice {k!r} is not a slice index") from exc
    if not 0 <= k < image.array.shape[2]:
        raise ValueError(f"{image.path}: slice {k} lies outside the image of shape {image.array.shape}")
    if box is not None and not np.floor(box[2]) <= k <= np.ceil(box[5]):
        raise ValueError(f"{image.path}: slice {k} lies outside the roi (k {box[2]:g} to {box[5]:g})")
    return k


def clicks_plane(request: dict[str, Any], image: Image, pts: np.ndarray,
                 labels: np.ndarray) -> tuple[int, int]:
    """``(axis, index)`` of the one slice a 2D model's clicks lie on, in the file's index space.

    Slicer's ``slice`` is a ``k`` of the file, but a user may click in a view across the file's
    slices (the axial view of a sagittally stored MPRAGE): then every click shares an ``i`` or a
    ``j`` instead, and that is the slice segmented. Clicks on no one slice are refused, naming
    those off the viewed one, rather than dropped without a word.
    """
    k = viewed_slice(request, image, pts, labels, None)
    rounded = np.round(pts)
    if (rounded[:, 2] == k).all():
        return 2, k
    for axis in (0, 1):
        if len(np.unique(rounded[:, axis])) == 1:
            return axis, int(rounded[0, axis])
    off = [[round(float(c), 1) for c in p] for p in pts[rounded[:, 2] != k]]
    raise ValueError(f"{image.path}: a 2D model segments one slice; the clicks {off} are not on slice {k}, and the "
                     "clicks share no other slice")
