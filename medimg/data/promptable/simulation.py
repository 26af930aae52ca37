"""Prompt simulation for promptable segmentation (boxes, clicks, slices, targets).

Coordinates follow the prompts-JSON contract: array indices in axis order, so a 2D box is
``[x0, y0, x1, y1]`` = ``[i0, j0, i1, j1]`` and a 3D box ``[i0, j0, k0, i1, j1, k1]`` (inclusive),
a point is ``[i, j(, k)]``. Works for 2D and 3D masks alike.

Why not MONAI's ``monai.apps.vista3d.sampler.sample_prompt_pairs``: it draws class prompts plus
random positive / negative points from a label map, for VISTA3D's class-and-point training. The
SAM-style training here needs *correction* clicks placed in the error region of the model's current
prediction, away from the region's edge, round after round, and boxes with jitter; that sampler has
neither.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest connected component of a binary mask (the mask itself when empty)."""
    comp, n = ndimage.label(mask)
    if n <= 1:
        return mask.astype(bool)
    return comp == (np.argmax(np.bincount(comp.ravel())[1:]) + 1)


def box_from_mask(mask: np.ndarray, jitter_px: float = 0.0, jitter_frac: float = 0.0, expand_only: bool = True,
                  rng: np.random.Generator | None = None) -> np.ndarray:
    """Bounding box of a mask, optionally jittered.

    Each side moves by a random amount up to ``jitter_px + jitter_frac * extent`` of that axis.
    With ``expand_only`` sides only move outward, so the box always contains the mask (training
    boxes drawn by hand are loose, rarely tight-inside); otherwise they move either way.

    Args:
        mask: binary 2D or 3D array (must be non-empty).
        jitter_px: jitter in pixels.
        jitter_frac: jitter as a fraction of the box extent along each axis.
        expand_only: only enlarge the box.
        rng: random generator.

    Returns:
        ``[lo_0, ..., lo_{d-1}, hi_0, ..., hi_{d-1}]`` (inclusive, clipped to the array).
    """
    idx = np.nonzero(mask)
    if len(idx[0]) == 0:
        raise ValueError("box_from_mask needs a non-empty mask")
    lo = np.array([i.min() for i in idx], dtype=np.float64)
    hi = np.array([i.max() for i in idx], dtype=np.float64)
    if jitter_px or jitter_frac:
        rng = rng or np.random.default_rng()
        amount = jitter_px + jitter_frac * (hi - lo + 1)
        if expand_only:
            lo -= rng.uniform(0, 1, lo.shape) * amount
            hi += rng.uniform(0, 1, hi.shape) * amount
        else:
            lo += rng.uniform(-1, 1, lo.shape) * amount
            hi += rng.uniform(-1, 1, hi.shape) * amount
        lo, hi = np.minimum(lo, hi), np.maximum(lo, hi)
    upper = np.asarray(mask.shape, dtype=np.float64) - 1
    return np.concatenate([np.clip(np.round(lo), 0, upper), np.clip(np.round(hi), 0, upper)])


def _interior_point(region: np.ndarray, rng: np.random.Generator, centre_bias: float) -> np.ndarray:
    """A point of ``region``, drawn with weight ``distance-to-edge ** centre_bias`` (SAM-style)."""
    dist = ndimage.distance_transform_edt(region)
    weights = dist[region] ** centre_bias
    coords = np.argwhere(region)
    p = weights / weights.sum() if weights.sum() > 0 else None
    return coords[rng.choice(len(coords), p=p)]


def sample_clicks(target: np.ndarray, pred: np.ndarray | None = None, num: int = 1,
                  rng: np.random.Generator | None = None, centre_bias: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Correction clicks from the error region, as in iterative click training.

    With no prediction (or an empty one) the clicks are positive, inside the target. Otherwise
    each click goes to the largest error component: positive inside false negatives, negative
    inside false positives, placed away from the component's edge.

    Args:
        target: binary ground truth.
        pred: binary current prediction (``None`` for the first click).
        num: number of clicks.
        rng: random generator.
        centre_bias: exponent on the distance-to-edge weighting (0: uniform).

    Returns:
        ``(points (num, ndim) int, labels (num,) 1|0)``.
    """
    rng = rng or np.random.default_rng()
    target = target.astype(bool)
    pred = np.zeros_like(target) if pred is None else pred.astype(bool)
    points, labels = [], []
    for _ in range(num):
        fn, fp = target & ~pred, pred & ~target
        if not fn.any() and not fp.any():
            region, positive = (target if target.any() else ~target), target.any()
        else:
            lab_fn, n_fn = ndimage.label(fn)
            lab_fp, n_fp = ndimage.label(fp)
            size_fn = np.bincount(lab_fn.ravel())[1:] if n_fn else np.array([0])
            size_fp = np.bincount(lab_fp.ravel())[1:] if n_fp else np.array([0])
            positive = size_fn.max() >= size_fp.max()
            region = lab_fn == (np.argmax(size_fn) + 1) if positive else lab_fp == (np.argmax(size_fp) + 1)
        point = _interior_point(region, rng, centre_bias)
        points.append(point)
        labels.append(int(positive))
        # a click fixes its neighbourhood for the next draw (as a user would expect of the model)
        pred = pred.copy()
        pred[tuple(point)] = bool(positive)
    return np.asarray(points, dtype=np.int64), np.asarray(labels, dtype=np.int64)


def sample_slices(label: np.ndarray, num: int, axis: int = 2, foreground_weight: float = 0.9,
                  rng: np.random.Generator | None = None) -> np.ndarray:
    """Slice indices along ``axis``: with probability ``foreground_weight`` a slice holding foreground.

    Args:
        label: 3D label volume.
        num: how many slices.
        axis: slicing axis.
        foreground_weight: share of slices drawn among those with foreground (weighted by its area).
        rng: random generator.
    """
    rng = rng or np.random.default_rng()
    other = tuple(a for a in range(label.ndim) if a != axis)
    area = (label > 0).sum(axis=other).astype(np.float64)
    fg = np.nonzero(area)[0]
    out = []
    for _ in range(num):
        if len(fg) and rng.random() < foreground_weight:
            out.append(int(rng.choice(fg, p=area[fg] / area[fg].sum())))
        else:
            out.append(int(rng.integers(0, label.shape[axis])))
    return np.asarray(out, dtype=np.int64)


def split_targets(label: np.ndarray, mode: str = "label", classes: list[int] | None = None,
                  min_size: int = 1) -> list[tuple[int, np.ndarray]]:
    """Binary targets from a label map: one per label value, or one per connected component.

    Args:
        label: integer label map (2D or 3D).
        mode: ``label`` or ``component``.
        classes: label values to use (default: every non-zero value present).
        min_size: drop targets smaller than this many voxels.

    Returns:
        ``[(class_value, binary_mask), ...]``.
    """
    if mode not in ("label", "component"):
        raise ValueError(f"unknown target mode {mode!r}; choose label or component")
    values = classes if classes is not None else [int(v) for v in np.unique(label) if v != 0]
    targets = []
    for value in values:
        mask = label == value
        if mode == "label":
            parts = [mask]
        else:
            comp, n = ndimage.label(mask)
            parts = [comp == i for i in range(1, n + 1)]
        targets += [(int(value), m) for m in parts if m.sum() >= min_size]
    return targets
