"""Prompts JSON (the DESIGN contract) -> voxel-space boxes and points, validated against the image.

``{"space": "voxel"|"world", "boxes": [[x0,y0,z0,x1,y1,z1], ...], "points": [[x,y,z], ...],
"point_labels": [1|0, ...], "scribbles": [{"points": [[x,y,z], ...], "label": 1|0}, ...],
"lassos": [[[x,y,z], ...], ...], "intensity": "ct_lung", "propagate": true}``; 2D images omit z in
voxel space. Scribbles join the clicks; each lasso (a closed contour on one slice) is one more
object (:mod:`medimg.io.drawn`). Voxel coordinates are array indices of the file as stored; world
coordinates are RAS+ mm (DICOM's LPS is already converted by the reader), mapped through the image's full affine: every
corner of a world box is transformed (an oblique image turns a world box into a rotated one, whose
voxel bounding box is what the model gets). A 2D image lies in 3D space (a coronal slice has a 3D
affine), so its world prompts take three coordinates; two are accepted when the image plane is
axial (world z constant).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medimg.errors import DataError
from medimg.io.drawn import Lasso, make_lasso, scribble_clicks
from medimg.io.jsonfile import read_json_object


@dataclass
class Prompts:
    """Voxel-space prompts.

    Attributes:
        boxes: ``(N, 2*d)`` boxes ``[lo..., hi...]`` (sorted so lo <= hi).
        points: ``(M, d)`` points.
        point_labels: ``(M,)`` 1 positive / 0 negative (scribbles' clicks included).
        lassos: closed contours on one slice each, one object each.
        scribbles: the drawn polylines as voxel vertices with their label (their clicks are in ``points``).
    """

    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    point_labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), dtype=np.int64))
    intensity: str | None = None
    propagate: bool = True
    lassos: list[Lasso] = field(default_factory=list)
    scribbles: list[tuple[np.ndarray, int]] = field(default_factory=list)


def _world_to_voxel(path: Path, coords: np.ndarray, affine: np.ndarray, nd: int) -> np.ndarray:
    """World points ``(N, 2|3)`` -> voxel indices ``(N, nd)`` through the full 4x4 affine."""
    affine = np.asarray(affine, dtype=np.float64)
    if coords.shape[1] == 2:  # 2D world coordinates: only for an image in an axial plane
        if np.abs(affine[2, :2]).max() > 1e-6:
            raise DataError(path, "this 2D image does not lie in an axial plane: give world prompts as [x, y, z] mm")
        coords = np.concatenate([coords, np.full((len(coords), 1), affine[2, 3])], axis=1)
    vox = (np.concatenate([coords, np.ones((len(coords), 1))], axis=1) @ np.linalg.inv(affine).T)[:, :3]
    if nd == 2:
        off = np.abs(vox[:, 2]).max(initial=0.0)
        if off > 0.5 + 1e-6:
            raise DataError(path, f"a world prompt lies {off:.2f} voxels off the plane of this 2D image")
    return vox[:, :nd]


def _world_boxes(path: Path, boxes: np.ndarray, affine: np.ndarray, nd: int, wd: int) -> np.ndarray:
    """World boxes -> voxel bounding boxes of all 2^wd transformed corners."""
    out = []
    for b in boxes:
        lo, hi = b[:wd], b[wd:]
        corners = np.array([[hi[a] if (c >> a) & 1 else lo[a] for a in range(wd)] for c in range(2 ** wd)])
        vox = _world_to_voxel(path, corners, affine, nd)
        out.append(np.concatenate([vox.min(0), vox.max(0)]))
    return np.asarray(out, dtype=np.float64).reshape(-1, 2 * nd)


def load_prompts(path: str | Path, shape: tuple[int, ...], affine: np.ndarray) -> Prompts:
    """Read and validate a prompts file for an image of ``shape`` (2 or 3 dims) and ``affine``.

    Raises:
        DataError: naming the prompts file: bad JSON, wrong lengths, labels that do not match the
            points, or prompts outside the image.
    """
    return parse_prompts(read_json_object(path, "prompts"), shape, affine, Path(path))


def prompts_document(boxes: Any = (), points: Any = (), point_labels: Any = None, space: str = "voxel",
                     intensity: str | None = None, propagate: bool = True) -> dict[str, Any]:
    """In-memory prompts (sequences or arrays) as a prompts-JSON document."""
    doc: dict[str, Any] = {"space": space, "propagate": propagate,
                           "boxes": np.asarray(boxes, dtype=np.float64).tolist() if len(boxes) else [],
                           "points": np.asarray(points, dtype=np.float64).tolist() if len(points) else []}
    if point_labels is not None:
        doc["point_labels"] = np.asarray(point_labels).astype(int).tolist()
    if intensity is not None:
        doc["intensity"] = intensity
    return doc


def parse_prompts(doc: dict[str, Any], shape: tuple[int, ...], affine: np.ndarray,
                  path: str | Path = "prompts") -> Prompts:
    """Validate a prompts document for an image of ``shape`` and ``affine``; ``path`` names it in errors."""
    space = doc.get("space", "voxel")
    if space not in ("voxel", "world"):
        raise DataError(path, f"space must be 'voxel' or 'world', not {space!r}")
    nd = len(shape)
    # world prompts on a 2D image may carry z: the image lies in 3D space
    wd = 3 if (space == "world" and nd == 2 and _lengths(doc) == {3}) else nd
    raw_boxes = doc.get("boxes") or []
    if not isinstance(raw_boxes, list) or any(not isinstance(b, list) or len(b) != 2 * wd for b in raw_boxes):
        raise DataError(path, f"each box needs {2 * wd} numbers for a {nd}D image")
    try:
        boxes = np.asarray(raw_boxes, dtype=np.float64).reshape(-1, 2 * wd)
    except (TypeError, ValueError) as exc:
        raise DataError(path, f"boxes must be numbers ({exc})") from exc
    raw_points = doc.get("points") or []
    if not isinstance(raw_points, list) or any(not isinstance(p, list) or len(p) != wd for p in raw_points):
        raise DataError(path, f"each point needs {wd} numbers for a {nd}D image")
    try:
        points = np.asarray(raw_points, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DataError(path, f"points must be numbers ({exc})") from exc
    points = points.reshape(-1, wd)
    intensity = doc.get("intensity")
    if intensity is not None:
        from medimg.data.slicing import INTENSITY_PRESETS

        if intensity not in INTENSITY_PRESETS:
            raise DataError(path, f"unknown intensity {intensity!r}; choose from {', '.join(INTENSITY_PRESETS)}")
    propagate = doc.get("propagate", True)
    if not isinstance(propagate, bool):
        raise DataError(path, "propagate must be true or false")
    unknown = sorted(set(doc) - {"space", "boxes", "points", "point_labels", "intensity", "propagate",
                                 "scribbles", "lassos"})
    if unknown:
        raise DataError(path, f"unknown key(s) {', '.join(unknown)}")
    labels = np.asarray(doc.get("point_labels", [1] * len(points)), dtype=np.int64)
    if len(labels) != len(points) or not np.isin(labels, (0, 1)).all():
        raise DataError(path, "point_labels needs one 1 or 0 per point")
    scribbles = _polylines(path, doc, "scribbles", wd)
    lasso_vertices = _polylines(path, doc, "lassos", wd)
    if not len(boxes) and not len(points) and not scribbles and not lasso_vertices:
        raise DataError(path, "no boxes, points, scribbles or lassos")
    if space == "world":
        boxes = _world_boxes(path, boxes, affine, nd, wd)
        points = _world_to_voxel(path, points, affine, nd) if len(points) else np.zeros((0, nd))
        scribbles = [(_world_to_voxel(path, v, affine, nd), lab) for v, lab in scribbles]
        lasso_vertices = [(_world_to_voxel(path, v, affine, nd), lab) for v, lab in lasso_vertices]
    # corners in either order (a flipped axis swaps them in voxel space)
    lo, hi = np.minimum(boxes[:, :nd], boxes[:, nd:]), np.maximum(boxes[:, :nd], boxes[:, nd:])
    upper = np.asarray(shape) - 1
    tol = 0.5
    for b_lo, b_hi in zip(lo, hi):
        if (b_hi < -tol).any() or (b_lo > upper + tol).any():
            box_text = np.round(np.concatenate([b_lo, b_hi]), 2).tolist()
            raise DataError(path, f"box {box_text} lies outside the image (shape {tuple(shape)})")
    for p in np.concatenate([points, *[v for v, _ in scribbles + lasso_vertices]]):
        if (p < -tol).any() or (p > upper + tol).any():
            raise DataError(path, f"point {np.round(p, 2).tolist()} lies outside the image (shape {tuple(shape)})")
    scribbles = [(np.clip(v, 0, upper), lab) for v, lab in scribbles]
    for v, lab in scribbles:  # a stroke is many clicks of one meaning
        clicks = scribble_clicks(v)
        points = np.concatenate([points, clicks])
        labels = np.concatenate([labels, np.full(len(clicks), lab, dtype=np.int64)])
    try:
        lassos = [make_lasso(np.clip(v, 0, upper), tuple(shape)) for v, _ in lasso_vertices]
    except ValueError as exc:
        raise DataError(path, str(exc)) from exc
    boxes = np.concatenate([np.clip(lo, 0, upper), np.clip(hi, 0, upper)], axis=1)
    return Prompts(boxes, np.clip(points, 0, upper), labels, intensity, propagate, lassos, scribbles)


def _polylines(path: str | Path, doc: dict[str, Any], key: str, wd: int) -> list[tuple[np.ndarray, int]]:
    """``scribbles`` (``{"points": [...], "label": 1|0}``) or ``lassos`` (vertex lists) as ``(vertices, label)``."""
    raw = doc.get(key) or []
    if not isinstance(raw, list):
        raise DataError(path, f"{key} must be a list")
    out = []
    for i, item in enumerate(raw):
        label = 1
        if key == "scribbles":
            if not isinstance(item, dict) or item.get("label", 1) not in (0, 1) or set(item) - {"points", "label"}:
                raise DataError(path, f"scribbles[{i}] must be {{\"points\": [[...], ...], \"label\": 1 or 0}}")
            label, item = int(item.get("label", 1)), item.get("points")
        if not isinstance(item, list) or not item or any(not isinstance(p, list) or len(p) != wd for p in item):
            raise DataError(path, f"{key}[{i}] needs a list of points of {wd} numbers each")
        try:
            vertices = np.asarray(item, dtype=np.float64).reshape(-1, wd)
        except (TypeError, ValueError) as exc:
            raise DataError(path, f"{key}[{i}] must be numbers ({exc})") from exc
        if not np.isfinite(vertices).all():
            raise DataError(path, f"{key}[{i}] must be finite numbers")
        out.append((vertices, label))
    return out


def _lengths(doc: dict) -> set[int]:
    """The coordinate counts of a prompts document (box lengths halved)."""
    out = {len(p) for p in doc.get("points") or [] if isinstance(p, list)}
    for s in doc.get("scribbles") or []:
        out |= {len(p) for p in (s.get("points") or [] if isinstance(s, dict) else []) if isinstance(p, list)}
    for lasso in doc.get("lassos") or []:
        out |= {len(p) for p in (lasso if isinstance(lasso, list) else []) if isinstance(p, list)}
    return out | {len(b) // 2 for b in doc.get("boxes") or [] if isinstance(b, list)}
